"""Named offload policies and the expertflow two-level eviction.

  ondemand    LRU eviction, load on miss, no prefetch: the baseline stall ratios are taken against.
  pregate     LRU eviction; after layer l, layer l+1's router applied to layer l's hidden state
              names the experts to prefetch (Mixtral-offloading style).
  expertflow  hybrid predictor (pre-gate + routing history, learned online) over an adaptive
              horizon S (horizon.py); two-level eviction: experts predicted inside the horizon
              and those the current layer uses are protected, victims come from the unprotected
              tier first, chosen by predicted next-use distance (or LRU / frequency, to compare).

Every policy is lossless: it decides where weights are and when, never what is computed.
`route_bias` (lossy, opt-in) is separate and changes routing on purpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .cache import LRU, DecayedFrequency, Eviction, _argmax, _argmin, make_eviction
from .predict import HybridPredictor

POLICIES = ("ondemand", "pregate", "expertflow")
INNER = ("score", "lru", "freq")


class ExpertflowEviction(Eviction):
    """Two-level eviction driven by a predictor.

    Each candidate's expected next use, in layer-steps, is T = alpha * d + L * (1/p - 1): d to its
    layer's next execution, then a geometric wait of 1/p executions (p: predicted probability of
    use at each). Protected: the n_l most likely experts of every layer l within `horizon`
    layer-steps (and, through the cache's pins, what the current layer uses); n_l is top_k, or in a
    step of many tokens the pre-gate's expected count of distinct experts. The victim is the unprotected
    candidate with the largest T (inner="score"), or the least recent (lru) or least frequent
    (freq) one; only when every candidate is protected does the largest T among them leave.
    """

    def __init__(self, predictor: HybridPredictor, horizon: int | Callable[[], int] = 8,
                 inner: str = "score", alpha: float = 2.0, protect: bool = True, p_min: float = 0.01):
        if inner not in INNER:
            raise ConfigError(f"expertflow inner eviction must be one of {', '.join(INNER)}, got {inner!r}")
        self.predictor, self.horizon, self.inner = predictor, horizon, inner
        self.alpha, self.protect, self.p_min = alpha, protect, p_min
        self.name = "expertflow" if inner == "score" else f"expertflow-{inner}"

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.lru, self.freq = LRU(), DecayedFrequency(0.9)
        self.lru.setup(n_layers, n_experts, n_slots)
        self.freq.setup(n_layers, n_experts, n_slots)
        self._due = None               # a layer observed but not yet re-predicted (lazy refresh)
        self._P = np.full((n_layers, n_experts), 0.5)         # route head: what to protect
        self._R = self._P                                      # reuse head: eviction ranking
        self._d = np.full(n_layers, n_layers)
        self._n = np.full(n_layers, self.predictor.A)         # experts expected at each layer's next run
        self._c: int | None = None     # the layer d is the distance row of (None: d was set directly)
        self._rows: dict = {}          # (c, S) -> (layers within S of c, bool [L*E] of their experts)
        self._first = (np.arange(n_layers) * n_experts)[:, None]
        self._T = None                 # next_use() of the current R, d (None: not computed yet)
        self._prot: tuple | None = None   # (S, predicted(S)) of the current P, d
        # next_use's alpha * d - L per layer, by the layer c that d is the distance row of
        dist = np.arange(n_layers)[None, :] - np.arange(n_layers)[:, None]
        dist = np.where(dist > 0, dist, dist + n_layers)
        self._shift = (self.alpha * dist - n_layers)[:, :, None]

    # P, R, d are re-predicted on first use after an access: a layer whose experts are all resident
    # needs no victim, so its prediction waits until something reads it (the runtime's planning after
    # the launch). The predictor learns from routing alone, so a prediction never read is skipped.
    # next_use() and predicted(S) are kept until P, R or d change.
    @property
    def P(self) -> np.ndarray:
        if self._due is not None:
            self.refresh(self._due)
        return self._P

    @P.setter
    def P(self, v) -> None:
        self._P, self._prot = v, None

    @property
    def R(self) -> np.ndarray:
        if self._due is not None:
            self.refresh(self._due)
        return self._R

    @R.setter
    def R(self, v) -> None:
        self._R, self._T = v, None

    @property
    def d(self) -> np.ndarray:
        if self._due is not None:
            self.refresh(self._due)
        return self._d

    @d.setter
    def d(self, v) -> None:
        self._d, self._c, self._T, self._prot = v, None, None, None

    @property
    def S(self) -> int:
        return int(self.horizon() if callable(self.horizon) else self.horizon)

    def on_access(self, layer, experts):
        if self.inner == "lru":        # the inner orders' statistics, kept only where they are read
            self.lru.on_access(layer, experts)
        elif self.inner == "freq":
            self.freq.on_access(layer, experts)
        self.predictor.observe(layer, experts)
        self._due = layer

    def refresh(self, layer: int, pregate: np.ndarray | None = None) -> np.ndarray:
        """Re-predict after `layer` (with pre-gate probabilities when the hidden state is known)."""
        self._due = None
        self._P = self.predictor.predict(layer, pregate)
        self._R = self.predictor.P_reuse
        self._n[:] = self.predictor.A
        if pregate is not None:
            self._batch_rows(pregate)
        self._d, self._c = self.predictor.distance_row(layer), layer
        self._T = self._prot = None
        return self._P

    def expect(self, pg: np.ndarray) -> None:
        """A step of many tokens' chance of use [L, E] (NaN rows: none), outside refresh (a prompt's
        first layers, before any hidden state): see _batch_rows."""
        if self._due is not None:
            self.refresh(self._due)
        self._batch_rows(pg)
        self._T = self._prot = None

    def _batch_rows(self, pg: np.ndarray) -> None:
        """Rows whose pre-gate expects more than top_k distinct experts (a step of many tokens: one
        token's expects at most top_k) take its count and, as the chance of use, at least the
        pre-gate's: the router read all the step's tokens, while the learned heads model one."""
        n = np.rint(np.nan_to_num(pg).sum(axis=1))
        rows = np.flatnonzero(n > self.predictor.A)
        if rows.size:
            self._n[rows] = np.minimum(n[rows], self.E)
            if self._R is self._P:
                self._R = self._R.copy()
            self._P[rows] = np.maximum(self._P[rows], pg[rows])
            self._R[rows] = np.maximum(self._R[rows], pg[rows])

    def expected_count(self) -> float:
        """The most experts expected at any layer's next run (top_k, or a batch's pre-gate count)."""
        return float(self._n.max())

    def on_load(self, layer, e, prefetch):
        if self.inner == "lru":
            self.lru.on_load(layer, e, prefetch)

    def next_use(self) -> np.ndarray:
        """T [L*E]: expected layer-steps to each expert's next use (read-only; one per refresh)."""
        if self._due is not None:
            self.refresh(self._due)
        if self._T is None:      # L * (1/p - 1) + alpha * d, p <= 1 already (a probability)
            T = np.maximum(self._R, self.p_min)
            np.divide(self.L, T, out=T)
            if self._c is None:
                T += (self.alpha * self._d - self.L)[:, None]
            else:
                T += self._shift[self._c]
            self._T = T.reshape(-1)
        return self._T

    def predicted(self, horizon: int | None = None) -> np.ndarray:
        """bool [L*E]: the top_k predicted experts of each layer within the horizon."""
        S = self.S if horizon is None else horizon
        if self._due is not None:
            self.refresh(self._due)
        if self._prot is None or self._prot[0] != S:         # victim() asks once per eviction
            self._prot = (S, self._predicted(S))
        return self._prot[1]

    def within(self, S: int) -> np.ndarray:
        """Layers whose next execution is at most S layer-steps away (ascending; memoized by layer)."""
        return self._within(S)[0]

    def _within(self, S: int) -> tuple:
        if self._due is not None:
            self.refresh(self._due)
        got = None if self._c is None else self._rows.get((self._c, S))
        if got is None:
            inside = self._d <= S
            got = (np.flatnonzero(inside), np.repeat(inside, self.E))
            if self._c is not None:
                self._rows[self._c, S] = got
        return got

    def _predicted(self, S: int) -> np.ndarray:
        """Row-wise top-n_l of P (n_l = top_k but in a step of many tokens), kept in the layers
        inside the horizon (sorting all rows and masking is cheaper than gathering those rows
        first; rows are E wide)."""
        E, A = self.E, self.predictor.A
        order = self._P.argsort(axis=1, kind="stable")
        m = np.zeros(self.L * E, dtype=bool)
        if (self._n == A).all():
            m[self._first + order[:, E - A:]] = True
        else:                        # row l keeps its n_l most likely
            keep = np.arange(E)[None, :] >= (E - self._n)[:, None]
            m[(self._first + order)[keep]] = True
        m &= self._within(S)[1]
        return m

    def victim(self, candidates, resident, layer):
        pool = np.greater(candidates, self.predicted()) if self.protect else candidates   # unprotected
        if self.inner == "lru" and pool.any():
            return _argmin(self.lru.last, pool)
        if self.inner == "freq" and pool.any():
            return _argmin(self.freq.f.reshape(-1), pool)
        T = self.next_use()
        w = np.where(pool, T, -np.inf)
        v = int(w.argmax())
        if w[v] == -np.inf:                           # every candidate is protected
            return _argmax(T, candidates)
        return v


