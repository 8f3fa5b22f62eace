"""HybridPredictor against a direct implementation of its definition (offload/predict.py).

The predictor keeps a table of exp(-logits), folds a step's routing and co-activation counts into
its statistics only when the step ends, and learns from one example per distance bucket where
several distances share every feature. The reference here recomputes every feature from the full
routing history, updates co-activation counts as each layer routes, and learns from every
(target, distance) prediction one by one: predictions, weights and recall must agree.
"""
from __future__ import annotations

import numpy as np
import pytest

from efengine.offload.predict import BUCKET_EDGES, CLIP, DECAYS, HybridPredictor

L, E, A, S = 10, 6, 2, 3


def bucket(d: int) -> int:
    return int(np.searchsorted(BUCKET_EDGES, d, side="left"))


def sig(z):
    return 1.0 / (1.0 + np.exp(-z))


class Reference:
    def __init__(self, W: np.ndarray, lr: float, damp: float, warmup: int):
        self.W, self.lr, self.damp, self.warmup = W.copy(), lr, damp, warmup
        self.hist = [[] for _ in range(L)]                  # every routing of each layer, 0/1 [E]
        self.co = np.zeros((L, S + 1, E, E))
        self.cnt = np.zeros((L, E))
        self.execs = np.zeros(L)
        self.step, self.cur, self.seen = 0, {}, 0
        self.coact = {}                                     # (step, c, t) -> feature 7 [E]
        self.pg = {}                                        # (step the target runs in, t, d) -> [E, 4]
        self.hits, self.total = np.zeros(L + 1), np.zeros(L + 1)

    def feats(self, l: int, n: int | None = None) -> np.ndarray:
        """Base features [E, 7] from layer l's first n routings (all by default)."""
        h = self.hist[l][:n] if n is not None else self.hist[l]
        x = np.zeros((E, 7))
        x[:, 0] = 1.0
        for i in range(1, 4):
            if len(h) >= i:
                x[:, i] = h[-i]
        for k, dk in enumerate(DECAYS):
            x[:, 4 + k] = sum((1 - dk) * dk ** j * y for j, y in enumerate(reversed(h)))
        return x

    def observe(self, c: int, ids) -> None:
        y = np.zeros(E)
        y[list(ids)] = 1.0
        self.hist[c].append(y)
        self.cur[c] = y
        for dd in range(1, min(S, c) + 1):                  # counts as each layer routes
            if c - dd in self.cur:
                self.co[c - dd, dd] += np.outer(self.cur[c - dd], y)
        self.cnt[c] += y
        self.execs[c] += 1
        self.seen += 1
        for t in range(c + 1, min(c + S, L - 1) + 1):       # features 7 as they stand after c routed
            w = y / (self.cnt[c] + 1.0)
            marg = (self.cnt[t] + 1.0) / (self.execs[t] + E / A)
            self.coact[self.step, c, t] = np.log((w @ self.co[c, t - c] + marg * w.sum()) / y.sum() / marg)

    def predict(self, c: int, pregate=None):
        P = np.zeros((2, L, E))
        for l in range(L):
            d = l - c if l > c else l - c + L
            b, x = bucket(d), self.feats(l)
            z = x @ self.W[:, b, :7].T                       # [E, 2]
            if 0 < l - c <= S:
                z[:, 1] += self.W[1, b, 7] * self.coact[self.step, c, l] + self.W[1, b, 8]
            if pregate is not None and not np.isnan(pregate[l]).any():
                p = pregate[l]
                q = np.clip(p, CLIP, 1 - CLIP)
                top = np.zeros(E)
                top[np.argsort(-p, kind="stable")[:A]] = 1.0
                X = np.stack([p, np.ones(E), np.log(q / (1 - q)), top], axis=1)
                z += X @ self.W[:, b, 9:].T
                self.pg[self.step + (l <= c), l, d] = X
            P[:, l] = sig(z).T
        if self.seen < self.warmup:
            f = np.clip(np.array([self.feats(l)[:, 5] for l in range(L)]), 0, 1)
            if pregate is not None:
                have = ~np.isnan(pregate).any(1)
                f[have] = np.clip(pregate[have], 0, 1)
            return f, f
        return P[1], P[0]

    def end_step(self) -> None:
        grad, hess = np.zeros_like(self.W), np.zeros_like(self.W)
        for t, y in self.cur.items():
            x0 = self.feats(t, len(self.hist[t]) - 1)       # before this step's routing
            for d in range(1, L + 1):
                if d > t and self.step == 0:
                    continue                                 # made in a step that never ran
                b = bucket(d)
                X = np.concatenate([x0, np.zeros((E, 6))], axis=1)
                if d <= min(S, t):
                    X[:, 7], X[:, 8] = self.coact[self.step, t - d, t], 1.0
                if (self.step, t, d) in self.pg:
                    X[:, 9:] = self.pg[self.step, t, d]
                for h in (0, 1):
                    w = self.W[h, b].copy()
                    if h == 0:
                        w[7:9] = 0.0
                    p = sig(X @ w)
                    Xh = X.copy()
                    if h == 0:
                        Xh[:, 7:9] = 0.0
                    grad[h, b] += (p - y) @ Xh
                    hess[h, b] += (p * (1 - p)) @ (Xh * Xh)
                    if h == 1:
                        top = np.argsort(-p, kind="stable")[:A]
                        self.hits[d] += y[top].sum()
                        self.total[d] += min(A, y.sum())
        self.W -= self.lr * grad / (hess + self.damp)
        self.step += 1
        self.cur = {}


