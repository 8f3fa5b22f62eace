"""Offline cache simulators: replay a routing trace through an ExpertCache and count misses.

The access sequence is the execution order of decode: token-major, layer-minor (token 0 layers
0..L-1, token 1 layers 0..L-1, ...). One pool of N slots holds (layer, expert) pairs of every
layer. A step's experts are pinned while it loads its misses (a layer cannot evict what it is
about to use). Copies complete at once: this counts misses (transfers a policy cannot avoid), not
time; timed replay goes through the runtime (runtime.py) with a simulated copy engine.

Offline-only policies that read the future live here: Belady (evict the expert whose next use is
farthest, optimal for demand loading) and Foresight(S) (perfect knowledge of the next S
layer-steps, decayed frequency outside it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import DecayedFrequency, Eviction, ExpertCache, _argmax, _argmin
from .trace import Trace

NEVER = np.iinfo(np.int64).max // 2


def next_use(seq: np.ndarray, n_ids: int) -> np.ndarray:
    """For steps [S, A] of flat ids: [S, A] index of the next step using the same id (NEVER if none)."""
    S = seq.shape[0]
    nxt = np.full(n_ids, NEVER, dtype=np.int64)
    out = np.empty(seq.shape, dtype=np.int64)
    for i in range(S - 1, -1, -1):
        out[i] = nxt[seq[i]]
        nxt[seq[i]] = i
    return out


class _Future(Eviction):
    """Keeps next-use step indices of every id while the simulator walks the sequence."""

    def __init__(self, trace: Trace):
        self.seq = (trace.experts.astype(np.int64)
                    + (np.arange(trace.n_layers) * trace.n_experts)[None, :, None]).reshape(-1, trace.top_k)
        self.n_ids = trace.n_layers * trace.n_experts
        self.nu_steps = next_use(self.seq, self.n_ids)

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.step = -1
        self.nu = np.full(self.n_ids, NEVER, dtype=np.int64)

    def on_access(self, layer, experts):
        self.step += 1
        row = self.seq[self.step]
        self.nu[row] = self.nu_steps[self.step]


class Belady(_Future):
    """Optimal offline eviction (MIN): the expert used farthest in the future leaves."""

    name = "belady"

    def victim(self, candidates, resident, layer):
        return _argmax(self.nu, candidates)


class Foresight(_Future):
    """Perfect knowledge of the next S layer-steps; outside it, pool-wide decayed frequency."""

    def __init__(self, trace: Trace, horizon: int, decay: float = 0.9):
        super().__init__(trace)
        self.horizon = int(horizon)
        self.freq = DecayedFrequency(decay)
        self.name = f"foresight-{self.horizon}"

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.freq.setup(n_layers, n_experts, n_slots)

    def on_access(self, layer, experts):
        super().on_access(layer, experts)
        self.freq.on_access(layer, experts)

    def victim(self, candidates, resident, layer):
        outside = candidates & (self.nu > self.step + self.horizon)
        if outside.any():
            return _argmin(self.freq.f.reshape(-1), outside)
        return _argmax(self.nu, candidates)


@dataclass
class SimResult:
    policy: str
    n_slots: int
    tokens: int
    misses: int
    hits: int

    @property
    def misses_per_token(self) -> float:
        return self.misses / max(self.tokens, 1)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "slots": self.n_slots, "tokens": self.tokens, "misses": self.misses,
                "hits": self.hits, "misses_per_token": round(self.misses_per_token, 3)}


def simulate(trace: Trace, n_slots: int, eviction: Eviction) -> SimResult:
    """Replay `trace` (decode order) through a cache of n_slots with `eviction` (demand loads only)."""
    L, E = trace.n_layers, trace.n_experts
    cache = ExpertCache(n_slots, L, E, eviction)
    hits = misses = 0
    for t in range(trace.n_tokens):
        for l in range(L):
            ids = np.unique(trace.experts[t, l])
            h, m = cache.access(l, ids)
            hits, misses = hits + h, misses + m
            cache.pin(l, ids)
            for e in ids:
                if not cache.is_present(l, int(e)):
                    got = cache.allocate(l, int(e))
                    if got is None:
                        raise RuntimeError(f"{n_slots} slots cannot hold the {len(ids)} experts of one step")
                    cache.complete(l, int(e))
            cache.unpin(l, ids)
    return SimResult(eviction.name, n_slots, trace.n_tokens, misses, hits)


def slots_for(fraction: float, trace: Trace) -> int:
    """Slots holding `fraction` of all L*E experts (rounded down, at least top_k)."""
    return max(trace.top_k, int(fraction * trace.n_layers * trace.n_experts))
