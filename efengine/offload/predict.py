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
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))


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
        self.P_reuse = np.full((L, E), top_k / n_experts)
        self.lags = np.zeros((L, 3, E))                      # last 3 executions of each layer
        self.freq = np.zeros((len(DECAYS), L, E))
        self.decay = np.asarray(DECAYS)[:, None]
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
        self._acc: list = []                                 # (ok, p, y) not yet counted (off-path)
        d = np.arange(L)[None, :] - np.arange(L)[:, None]
        self._dist = np.where(d > 0, d, d + L)               # [c, l]: distances(c)
        self._bkt = bucket_of(self._dist)                    # [c, l]: their buckets
        self._arL = np.arange(L)
        self._heads = np.arange(2)[:, None]
        self._gmask = self.mask[:, None, :] / E              # [2, 1, F] gradient mask and scale
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
        self._due = (layer, used.astype(np.float64))
        self.lags[layer, 1:] = self.lags[layer, :-1]
        self.lags[layer, 0] = used
        self.freq[:, layer] = self.freq[:, layer] * self.decay + used
        self.Xbase[layer, :, 1:4] = self.lags[layer].T
        self.Xbase[layer, :, 4:7] = (self.freq[:, layer] * (1.0 - self.decay)).T
        dd = np.arange(1, self.span + 1)
        dd = dd[layer - dd >= 0]
        if dd.size:      # co-activation with this step's earlier layers (rows not routed add zeros)
            self.co[layer - dd, dd - 1] += self.step_used[layer - dd][:, :, None] * used[None, None, :]
        self.cnt[layer] += used
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
        self._flush_accuracy()
        if self._prep is not None and self._prep[:2] == (layer, self.version):
            return
        ok = np.flatnonzero(self.pending_ok[layer])
        if not ok.size:
            self._prep = (layer, self.version, ok, None, None, None)
            return
        X = self.pending[layer, ok]                                 # [n, E, F]
        b = bucket_of(ok + 1)
        # both heads at once: a head's mask zeroes the features it ignores (x * 0 = 0 and
        # x * 1 = x exactly, so masking the weights equals masking the features)
        Wm = self.W[:, b] * self.mask[:, None, :]                    # [2, n, F]
        self._prep = (layer, self.version, ok, X, b, _sigmoid(np.einsum("nef,hnf->hne", X, Wm)))

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
            grad = np.einsum("hne,nef->hnf", P - y, X) * self._gmask
            np.add.at(self.W, (self._heads, b[None, :]), -self.lr * grad)
            self.version += 1
            self._acc.append((ok, P[1], y))         # recall bookkeeping: counted off the critical path
        self.pending_ok[layer] = False

    def _flush_accuracy(self) -> None:
        for ok, p, y in self._acc:
            top = np.argsort(-p, axis=1, kind="stable")[:, : self.A]
            self.acc_hits[ok + 1] += y[top].sum(1)
            self.acc_total[ok + 1] += min(self.A, int(y.sum()))
        self._acc.clear()

    # ---- predicting ----------------------------------------------------------------------------
    def distances(self, c: int) -> np.ndarray:
        """[L] layer-steps from having run layer c to the next execution of every layer."""
        return self._dist[c].copy()

    def features(self, c: int, pregate: np.ndarray | None = None) -> np.ndarray:
        """[L, E, F] features of every candidate for its next execution, layer c just routed."""
        L, E = self.L, self.E
        X = self.Xbase.copy()
        if c >= 0 and self.span:
            used = self.step_used[c]
            t = np.arange(c + 1, min(c + self.span, L - 1) + 1)
            if t.size and used.any():
                marg = (self.cnt[t] + 1.0) / (self.execs[t] + E / self.A)[:, None]          # [n, E]
                co = self.co[c, t - c - 1][:, used]                                          # [n, u, E]
                cond = (co + marg[:, None, :]) / (self.cnt[c][used, None] + 1.0)
                X[t, :, 7] = np.log(cond.sum(1) / cond.shape[1] / marg)      # = mean(1), bit for bit
                X[t, :, 8] = 1.0
        if pregate is not None:
            pg = np.asarray(pregate, dtype=np.float64)
            have = ~np.isnan(pg).any(axis=1)
            if have.any():
                self._pregate_features(X, pg, have)
        return X

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
        X = self.features(c, pregate)
        d = self._dist[c]
        self.pending[self._arL, d - 1] = X
        self.pending_ok[self._arL, d - 1] = True
        self.version += 1
        if self.seen < self.warmup:
            self.P_reuse = self._fallback(X)
            return self.P_reuse
        Wb = self.W[:, self._bkt[c]] * self.mask[:, None, :]        # [2, L, F] (heads' masks on W)
        P = _sigmoid(np.einsum("lef,hlf->hle", X, Wb))
        self.P_reuse = P[0]
        return P[1]

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
