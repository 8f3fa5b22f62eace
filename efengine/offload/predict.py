"""Predictors: the probability that each expert is used at its layer's next execution.

Legend: L MoE layers (MoE order), E experts per layer, F features, B distance buckets, S co-activation
span (layers), H heads (2).

Time runs in layer-steps (decode: token-major, layer-minor). After layer c of a step has routed,
the next execution of layer l' is this step's when l' > c and the next step's otherwise; its
distance is d = l' - c (or l' - c + L). `HybridPredictor.predict(c)` returns P [L, E] for those
next executions.

The model is a logistic regression per distance bucket over a few features per (layer, expert)
candidate, learned online from the routing the model actually takes (numpy only):
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

Learning: once per step (a token in decode), every layer t routed in it against its predictions
at every distance d = 1..L (made after layer t - d: in this step for d <= t, else in the previous
one; base features: t's row when the step began), all evaluated with the step's W. Predictions
that differ only by their bucket (no co-activation or pre-gate term) are one example counted as
many times as the distances they stand for. Each weight moves by lr * g / (h + damp), g its
gradient and h its entry of the Hessian diagonal (sum p (1 - p) x^2): a damped Newton step per
weight. Measured (misses/token by eviction alone, summed over gsm8k_2 and humaneval_2 at
25/50/75% cache / the demo model's at 50% cache with real hidden states, offload_bench): SGD once
per layer at lr 0.05 (the previous learner) 150.09 / 8.73; its gradient summed once per step
166.2 at lr 0.05 (one step adds 32 layers' gradients and overshoots), 150.67 at lr 0.005; this
step 149.81 / 9.28. Per-layer SGD at its large rate tracked drift from token to token, which the
demo model rewards: a full-Hessian step held near W by a proximal term (lr 0.7, 160 |dW|^2 / 2)
gets 8.71 there but 150.83 on the traces (24.84 on gsm8k_2 at 50%, above the per-layer frequency
eviction's 24.81) and 0.999 recall where a perfect pre-gate allows 1.0.

Host cost: the runtime predicts between a layer's router read-back and its experts' launch (a
miss's victim needs it), so a layer computes only what its routing changes. Q [L, E, H, B] holds
exp(-base logit) of every expert at every head and bucket on its current features, which change
only when its layer routes (W only at step ends): observe() rewrites one row (a dot and an exp),
predict(c) gathers each layer's bucket, multiplies in co-activation for the next S layers and
takes 1 / (1 + Q). Co-activation statistics are folded in at step ends: a layer reads its own row
of them before its targets route, so the features equal those of per-layer updates exactly.
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
STEP, DAMP = 0.1, 0.1     # the learning step: lr * gradient / (Hessian diagonal + damp) (_learn_step)


def bucket_of(d: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKET_EDGES), d, side="left")


def _ahead(x: np.ndarray, S: int) -> np.ndarray:
    """x [L + S, E] -> a view [L, S, E] whose row (c, dd-1) is x[c + dd]."""
    return np.lib.stride_tricks.sliding_window_view(x[1:], S, axis=0).transpose(0, 2, 1)


def _top_hits(p: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """p [T, E, J] scores, y [T, E] 0/1: how many of each (t, j)'s top-k y holds -> [T, J]. Top-k
    by repeated argmax: the first maximum, so ties go to the lower expert id as in a stable sort."""
    T, E, J = p.shape
    q = p.transpose(0, 2, 1).reshape(T * J, E)               # a copy: rows (t, j)
    first = np.arange(T * J) * E
    ty = first // J // E * E                                 # row (t, j) -> t's first index in y
    yf = y.reshape(-1)
    hits = np.zeros(T * J)
    for _ in range(k):
        j = q.argmax(1)
        hits += yf.take(ty + j)
        q.reshape(-1)[first + j] = -np.inf
    return hits.reshape(T, J)


class HybridPredictor:
    """Online-learned expert predictor fusing routing history and (when given) pre-gate scores."""

    def __init__(self, n_layers: int, n_experts: int, top_k: int, *, lr: float = STEP, damp: float = DAMP,
                 coact_span: int = 4, warmup: int | None = None):
        if n_layers < 1 or n_experts < 1 or not 0 < top_k <= n_experts:
            raise ConfigError(f"predictor: bad shape L={n_layers} E={n_experts} top_k={top_k}")
        L, E, F = n_layers, n_experts, len(FEATURES)
        self.L, self.E, self.A, self.F = L, E, top_k, F
        self.lr, self.damp = lr, damp
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
        self._gmask = mask[:, None, :] * lr                  # [2, 1, F] gradient mask and step
        self._grad = np.zeros((2, B, F))
        self._hess = np.zeros((2, B, F))                     # the diagonal of the log-loss Hessian
        self.P_reuse = np.full((L, E), top_k / n_experts)
        # Base features 0..6 [layer, e, 7] as they were when this step began (what its predictions
        # of that layer were made from); the step's routing is folded in when it ends. A routing y
        # maps a row to row @ M + y (x) v: lags shift, frequencies decay and gain (1 - decay) if used.
        # _Xa [L + S, E, 8] holds Xb [L, E, 7] and this step's routing Y [L, E] (0/1) side by side,
        # so [xb, y] @ Ma is the row after the routing; rows L.. stay zero (Y past the step's end)
        self._Xa = np.zeros((L + S, E, N_BASE + 1))
        self.Xb, self.Y = self._Xa[:L, :, :N_BASE], self._Xa[:L, :, N_BASE]
        self.Xb[..., 0] = 1.0
        self._Ma = np.zeros((N_BASE + 1, N_BASE))
        self._Ma[0, 0] = self._Ma[1, 2] = self._Ma[2, 3] = 1.0
        self._Ma[4:7, 4:7] = np.diag(DECAYS)
        self._Ma[N_BASE, 1], self._Ma[N_BASE, 4:7] = 1.0, 1.0 - np.asarray(DECAYS)
        # exp(-base logit) [layer, e, head, bucket] on the features after the layer's last routing:
        # a probability is 1 / (1 + Q), and a logit term a multiplies Q by exp(-a)
        self.Q = np.ones((L, E, 2, B))
        self._Q2 = self.Q.reshape(L, E, 2 * B)
        self.kc = np.zeros(L, dtype=np.int64)                # distinct experts per layer this step (0: not yet)
        self.co = np.zeros((L, E, S1, E))                    # [c, e at c, dd-1, e2 at c+dd] co-use counts
        self.cnt = np.zeros((L, E))
        self.execs = np.zeros(L)
        self._imarg = np.zeros((L + S, E))                   # 1 / marg: (execs + E/A) / (cnt + 1); 0 past L
        self._imarg[:L] = E / top_k
        if S:       # views on _Xa's Y and _imarg: [c, dd-1, e] is layer c + dd's (0 past the step)
            self._y_ahead, self._im_ahead = _ahead(self._Xa[:, :, N_BASE], S), _ahead(self._imarg, S)
        self._A2 = np.zeros((L, E, S1 * E))                  # co-activation lookup of this step (_co_tables)
        self.current = -1                                    # last layer observed in this step
        self.step = 0
        self._open = False                                   # the step routed something not learned yet
        self._prev = False                                   # a step was learned (its predictions exist)
        # pre-gate features of the predictions of every target layer at every distance, by the
        # parity of the step the target runs in (a step's targets are learned at its end, while the
        # next step's are being predicted)
        self.pg_pend = np.zeros((2, L, L, E, 4))             # [parity, target, d-1, e, feature 9..12]
        self.pg_ok = np.zeros((2, L, L), dtype=bool)
        self._pg_seen = False
        self.seen = 0
        self.acc_hits = np.zeros(L + 1)                      # by distance d (1..L): top-A recall
        self.acc_total = np.zeros(L + 1)
        self._acc: list = []                                 # (p, y, ok, spread) of steps not yet counted
        self._tables()
        self._co_tables()
        self._new_weights()

    def _tables(self) -> None:
        """Index tables, all built once."""
        L, E, S, B = self.L, self.E, self.span, self.B
        d = np.arange(L)[None, :] - np.arange(L)[:, None]
        self._dist = np.where(d > 0, d, d + L)               # [c, l]: distances(c)
        self._dist.flags.writeable = False
        self._bkt_d = bucket_of(np.arange(1, L + 1))         # [d-1]: bucket of distance d
        self._onehot = (self._bkt_d[:, None] == np.arange(B)[None, :]).astype(np.float64)   # [d-1, B]
        # predict(c): Q [h, l, e] = self.Q[l, e, h, bucket of l's distance from c], one gather
        base = (np.arange(L)[:, None] * E + np.arange(E)[None, :]) * 2               # [l, e]
        h = np.arange(2)[:, None, None]
        self._gidx = np.stack([(base[None] + h) * B + bucket_of(self._dist[c])[None, :, None]
                               for c in range(L)])                                  # [c, 2, L, E]
        self._co_n = [min(S, L - 1 - c) * E for c in range(L)]   # co-activation targets: c+1.. (x E)
        self._logk = np.log(np.maximum(np.arange(E + 1), 1))
        # learning: examples (t, d) made after layer t - d of this step (d <= t) or of the previous one
        t, dd = np.arange(L)[:, None], np.arange(1, L + 1)[None, :]
        self._ok = [(dd <= t).astype(np.float64), np.ones((L, L))]   # [t, d-1], without / with a previous step
        self._cols: dict = {}                                # D -> learning columns (_learn_cols)
        if S:
            ds = np.arange(1, S + 1)[None, :]
            self._hasco = (ds <= t).astype(np.float64)                              # [t, d-1]
            self._co_c = np.maximum(t - ds, 0)                                      # [t, d-1]: c = t - d
            # [c, d-1, e] -> [d-1, t e]: the co-activation feature of target t at distance d
            self._co_src = ((self._co_c * S + ds - 1).T[:, :, None] * E + np.arange(E)).reshape(S, L * E)
            self._hasco_te = np.repeat(self._hasco.T, E, axis=1)                     # [d-1, t e]
            self._bkt_rep = np.repeat(self._bkt_d[:S], E)                           # [(dd-1, e2)] bucket

    def _learn_cols(self, D: int) -> tuple:
        """The learning step's columns j for examples with terms of their own at d = 1..D: their
        buckets (distances 1..D, then one column per bucket for the rest), fold [j, b] into buckets,
        and spread [d-1, j] (the column of each distance)."""
        got = self._cols.get(D)
        if got is None:
            L, B = self.L, self.B
            cols = np.concatenate([self._bkt_d[:D], np.arange(B)])
            fold = np.concatenate([self._onehot[:D], np.eye(B)])                  # [D + B, B]
            spread = np.concatenate([np.eye(L)[:, :D], np.concatenate([np.zeros((D, B)), self._onehot[D:]])], axis=1)
            got = self._cols[D] = (cols, fold, spread)
        return got

    def _co_tables(self) -> None:
        """A2 [c, u, (dd-1, e2)] = (co / marg(c + dd) + 1) / (cnt(c) + 2): a step's feature is then
        log(w @ A2[c]) with w = used at c / k (k experts), the mean over c's experts of
        (co + marg) / (cnt + 1) / marg, cnt counting this step's use of u (hence + 2)."""
        if not self.span:
            return
        L, E, S = self.L, self.E, self.span
        A2 = self._A2.reshape(L, E, S, E)
        np.multiply(self.co, self._im_ahead[:, None], out=A2)                # 1 / marg(c + dd)
        A2 += 1.0
        A2 *= (1.0 / (self.cnt + 2.0))[:, :, None, None]

    def _new_weights(self) -> None:
        """W changed: Q and the co-activation factors follow."""
        L, E, B = self.L, self.E, self.B
        self._nW = nW = -np.ascontiguousarray(self.W[..., :N_BASE].reshape(2 * B, N_BASE).T)   # [7, 2B]
        self._MaW = self._Ma @ nW                                  # [xb, y] -> minus logits after y
        np.dot(self.Xb.reshape(L * E, N_BASE), nW, out=self.Q.reshape(L * E, 2 * B))
        np.exp(self.Q, out=self.Q)
        if self.span:   # co-activation multiplies Q by mean^-w7 exp(-w8) = (k mean)^-w7 k^w7 exp(-w8)
            self._w78 = self.W[1, self._bkt_d[:self.span], 7:9]            # [d-1, 2] (learning)
            w7 = self.W[1, self._bkt_rep, 7]                              # [(dd-1, e2)]
            self._nw7 = -w7
            self._ew8k = np.exp(np.multiply.outer(self._logk, w7) - self.W[1, self._bkt_rep, 8])

    # ---- learning from what the model routed ---------------------------------------------------
    def begin_step(self) -> None:
        if self._open:
            self._finish_step()
        if self.current >= 0:
            self.step += 1
        self.current = -1
        self.Y[:] = 0.0
        self.kc[:] = 0

    def observe(self, layer: int, experts) -> None:
        """Layer `layer` routed to `experts` (ids of any shape; a batch counts as their union)."""
        ids = np.asarray(experts, dtype=np.int64).reshape(-1)
        if layer <= self.current:          # a new step began without begin_step (trace replay)
            self.begin_step()
        y = self.Y[layer]
        y[ids] = 1.0
        self.kc[layer] = np.count_nonzero(y)
        q = self._Q2[layer]                  # exp(-logits) of the row after this routing
        np.dot(self._Xa[layer], self._MaW, out=q)
        np.exp(q, out=q)
        self.current = layer
        self.seen += 1
        self._open = True

    def prepare(self, layer: int) -> None:
        """The runtime calls this off the critical path (after planning, while the device computes)
        with the next layer to route: when that layer begins a new step, this step learns now."""
        if self._open and layer <= self.current:
            self._finish_step()

    def _finish_step(self) -> None:
        """Learn from the step, then fold its routing into the features and statistics."""
        self._open = False
        self._learn_step()
        L, E, S, Y = self.L, self.E, self.span, self.Y
        routed = self.kc > 0
        new = np.dot(self._Xa[:L].reshape(L * E, N_BASE + 1), self._Ma).reshape(L, E, N_BASE)
        if routed.all():
            self.Xb[...] = new
        else:
            np.copyto(self.Xb, new, where=routed[:, None, None])
        if S:                                                # co-use of (c, u) and (c + dd, e2)
            c, u = np.nonzero(Y)
            self.co[c, u] += self._y_ahead[c]
        self.cnt += Y
        self.execs += routed
        np.divide((self.execs + E / self.A)[:, None], self.cnt + 1.0, out=self._imarg[:L])
        self._co_tables()
        self._new_weights()

    def _learn_step(self) -> None:
        """One learning step on the log-loss of every prediction of the layers routed this step:
        target t against its predictions at every distance d = 1..L (base features: t's row when the
        step began), each distance bucket's sum; the recall of each prediction counted."""
        routed = self.kc > 0
        if not routed.any():
            return
        L, E, B, S, W = self.L, self.E, self.B, self.span, self.W
        par = self.step % 2
        has_pg = self._pg_seen and bool(self.pg_ok[par].any())
        D = S                                                # distances with terms of their own: 1..D
        if has_pg:
            D = max(S, int(np.flatnonzero(self.pg_ok[par].any(0))[-1]) + 1)
        cols, fold, spread = self._learn_cols(D)
        J = D + B
        ok = self._ok[self._prev] if routed.all() else self._ok[self._prev] * routed[:, None]   # [t, d-1] made
        n = np.dot(ok, spread)                               # [t, j] how many predictions a column stands for
        Xb = np.ascontiguousarray(self.Xb.reshape(L * E, N_BASE))
        # minus logits [t, e, h, j]: distances 1..D, then one column per bucket for the rest
        Z = np.dot(Xb, self._nW.reshape(N_BASE, 2, B)[:, :, cols].reshape(N_BASE, 2 * J)).reshape(L, E, 2, J)
        C = self._coact_features(routed) if S else None     # [feature 7 | 8, d-1, t e]
        if S:
            term = C[0] * self._w78[:, 0, None]
            term += C[1] * self._w78[:, 1, None]
            Z[:, :, 1, :S] -= term.T.reshape(L, E, S)
        pgx = self.pg_pend[par, :, :D] if has_pg else None  # [t, d-1, e, 4] (zero where absent)
        if pgx is not None:
            Z[..., :D] -= np.einsum("tdef,hdf->tehd", pgx, W[:, self._bkt_d[:D], 9:])
        np.exp(Z, out=Z)
        Z += 1.0
        P = np.reciprocal(Z, out=Z)
        # gradient and Hessian diagonal of sum n log-loss: residuals n (P - y), curvatures n P (1 - P)
        Pn = (P.reshape(L, 2 * E, J) * n[:, None, :]).reshape(L, E, 2, J)
        Vn = Pn * (1.0 - P)
        yn = self.Y[:, :, None] * n[:, None, :]             # [t, e, j] (the same in every head)
        self._grad[...] = self._hess[...] = 0.0
        self._base_terms(Pn, Vn, yn, fold, Xb)
        if S:
            self._coact_terms(Pn[:, :, 1, :S] - yn[:, :, :S], Vn[:, :, 1, :S], C)
        if pgx is not None:
            self._pregate_terms(Pn[..., :D] - yn[:, :, None, :D], Vn[..., :D], pgx)
            self.pg_pend[par] = 0.0
            self.pg_ok[par] = False
        # Each weight moves by lr * g / (h + damp), its own curvature h: one SGD rate for all did not
        # fit a step that sums 32 layers' gradients (0.05 overshot, 0.005 left the co-activation
        # weights behind: recall at d=1 0.42 instead of 0.44)
        g, h = self._grad, self._hess
        g *= self._gmask                                     # (the reuse head has no co-activation)
        h += self.damp
        g /= h
        W -= g
        self._count_recall(P[:, :, 1], ok, spread)
        self._prev = True

    def _base_terms(self, Pn: np.ndarray, Vn: np.ndarray, yn: np.ndarray, fold: np.ndarray,
                    Xb: np.ndarray) -> None:
        """Features 0..6 (every example): gradient and Hessian diagonal, folded into buckets."""
        L, E, B = self.L, self.E, self.B
        J = fold.shape[0]
        Rb = np.dot(Pn.reshape(-1, J), fold).reshape(L * E, 2, B)
        Rb -= np.dot(yn.reshape(-1, J), fold).reshape(L * E, 1, B)
        self._grad[..., :N_BASE] = np.dot(Rb.reshape(L * E, 2 * B).T, Xb).reshape(2, B, N_BASE)
        Vb = np.dot(Vn.reshape(-1, J), fold).reshape(L * E, 2 * B)                # [t e, h b]
        self._hess[..., :N_BASE] = np.dot(Vb.T, Xb * Xb).reshape(2, B, N_BASE)

    def _coact_terms(self, r: np.ndarray, v: np.ndarray, C: np.ndarray) -> None:
        """Features 7, 8 (route head, d <= S): r residuals, v curvatures [t, e, d-1], C [2, d-1, t e]."""
        L, E, S = self.L, self.E, self.span
        oh = self._onehot[:S]
        rT, vT = r.reshape(L * E, S).T, v.reshape(L * E, S).T                    # [d-1, t e]
        self._grad[1, :, 7:9] = np.dot(oh.T, (C * rT).sum(2).T)
        self._hess[1, :, 7:9] = np.dot(oh.T, (C * C * vT).sum(2).T)

    def _pregate_terms(self, r: np.ndarray, v: np.ndarray, pgx: np.ndarray) -> None:
        """Features 9..12 (pre-gate scores, d <= D): r residuals, v curvatures [t, e, h, d-1], pgx
        [t, d-1, e, 4]."""
        L, E, D = self.L, self.E, r.shape[3]
        oh = self._onehot[:D]
        px = pgx.transpose(3, 1, 0, 2).reshape(4, D, L * E)                      # [f, d-1, t e]
        rT = r.transpose(2, 3, 0, 1).reshape(2, D, L * E)
        vT = v.transpose(2, 3, 0, 1).reshape(2, D, L * E)
        self._grad[..., 9:] = np.dot((px[None] * rT[:, None]).sum(3), oh).transpose(0, 2, 1)   # [h, b, 4]
        self._hess[..., 9:] = np.dot((px[None] * px[None] * vT[:, None]).sum(3), oh).transpose(0, 2, 1)

    def _count_recall(self, p: np.ndarray, ok: np.ndarray, spread: np.ndarray) -> None:
        """Top-A recall of the route head's predictions p [t, e, j] (columns spread over distances
        d-1), ok [t, d-1] those made. Counted every 16 steps in one batch (integer counts: exact)."""
        if self._acc and (len(self._acc) >= 16 or self._acc[-1][3] is not spread):
            self._flush_recall()
        self._acc.append((p, self.Y.copy(), ok, spread))
        self.acc_total[1:] += np.dot(np.minimum(self.A, self.kc), ok)

    def _flush_recall(self) -> None:
        if not self._acc:
            return
        p, y, ok, spread = zip(*self._acc)
        hits = _top_hits(np.concatenate(p), np.concatenate(y), self.A).reshape(len(p), self.L, -1)
        if all(o is self._ok[1] for o in ok):                # every prediction made: no mask
            self.acc_hits[1:] += np.dot(hits.sum((0, 1)), spread[0].T)
        else:
            self.acc_hits[1:] += (np.matmul(hits, spread[0].T) * np.stack(ok)).sum((0, 1))
        self._acc.clear()

    def _coact_features(self, routed: np.ndarray) -> np.ndarray:
        """Features 7, 8 of this step's predictions within the span, [2, d-1, t e]: the values
        predict() used after layer t - d (0 where it had none)."""
        w = self.Y / np.maximum(self.kc, 1)[:, None]                             # [c, u] used / k
        v = np.matmul(w[:, None, :], self._A2)[:, 0]                             # [c, (dd-1, e2)]
        hc = self._hasco_te
        if not routed.all():
            v[~routed] = 1.0                                 # log 1 = 0 where c did not route
            hc = hc * np.repeat(routed[self._co_c].T, self.E, axis=1)
        C = np.empty((2,) + hc.shape)
        np.log(v).reshape(-1).take(self._co_src, out=C[0])
        C[0] *= hc
        C[1] = hc
        return C

    def reset_accuracy(self) -> None:
        self._settle()
        self._acc.clear()
        self.acc_hits[:] = 0
        self.acc_total[:] = 0

    def accuracy_by_distance(self) -> dict[int, float]:
        """Top-A recall of the predictions made d layer-steps ahead (d -> fraction), over the steps
        learned so far (a step is learned when the next begins, or here once every layer routed)."""
        self._settle()
        self._flush_recall()
        return {d: round(float(self.acc_hits[d] / self.acc_total[d]), 4)
                for d in range(1, self.L + 1) if self.acc_total[d] > 0}

    def _settle(self) -> None:
        if self._open and (self.kc > 0).all():
            self._finish_step()

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
        to the current hidden state, scaled so a row sums to top_k (the chance to be picked)."""
        Q = self.Q.take(self._gidx[c])                           # [2, L, E] exp(-base logit)
        if self.span and self.kc[c]:
            self._coact(c, Q[1].reshape(-1))
        pg = None if pregate is None else self._pregate(c, Q, np.asarray(pregate, dtype=np.float64))
        if self.seen < self.warmup:
            self.P_reuse = self._fallback(pg)
            return self.P_reuse
        Q += 1.0
        np.reciprocal(Q, out=Q)
        self.P_reuse = Q[0]
        return Q[1]

    def _coact(self, c: int, q: np.ndarray) -> None:
        """Features 7, 8 of the layers within `span` after c in this step into the route head's q
        [L*E]: log P(e at l' | routing at c) / P(e at l') averaged over c's experts."""
        n = self._co_n[c]
        if not n:
            return
        v = np.dot(self.Y[c], self._A2[c, :, :n])                # [(dd-1, e2)] k * mean
        np.power(v, self._nw7[:n], out=v)
        v *= self._ew8k[self.kc[c], :n]
        q[(c + 1) * self.E:(c + 1) * self.E + n] *= v

    def _pregate(self, c: int, Q: np.ndarray, pg: np.ndarray) -> np.ndarray | None:
        """Features 9..12 of the rows that have a pre-gate score, into Q (and, right after layer c
        routed, kept for the learning step); returns pg, or None when no row has one."""
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
        Q[:, r] *= np.exp(-np.einsum("nef,hnf->hne", X, self.W[:, self._bkt_d[d - 1], 9:]))
        if c == self.current:       # targets after c run in this step, the others in the next one
            par = (self.step + (r <= c)) % 2
            self.pg_pend[par, r, d - 1] = X
            self.pg_ok[par, r, d - 1] = True
        return pg

    def _fallback(self, pg: np.ndarray | None) -> np.ndarray:
        """Before `warmup` executions: the pre-gate where there is one, else the decayed frequency."""
        f = self.Xb[..., 5]                                  # decayed frequency (0.9), then this step's
        p = np.clip(np.where(self.kc[:, None] > 0, f * DECAYS[1] + self.Y * (1.0 - DECAYS[1]), f), 0.0, 1.0)
        if pg is not None:
            have = ~np.isnan(pg).any(axis=1)
            p[have] = np.clip(pg[have], 0.0, 1.0)
        return p


