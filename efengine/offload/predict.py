"""Predictors: the probability that each expert is used at its layer's next execution.

Legend: L MoE layers (MoE order), E experts per layer, F features, B distance buckets.

Time runs in layer-steps (decode: token-major, layer-minor). After layer c of a step has routed,
the next execution of layer l' is this step's when l' > c and the next step's otherwise; its
distance is d = l' - c (or l' - c + L). `HybridPredictor.predict(c)` returns P [L, E] for those
next executions.

The model is a logistic regression per distance bucket over a few features per (layer, expert)
candidate, learned online with SGD from the routing the model actually takes (numpy only):
  bias, used in the last 3 executions of its layer (lag 1..3), decayed frequencies at 3 time
  scales, co-activation with the experts this step routed at layer c (for targets within
  `coact_span` layers ahead in this step: log P(e at l' | routing at c) / P(e at l')), and the
  pre-gate probability, its logit and whether it is in the pre-gate's top_k (the router of layer l'
  applied to the current hidden state; absent in history-only mode, e.g. trace replay).
Until it has seen `warmup` layer executions it answers with the pre-gate alone where there is
one and with the decayed frequency elsewhere. Where a pre-gate score exists the model starts as
exactly the pre-gate (weight 1 on its logit), so learning refines it rather than starting from
nothing; elsewhere it starts from the prior top_k / E.

Two heads share the features: "route" (all of them) names the experts to prefetch and protect;
"reuse" (without co-activation) gives the calibrated probabilities eviction ranks by. Measured on
the Mixtral traces, co-activation raises top-k recall a few layers ahead (0.43 vs 0.38 at d=1)
but its sharper, noisier probabilities made eviction worse (+0.5 to +1 miss/token), so eviction
does not read it.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

DECAYS = (0.6, 0.9, 0.98)
BUCKET_EDGES = (1, 2, 4, 8, 16)      # distance d -> bucket: 1 | 2 | 3-4 | 5-8 | 9-16 | 17+
FEATURES = ("bias", "lag1", "lag2", "lag3", "freq0.6", "freq0.9", "freq0.98", "coact", "has_coact",
            "pregate", "has_pregate", "pregate_logit", "pregate_top")
CLIP = 0.02          # probabilities are clipped to [CLIP, 1 - CLIP] before a logit


def bucket_of(d: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKET_EDGES), d, side="left")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-clip(z, -30, 30))), in place in z (the same operations, so the same bits)."""
    np.clip(z, -30, 30, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    z += 1.0
    return np.divide(1.0, z, out=z)


class HybridPredictor:
    """Online-learned expert predictor fusing routing history and (when given) pre-gate scores."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int, *, lr: float = 0.05,
                 coact_span: int = 4, warmup: int | None = None):
        if n_layers < 1 or n_experts < 1 or not 0 < top_k <= n_experts:
            raise ConfigError(f"predictor: bad shape L={n_layers} E={n_experts} top_k={top_k}")
        L, E, F = n_layers, n_experts, len(FEATURES)
        self.L, self.E, self.A, self.F = L, E, top_k, F
        self.lr = lr
        self.span = max(0, min(coact_span, L - 1))
        self.warmup = 4 * L if warmup is None else warmup
        self.B = len(BUCKET_EDGES) + 1
        prior = np.log(top_k / max(n_experts - top_k, 1))
        self.W = np.zeros((2, self.B, F))                   # [head: reuse, route]
        self.W[..., 0] = prior
        self.W[..., 10] = -prior     # with a pre-gate score the model starts as the pre-gate itself
        self.W[..., 11] = 1.0
        self.mask = np.ones((2, F))
        self.mask[0, [7, 8]] = 0.0                           # the reuse head ignores co-activation
        # The mask is applied to the gradient only: W[0, :, 7:9] starts at +0.0 and its gradient is
        # x * 0 = +-0.0, so it stays exactly +0.0 and W equals W * mask bit for bit (no multiply).
        self.P_reuse = np.full((L, E), top_k / n_experts)
        self.freq = np.zeros((L, E, len(DECAYS)))            # decayed frequencies [layer, e, scale]
        self._decay = np.asarray(DECAYS)
        self._keep = 1.0 - self._decay
        self.co = np.zeros((L, max(self.span, 1), E, E))     # [c, dd-1, e at c, e2 at c+dd]
        self.cnt = np.zeros((L, E))
        self.execs = np.zeros(L)
        self.current = -1                                    # last layer observed in this step
        self.step_used = np.zeros((L, E), dtype=bool)        # this step's routing so far
        self.pending = np.zeros((L, L, E, F))                # [target layer, d-1]: features used
        self.pending_ok = np.zeros((L, L), dtype=bool)
        self.seen = 0
        # features 0..6 (bias, lags, decayed frequencies) change only in the row of the layer just
        # observed: kept up to date here so features() copies them instead of rebuilding [L, E, F]
        self.Xbase = np.zeros((L, E, F))
        self.Xbase[..., 0] = 1.0
        self.acc_hits = np.zeros(L + 1)                      # by distance d (1..L): top-A recall
        self.acc_total = np.zeros(L + 1)
        self._acc: list = []                                 # (ok, p, y) not yet counted (batched)
        d = np.arange(L)[None, :] - np.arange(L)[:, None]
        self._dist = np.where(d > 0, d, d + L)               # [c, l]: distances(c)
        self._dist.flags.writeable = False
        self._bkt = bucket_of(self._dist)                    # [c, l]: their buckets
        self._bkt_d = bucket_of(np.arange(1, L + 1))         # [d-1]: bucket of distance d
        self._arL = np.arange(L)
        self._pend_at = self._arL[None, :] * L + self._dist - 1   # [c, l]: flat (l, d-1) in pending
        self._onehot_all = (self._bkt_d[None, :] == np.arange(self.B)[:, None]).astype(np.float64)  # [B, d-1]
        self._fuse_b = np.concatenate([self._bkt, self._bkt_d[None, :].repeat(L, 0)], axis=1)   # [c, L + L]
        self._XX = np.zeros((2 * L, E, F))                   # predict(): new features, then pending of c+1
        self._gmask = self.mask[:, None, :] / E              # [2, 1, F] gradient mask and scale
        dd = np.arange(1, self.span + 1)                      # co-activation rows each layer updates
        self._co_at = [(l - dd[l - dd >= 0], dd[l - dd >= 0] - 1) for l in range(L)]
        self._co_t = [(c + 1, min(c + self.span, L - 1) + 1) for c in range(L)]   # coact targets of c
        self._marg0 = E / self.A
        self.version = 0                                     # bumped when W or `pending` change
        self._prep = None                                    # prepare(): (layer, version, ok, X, b, P)
        self._due = None                                     # (layer, y): a gradient step not yet taken

    # ---- learning from what the model routed ---------------------------------------------------
    def begin_step(self) -> None:
        self.current = -1
        self.step_used[:] = False

    def observe(self, layer: int, experts) -> None:
        """Layer `layer` routed to `experts` (ids of any shape; a batch counts as their union)."""
        used = np.zeros(self.E, dtype=bool)
        used[np.asarray(experts, dtype=np.int64).reshape(-1)] = True
        if layer <= self.current:          # a new step began without begin_step (trace replay)
            self.begin_step()
        # the gradient step reads only W and the pending predictions, which nothing below touches:
        # it is taken when W is next needed (predict, prepare), so a layer whose routing needs no
        # prediction (every expert resident) leaves it to the planning that runs off the critical path
        self._settle()
        y = used.astype(np.float64)
        self._due = (layer, y)
        xb, f = self.Xbase[layer], self.freq[layer]          # views [E, F], [E, 3]
        xb[:, 2:4] = xb[:, 1:3]                              # lags: 1 -> 2 -> 3 executions ago
        xb[:, 1] = y
        f *= self._decay
        f += y[:, None]
        np.multiply(f, self._keep, out=xb[:, 4:7])
        rows, dd = self._co_at[layer]
        if rows.size:    # co-activation with this step's earlier layers (rows not routed add zeros)
            self.co[rows, dd] += self.step_used[rows][:, :, None] & used
        self.cnt[layer] += y
        self.execs[layer] += 1
        self.step_used[layer] = used
        self.current = layer
        self.seen += 1

    def prepare(self, layer: int) -> None:
        """The part of observe(layer) that does not depend on the routing it will see: the forward
        pass of the predictions pending for `layer`. Call it while the device computes (the runtime
        does, after planning) so observe() on the decode critical path only applies the gradient.
        Same numbers as without it: a stale preparation (W or pending changed since) is redone."""
        self._settle()
        if len(self._acc) >= 256:
            self._flush_accuracy()
        if self._prep is not None and self._prep[:2] == (layer, self.version):
            return
        okm = self.pending_ok[layer]
        if okm.all():                       # steady state: every distance pending, no gather
            ok, X = self._arL, self.pending[layer]
        else:
            ok = np.flatnonzero(okm)
            if not ok.size:
                self._prep = (layer, self.version, ok, None, None, None)
                return
            X = self.pending[layer, ok]                              # [n, E, F]
        b = self._bkt_d[ok]
        # both heads at once (each head's mask is folded into W, see __init__)
        self._prep = (layer, self.version, ok, X, b, _sigmoid(np.matmul(X, self.W[:, b, :, None])[..., 0]))

    def _settle(self) -> None:
        if self._due is not None:
            layer, y = self._due
            self._due = None
            self._learn(layer, y)

    def _learn(self, layer: int, y: np.ndarray) -> None:
        self.prepare(layer)
        _, _, ok, X, b, P = self._prep
        self._prep = None
        if ok.size:
            grad = np.matmul((P - y)[:, :, None, :], X)[:, :, 0] * self._gmask     # [2, n, F]
            M = self._onehot_all if ok is self._arL else self._onehot_all[:, ok]    # [B, n]
            self.W -= self.lr * np.matmul(M, grad)        # every bucket's summed gradient at once
            self.version += 1
            self._acc.append((ok, P[1], y))         # recall bookkeeping: counted off the critical path
        self.pending_ok[layer] = False

    def _flush_accuracy(self) -> None:
        """Count the recall of the learned predictions in one batch (integer counts: exact)."""
        if not self._acc:
            return
        ok = np.concatenate([a[0] for a in self._acc])
        p = np.concatenate([a[1] for a in self._acc])                           # [m, E]
        y = np.concatenate([np.broadcast_to(a[2], a[1].shape) for a in self._acc])
        top = np.argsort(-p, axis=1, kind="stable")[:, : self.A]
        np.add.at(self.acc_hits, ok + 1, np.take_along_axis(y, top, 1).sum(1))
        np.add.at(self.acc_total, ok + 1, np.minimum(self.A, y.sum(1)))
        self._acc.clear()

    # ---- predicting ----------------------------------------------------------------------------
    def distances(self, c: int) -> np.ndarray:
        """[L] layer-steps from having run layer c to the next execution of every layer."""
        return self._dist[c].copy()

    def distance_row(self, c: int) -> np.ndarray:
        """distances(c) as a read-only view (no copy)."""
        return self._dist[c]

    def features(self, c: int, pregate: np.ndarray | None = None) -> np.ndarray:
        """[L, E, F] features of every candidate for its next execution, layer c just routed."""
        X = np.empty_like(self.Xbase)
        self._features_into(X, c, pregate)
        return X

    def _features_into(self, X: np.ndarray, c: int, pregate: np.ndarray | None) -> None:
        np.copyto(X, self.Xbase)
        if c >= 0 and self.span:
            t0, t1 = self._co_t[c]
            used = self.step_used[c]
            if t1 > t0 and used.any():
                marg = (self.cnt[t0:t1] + 1.0) / (self.execs[t0:t1] + self._marg0)[:, None]   # [n, E]
                co = self.co[c, : t1 - t0][:, used]                                          # [n, u, E]
                cond = (co + marg[:, None, :]) / (self.cnt[c][used, None] + 1.0)
                X[t0:t1, :, 7] = np.log(cond.sum(1) / cond.shape[1] / marg)  # = mean(1), bit for bit
                X[t0:t1, :, 8] = 1.0
        if pregate is not None:
            pg = np.asarray(pregate, dtype=np.float64)
            have = ~np.isnan(pg).any(axis=1)
            if have.any():
                self._pregate_features(X, pg, have)

    def _pregate_features(self, X: np.ndarray, pg: np.ndarray, have: np.ndarray) -> None:
        """Columns 9..12 of the rows `have` [L] that have a pre-gate score (others stay 0)."""
        X[have, :, 9] = pg[have]
        X[have, :, 10] = 1.0
        q = np.clip(pg[have], CLIP, 1.0 - CLIP)
        X[have, :, 11] = np.log(q / (1.0 - q))
        # in the pre-gate's top_k: the router's own choice, whatever its calibration (measured on the
        # demo model: the logit alone let SGD trade ranking for log-loss, recall at d=1 0.80 -> 0.90)
        rank = np.argsort(np.argsort(-pg[have], axis=1, kind="stable"), axis=1)
        X[have, :, 12] = rank < self.A

    def predict(self, c: int, pregate: np.ndarray | None = None) -> np.ndarray:
        """P [L, E]: probability of use at each layer's next execution, layer c having just routed
        (route head; the reuse head's answer is left in self.P_reuse).

        `pregate` [L, E] (NaN rows where absent): router probabilities of the later layers applied
        to the current hidden state, scaled so a row sums to top_k (the chance to be picked)."""
        self._settle()
        L, XX = self.L, self._XX
        X = XX[:L]
        self._features_into(X, c, pregate)
        at = self._pend_at[c]
        self.pending.reshape(-1, self.E, self.F)[at] = X
        self.pending_ok.reshape(-1)[at] = True
        self.version += 1
        if self.seen < self.warmup:
            self.P_reuse = self._fallback(X)
            return self.P_reuse
        # one forward pass for these predictions and for those pending for the next layer (its
        # learning step needs them with this W, which nothing changes before that layer routes)
        nt = (c + 1) % L
        okm = self.pending_ok[nt]
        if okm.all():
            ok, b_all = self._arL, self._fuse_b[c]
        else:
            ok = np.flatnonzero(okm)
            b_all = np.concatenate([self._bkt[c], self._bkt_d[ok]])
        n = ok.size
        XX[L:L + n] = self.pending[nt] if n == L else self.pending[nt, ok]
        Z = _sigmoid(np.matmul(XX[:L + n], self.W[:, b_all, :, None])[..., 0])   # [2, L + n, E]
        if n:
            self._prep = (nt, self.version, ok, self.pending[nt] if n == L else XX[L:L + n].copy(),
                          self._bkt_d[ok], Z[:, L:])
        self.P_reuse = Z[0, :L]
        return Z[1, :L]

    def _fallback(self, X: np.ndarray) -> np.ndarray:
        p = np.clip(X[..., 5], 0.0, 1.0)                     # decayed frequency (0.9)
        return np.where(X[..., 10] > 0, np.clip(X[..., 9], 0.0, 1.0), p)

    def reset_accuracy(self) -> None:
        self._settle()
        self._acc.clear()
        self.acc_hits[:] = 0
        self.acc_total[:] = 0

    def accuracy_by_distance(self) -> dict[int, float]:
        """Top-A recall of the predictions made d layer-steps ahead (d -> fraction)."""
        self._settle()
        self._flush_accuracy()
        return {d: round(float(self.acc_hits[d] / self.acc_total[d]), 4)
                for d in range(1, self.L + 1) if self.acc_total[d] > 0}


def pregate_probs(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Router logits [T, E] of a later layer on the current hidden state -> chance to be picked [E]
    by any of the T tokens: 1 - (1 - softmax)^top_k per token (picked in top_k draws; keeps the
    router's order, unlike a cap at 1), then 1 - prod(1 - p) over tokens. Computed through
    log1p / expm1: written directly, a sharp router's unlikely experts (softmax below ~1e-16) all
    round to exactly 0 and tie, and the pre-gate's top-k feature would then break ties by expert id."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):                        # p == 1: log 0 = -inf -> probability 1
        log_miss = top_k * np.log1p(-np.minimum(p, 1.0))      # log (1 - p)^top_k per token
    return -np.expm1(log_miss.sum(axis=0))


def pregate_topk(logits: np.ndarray, top_k: int) -> np.ndarray:
    """The experts a later layer's router would pick for the current hidden state (union over T)."""
    idx = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]
    return np.unique(idx)