def routing(n: int, seed: int) -> np.ndarray:
    """[n, L, A]: each layer repeats its previous token's experts half the time, else a random pair
    whose first expert follows the layer before (co-activation to learn)."""
    rng = np.random.default_rng(seed)
    r = np.zeros((n, L, A), dtype=np.int64)
    for t in range(n):
        for l in range(L):
            if t and rng.random() < 0.5:
                r[t, l] = r[t - 1, l]
            else:
                first = (r[t, l - 1, 0] + 1) % E if l else rng.integers(E)
                r[t, l] = [first, (first + 1 + rng.integers(E - 1)) % E]
    return r


@pytest.mark.parametrize("with_pregate", [False, True])
def test_predictor_matches_its_definition(with_pregate):
    r = routing(14, seed=5)
    rng = np.random.default_rng(6)
    p = HybridPredictor(L, E, A, coact_span=S, warmup=2 * L)
    ref = Reference(p.W, p.lr, p.damp, p.warmup)
    for t in range(r.shape[0]):
        p.begin_step()
        if t:
            ref.end_step()
        for c in range(L):
            p.observe(c, r[t, c])
            ref.observe(c, r[t, c])
            pg = None
            if with_pregate and c % 3:                       # some layers give scores for a few rows
                pg = np.full((L, E), np.nan)
                rows = [l for l in range(c + 1, c + 4) if l < L] + [l for l in (0, c) if l <= c and c % 3 == 2]
                pg[rows] = rng.random((len(rows), E))
            got, want = p.predict(c, pg), ref.predict(c, pg)
            np.testing.assert_allclose(got, want[0], rtol=1e-9, atol=1e-12, err_msg=f"token {t} layer {c}")
            np.testing.assert_allclose(p.P_reuse, want[1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(p.W, ref.W, rtol=1e-9, atol=1e-12, err_msg=f"after token {t - 1}")
    ref.end_step()
    acc = p.accuracy_by_distance()                           # learns the last (complete) step first
    np.testing.assert_allclose(p.W, ref.W, rtol=1e-9, atol=1e-12)
    assert acc == {d: round(ref.hits[d] / ref.total[d], 4) for d in range(1, L + 1)}
    assert (p.W[0, :, 7:9] == 0).all() and not np.signbit(p.W[0, :, 7:9]).any()
    assert (p.W[1, :, 7:9] != 0).any()                       # co-activation was learned
    assert ((p.W[:, :, 9:] != ref.W[:, :, 9:]).any() or not with_pregate)


def test_learning_waits_for_the_step_and_prepare_takes_it():
    """The runtime calls prepare(next layer) after planning: the step that just ended learns
    there (off the critical path), once; observe of the next step does not learn again."""
    r = routing(3, seed=1)
    p = HybridPredictor(L, E, A, coact_span=S)
    for c in range(L):
        p.observe(c, r[0, c])
        p.predict(c)
        before = p.W.copy()
        p.prepare((c + 1) % L)
        assert (p.W == before).all() == (c < L - 1)
    after = p.W.copy()
    p.begin_step()
    p.observe(0, r[1, 0])
    assert (p.W == after).all()