def pregate_probs(logits, top_k: int, xp=np):
    """Router logits [T, E] of a later layer on the current hidden state -> chance to be picked [E]
    by any of the T tokens: 1 - (1 - softmax)^top_k per token (picked in top_k draws; keeps the
    router's order, unlike a cap at 1), then 1 - prod(1 - p) over tokens. Computed through
    log1p / expm1: written directly, a sharp router's unlikely experts (softmax below ~1e-16) all
    round to exactly 0 and tie, and the pre-gate's top-k feature would then break ties by expert id.
    xp: the array module of `logits` (a prompt's logits are reduced on the device)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = xp.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):                        # p == 1: log 0 = -inf -> probability 1
        log_miss = top_k * xp.log1p(-xp.minimum(p, 1.0))      # log (1 - p)^top_k per token
    return -xp.expm1(log_miss.sum(axis=0))


def pregate_topk(logits, top_k: int, xp=np):
    """The experts a later layer's router would pick for the current hidden state (union over T).
    On a device (xp not numpy): experts at or above some token's k-th largest logit, by a sort
    (CuPy compiles its partition kernel anew for each row count: a prompt length)."""
    if xp is np:
        return np.unique(np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k])
    kth = xp.sort(logits, axis=-1)[:, -top_k]
    return xp.flatnonzero((logits >= kth[:, None]).any(axis=0))