@dataclass
class Policy:
    """A named policy: its eviction, its predictor (if any) and how it prefetches."""
    name: str
    eviction: Eviction
    predictor: HybridPredictor | None = None
    prefetch: str = "none"            # "none" | "pregate" (next layer's router) | "horizon"
    uses_hidden: bool = False         # wants Model.on_layer to read later routers
    params: dict = field(default_factory=dict)


def make_policy(name: str, n_layers: int, n_experts: int, top_k: int, *,
                horizon: int | Callable[[], int] = 8, inner: str = "score",
                eviction: str | None = None, **kw) -> Policy:
    """Build a named policy for a model of n_layers MoE layers, n_experts experts, top_k active."""
    if name == "ondemand":
        return Policy(name, make_eviction(eviction or "lru"))
    if name == "pregate":
        return Policy(name, make_eviction(eviction or "lru"), prefetch="pregate", uses_hidden=True)
    if name == "expertflow":
        pred = HybridPredictor(n_layers, n_experts, top_k, **{k: v for k, v in kw.items()
                                                              if k in ("lr", "damp", "coact_span", "warmup")})
        ev = ExpertflowEviction(pred, horizon, inner, **{k: v for k, v in kw.items()
                                                         if k in ("alpha", "protect", "p_min")})
        return Policy(name, ev, pred, prefetch="horizon", uses_hidden=True, params={"inner": inner})
    raise ConfigError(f"unknown offload policy {name!r}; choose one of {', '.join(POLICIES)}")


