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
N_BASE = 7           # features 0..6 (bias, lags, decayed frequencies): they depend on the layer only


def bucket_of(d: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKET_EDGES), d, side="left")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) in place in z, as (1 + tanh(z / 2)) / 2: four operations, no overflow."""
    z *= 0.5
    np.tanh(z, out=z)
    z *= 0.5
    z += 0.5
    return z


class HybridPredictor:
    """Online-learned expert predictor fusing routing history and (when given) pre-gate scores."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int, *, lr: float = 0.05,
                 coact_span: int = 4, warmup: int | None = None):
        if n_layers < 1 or n_experts < 1 or not 0 < top_k <= n_experts:
            raise ConfigError(f"predictor: bad shape L={n_layers} E={n_experts} top_k={top_k}")
        L, E, F = n_layers, n_experts, len(FEATURES)
        self.L, self.E, self.A, self.F = L, E, top_k, F
        self.lr = lr
        self.span = S = max(0, min(coact_span, L - 1))
        S1 = max(S, 1)
        self.warmup = 4 * L if warmup is None else warmup
        self.B = B = len(BUCKET_EDGES) + 1
        prior = np.log(top_k / max(n_experts - top_k, 1))
        self.W = np.zeros((2, B, F))                         # [head: reuse, route]
        self.W[..., 0] = prior
        self.W[..., 10] = -prior     # with a pre-gate score the model starts as the pre-gate itself
        self.W[..., 11] = 1.0
        mask = np.ones((2, F))
        mask[0, [7, 8]] = 0.0                                # the reuse head ignores co-activation
        # The mask is applied to the gradient only: W[0, :, 7:9] starts at +0.0 and its gradient is
        # x * 0 = +-0.0, so it stays exactly +0.0 and W equals W * mask (no multiply when predicting).
        self._gstep = mask[:, None, :] / E * lr              # [2, 1, F] gradient mask, scale, rate
        self._grad = np.zeros((2, B, F))
        self.P_reuse = np.full((L, E), top_k / n_experts)
        # base features 0..6 [layer, e, 7]; `freq` the decayed frequencies before the (1 - decay) scale
        self.Xb = np.zeros((L, E, N_BASE))
        self.Xb[..., 0] = 1.0
        self.freq = np.zeros((L, E, len(DECAYS)))
        self._decay = np.asarray(DECAYS)
        self._keep = 1.0 - self._decay
        self.co = np.zeros((L, S1, E, E))                    # [c, dd-1, e at c, e2 at c+dd]
        self.cnt = np.zeros((L, E))
        self.execs = np.zeros(L)
        self._marg = np.full((L, E), 1.0 / (E / top_k))      # (cnt + 1) / (execs + E/A) per layer
        self.current = -1                                    # last layer observed in this step
        self.step_used = np.zeros((L, E), dtype=bool)        # this step's routing so far
        # Predictions waiting for their target to route, [target layer, d-1]. Their base features
        # are the target's current row of Xb (it changes only when the target routes), so only what
        # differs per prediction is kept: co-activation (d <= span) and pre-gate columns.
        self.pend_ok = np.zeros((L, L), dtype=bool)
        self.co_pend = np.zeros((L, S1, E, 2))               # features 7, 8 (0, 0 where absent)
        self.pg_pend = np.zeros((L, L, E, 4))                # features 9..12
        self.pg_ok = np.zeros((L, L), dtype=bool)
        self._pg_seen = False
        self.seen = 0
        self.acc_hits = np.zeros(L + 1)                      # by distance d (1..L): top-A recall
        self.acc_total = np.zeros(L + 1)
        self._acc: list = []                                 # (ok, p, y) not yet counted (batched)
        self._tables()
        self.version = 0                                     # bumped when W or pending predictions change
        self._prep = None                                    # (layer, version, P [2, L (d-1), E]) of its pending
        self._due = None                                     # (layer, y, its Xb row before): a step not yet taken

    def _tables(self) -> None:
        """Index tables and strided views, all by "layer c just routed" (built once)."""
        L, E, S, B = self.L, self.E, self.span, self.B
        d = np.arange(L)[None, :] - np.arange(L)[:, None]
        self._dist = np.where(d > 0, d, d + L)               # [c, l]: distances(c)
        self._dist.flags.writeable = False
        self._bkt_d = bucket_of(np.arange(1, L + 1))         # [d-1]: bucket of distance d
        self._onehot = (self._bkt_d[None, :] == np.arange(B)[:, None]).astype(np.float64)   # [B, d-1]
        self._ohS = np.ascontiguousarray(self._onehot[:, :S])
        self._arL = np.arange(L)
        self._pend_at = self._arL[None, :] * L + self._dist - 1   # [c, l]: flat (l, d-1) in pend_ok
        # predict(c) takes every logit from G = Xb @ W0^T [L*E, (head, bucket)]: rows of this
        # prediction (layer l at distance dist[c, l]), then the L pending ones of layer c+1 (d = 1..L)
        row = (self._arL[:, None] * E + np.arange(E)[None, :]) * (2 * B)       # [l, e]
        hb = np.arange(2)[:, None] * B
        now = hb[None, :, :, None] + bucket_of(self._dist)[:, None, :, None] + row[None, None]
        nxt = hb[None, :, :, None] + self._bkt_d[None, None, :, None] + row[(self._arL + 1) % L][:, None, None]
        self._gidx = np.concatenate([now, nxt], axis=2)                         # [c, 2, 2L, E]
        self._co_t = [(c + 1, min(c + S, L - 1) + 1) for c in range(L)]       # coact targets of c
        # strided views (no gathers): co[l - dd, dd - 1] for dd = 1..m, updated when l routes, with
        # step_used[l - dd]; co_pend[c + j, j] for j < n, written when c predicts
        st = np.lib.stride_tricks.as_strided
        co, cp, s8 = self.co, self.co_pend, self.co.itemsize
        self._co_upd = []
        for l in range(L):
            m = min(S, l)
            self._co_upd.append(None if not m else (
                st(co[l - 1, 0], (m, E, E), (-(S - 1) * E * E * s8, E * s8, s8)),
                self.step_used[l - m:l][::-1, :, None]))
        self._cp_diag = [st(cp[c + 1, 0], (t1 - t0, E, 2), ((S + 1) * E * 2 * s8, 2 * s8, s8))
                         if t1 > t0 else None for c, (t0, t1) in enumerate(self._co_t)]

    # ---- learning from what the model routed ---------------------------------------------------
    def begin_step(self) -> None:
        self.current = -1
        self.step_used[:] = False

    def observe(self, layer: int, experts) -> None:
        """Layer `layer` routed to `experts` (ids of any shape; a batch counts as their union)."""
        y = np.zeros(self.E)
        y[np.asarray(experts, dtype=np.int64).reshape(-1)] = 1.0
        used = y > 0
        if layer <= self.current:          # a new step began without begin_step (trace replay)
            self.begin_step()
        # the gradient step reads W, the pending predictions and this row's features before the
        # update below: it is taken when W is next needed (predict, prepare), so a layer whose routing
        # needs no prediction (every expert resident) leaves it to the planning off the critical path
        self._settle()
        xb, f = self.Xb[layer], self.freq[layer]             # views [E, 7], [E, 3]
        self._due = (layer, y, xb.copy())
        xb[:, 2:4] = xb[:, 1:3]                              # lags: 1 -> 2 -> 3 executions ago
        xb[:, 1] = y
        f *= self._decay
        f += y[:, None]
        np.multiply(f, self._keep, out=xb[:, 4:7])
        upd = self._co_upd[layer]
        if upd is not None:  # co-activation with this step's earlier layers (rows not routed add zeros)
            co, before = upd
            co += before & used
        cnt = self.cnt[layer]
        cnt += y
        self.execs[layer] += 1
        np.divide(cnt + 1.0, self.execs[layer] + self.E / self.A, out=self._marg[layer])
        self.step_used[layer] = used
        self.current = layer
        self.seen += 1

    def prepare(self, layer: int) -> None:
        """The forward pass of the predictions pending for `layer` (the part of its learning step
        that does not depend on the routing it will see). predict(layer - 1) already did it; call
        this while the device computes (the runtime does, after planning) so the step after
        observe() only applies the gradient. A stale one (W or pending changed since) is redone."""
        self._settle()
        if len(self._acc) >= 256:
            self._flush_accuracy()
        if self._prep is None or self._prep[:2] != (layer, self.version):
            self._prep = (layer, self.version, self._pending_probs(layer, self.Xb[layer]))

    def _pending_probs(self, t: int, xb: np.ndarray) -> np.ndarray:
        """P [2, L (d-1), E] of target layer t's pending predictions, its base features xb [E, 7]."""
        W, B = self.W, self.B
        Z = np.dot(W[..., :N_BASE].reshape(2 * B, N_BASE), xb.T).reshape(2, B, self.E)[:, self._bkt_d]
        self._add_pending(Z, t)
        return _sigmoid(Z)

    def _add_pending(self, Z: np.ndarray, t: int) -> None:
        """Add to Z [2, L (d-1), E], the base logits of target layer t's pending predictions, their
        co-activation and pre-gate terms."""
        S, W = self.span, self.W
        if S:
            Wc = W[:, self._bkt_d[:S], 7:9, None]                          # [2, S, 2, 1]
            Z[:, :S] += np.matmul(self.co_pend[t], Wc)[..., 0]
        if self._pg_seen and self.pg_ok[t].any():
            r = np.flatnonzero(self.pg_ok[t])
            Z[:, r] += np.einsum("nef,hnf->hne", self.pg_pend[t, r], W[:, self._bkt_d[r], 9:])

    def _settle(self) -> None:
        if self._due is not None:
            layer, y, xb = self._due
            self._due = None
            self._learn(layer, y, xb)

    def _learn(self, t: int, y: np.ndarray, xb: np.ndarray) -> None:
        """One SGD step on the log-loss of every prediction pending for target layer t (routed to
        y [E]; xb [E, 7] its base features then), each distance bucket's gradient summed."""
        prep, self._prep = self._prep, None
        # xb: the row before this routing updated it (prepare() ran before, or runs now on it)
        P = prep[2] if prep is not None and prep[:2] == (t, self.version) else self._pending_probs(t, xb)
        ok = self.pend_ok[t]
        n = int(np.count_nonzero(ok))
        if n:
            R = P - y                                          # [2, d-1, E] residuals
            if n < self.L:
                R *= ok[:, None]
            grad = self._grad
            np.matmul(np.matmul(self._onehot, R), xb, out=grad[..., :N_BASE])
            if self.span:      # features 7, 8 of the first `span` distances (zero where absent)
                np.matmul(self._ohS, np.matmul(R[:, :self.span, None, :], self.co_pend[t])[:, :, 0],
                          out=grad[..., 7:9])
            if self._pg_seen:
                grad[..., 9:] = 0.0
                if self.pg_ok[t].any():
                    r = np.flatnonzero(self.pg_ok[t])
                    grad[..., 9:] = np.matmul(self._onehot[:, r],
                                              np.einsum("hne,nef->hnf", R[:, r], self.pg_pend[t, r]))
            grad *= self._gstep
            self.W -= grad
            self.version += 1
            okd = self._arL if n == self.L else np.flatnonzero(ok)
            self._acc.append((okd, P[1] if n == self.L else P[1, okd], y))   # recall: counted in batches
        ok[:] = False
        self.co_pend[t] = 0.0
        self.pg_ok[t] = False

    def _flush_accuracy(self) -> None:
        """Count the recall of the learned predictions in one batch (integer counts: exact). Top-A
        by repeated argmax: the first maximum each time, as a stable descending sort would order."""
        if not self._acc:
            return
        ok = np.concatenate([a[0] for a in self._acc])                          # [m] d-1
        p = np.concatenate([a[1] for a in self._acc])                           # [m, E]
        y = np.repeat(np.stack([a[2] for a in self._acc]), [len(a[0]) for a in self._acc], axis=0)
        m = np.arange(len(ok))
        hits = np.zeros(len(ok))
        for _ in range(self.A):
            j = p.argmax(axis=1)
            hits += y[m, j]
            p[m, j] = -np.inf
        np.add.at(self.acc_hits, ok + 1, hits)
        np.add.at(self.acc_total, ok + 1, np.minimum(self.A, y.sum(1)))
        self._acc.clear()

    # ---- predicting ----------------------------------------------------------------------------
    def distances(self, c: int) -> np.ndarray:
        """[L] layer-steps from having run layer c to the next execution of every layer."""
        return self._dist[c].copy()

    def distance_row(self, c: int) -> np.ndarray:
        """distances(c) as a read-only view (no copy)."""
        return self._dist[c]

    def predict(self, c: int, pregate: np.ndarray | None = None) -> np.ndarray:
        """P [L, E]: probability of use at each layer's next execution, layer c having just routed
        (route head; the reuse head's answer is left in self.P_reuse).

        `pregate` [L, E] (NaN rows where absent): router probabilities of the later layers applied
        to the current hidden state, scaled so a row sums to top_k (the chance to be picked).
        Also computes, with the same W, the pending predictions of layer c+1 for its learning step
        (nothing changes W before that layer routes)."""
        self._settle()
        L, W, B = self.L, self.W, self.B
        # base logits of every layer against both heads and buckets; each row then takes its bucket
        G = np.dot(self.Xb.reshape(-1, N_BASE), W[..., :N_BASE].reshape(2 * B, N_BASE).T)   # [L*E, 2B]
        Z = G.take(self._gidx[c])                               # [2, L + L, E]: now, pending of c+1
        at = self._pend_at[c]
        self.pend_ok.reshape(-1)[at] = True
        self.version += 1
        if self.span:
            self._coact(c, Z)
        pg = None if pregate is None else self._pregate(c, Z, np.asarray(pregate, dtype=np.float64))
        if pg is None and self._pg_seen:
            self.pg_ok.reshape(-1)[at] = False
        nt = (c + 1) % L
        self._add_pending(Z[:, L:], nt)
        if self.seen < self.warmup:
            self.P_reuse = self._fallback(pg)
            return self.P_reuse
        _sigmoid(Z)
        self._prep = (nt, self.version, Z[:, L:])
        self.P_reuse = Z[0, :L]
        return Z[1, :L]

    def _coact(self, c: int, Z: np.ndarray) -> None:
        """Features 7, 8 of the layers within `span` after c in this step, into the logits Z and the
        pending predictions: log P(e at l' | routing at c) / P(e at l') averaged over c's experts,
        sum_u (co_u + marg) / (cnt_u + 1) = w @ co + marg * sum(w) with w = used / (cnt + 1)."""
        diag = self._cp_diag[c]
        if diag is None:
            return
        t0, t1 = self._co_t[c]
        n = t1 - t0
        used = self.step_used[c]
        k = int(np.count_nonzero(used))
        if not k:
            diag[...] = 0.0
            return
        w = used / (self.cnt[c] + 1.0)                                       # [E]
        marg = self._marg[t0:t1]                                             # [n, E]
        np.log((np.matmul(w, self.co[c, :n]) + marg * w.sum()) / k / marg, out=diag[..., 0])
        diag[..., 1] = 1.0
        Z[:, t0:t1] += np.matmul(diag, self.W[:, self._bkt_d[:n], 7:9, None])[..., 0]

    def _pregate(self, c: int, Z: np.ndarray, pg: np.ndarray) -> np.ndarray | None:
        """Features 9..12 of the rows that have a pre-gate score, into Z and the pending
        predictions; returns pg, or None when no row has one."""
        have = ~np.isnan(pg).any(axis=1)
        if not have.any():
            return None
        self._pg_seen = True
        r = np.flatnonzero(have)
        p = pg[r]
        q = np.clip(p, CLIP, 1.0 - CLIP)
        # in the pre-gate's top_k: the router's own choice, whatever its calibration (measured on the
        # demo model: the logit alone let SGD trade ranking for log-loss, recall at d=1 0.80 -> 0.90)
        rank = np.argsort(np.argsort(-p, axis=1, kind="stable"), axis=1)
        X = np.stack([p, np.ones_like(p), np.log(q / (1.0 - q)), rank < self.A], axis=-1)   # [n, E, 4]
        d = self._dist[c, r]
        Z[:, r] += np.einsum("nef,hnf->hne", X, self.W[:, self._bkt_d[d - 1], 9:])
        self.pg_ok.reshape(-1)[self._pend_at[c]] = have
        self.pg_pend[r, d - 1] = X
        return pg

    def _fallback(self, pg: np.ndarray | None) -> np.ndarray:
        """Before `warmup` executions: the pre-gate where there is one, else the decayed frequency."""
        p = np.clip(self.Xb[..., 5], 0.0, 1.0)              # decayed frequency (0.9)
        if pg is not None:
            have = ~np.isnan(pg).any(axis=1)
            p[have] = np.clip(pg[have], 0.0, 1.0)
        return p

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