def route_bias(scores: np.ndarray, ids: np.ndarray, resident: np.ndarray, margin: float) -> np.ndarray:
    """LOSSY, opt-in: substitute resident experts for close non-resident choices.

    scores [T, E] router scores (logits or probabilities: margin is in the same units), ids [T, A]
    the router's choice, resident [E] bool. For each token, each chosen non-resident expert whose
    score is within `margin` of an unchosen resident expert's is replaced by the best such resident
    expert (each resident expert used once per token). Returns new ids [T, A] (a copy); the caller
    recomputes the routing weights for the new ids. margin <= 0 returns ids unchanged.
    """
    scores = np.asarray(scores)
    out = np.array(ids, dtype=np.int32, copy=True)
    resident = np.asarray(resident, dtype=bool)
    if margin <= 0 or resident.all():
        return out
    for t in range(out.shape[0]):
        taken = set(out[t].tolist())
        free = [e for e in np.argsort(-scores[t], kind="stable") if resident[e] and e not in taken]
        for a in np.argsort(-scores[t, out[t]], kind="stable"):   # best choice first
            e = int(out[t, a])
            if resident[e] or not free:
                continue
            r = int(free[0])
            if scores[t, r] >= scores[t, e] - margin:
                out[t, a] = r
                free.pop(0)
    return out
