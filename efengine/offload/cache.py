"""The GPU expert cache: equal-sized slots, a slot table the kernels read, pluggable eviction.

Legend: L MoE layers (indexed 0..L-1 in MoE order, not model layer numbers), E experts per layer,
N slots. An expert is named by (layer, e) or by its flat id layer*E + e.

Slot states: free -> loading (a copy is in flight; its event is kept) -> ready (in `table`).
`table` [L, E] int32 holds the slot of every READY expert and -1 otherwise: it is what the GPU
kernels may read, so an expert appears there only once its bytes have landed.

Eviction policies see every routed access and choose a victim among candidates the cache allows:
never an expert the current layer still needs (pinned) and never one whose copy is in flight.
The same policy objects drive the offline simulators (sim.py), so a policy measured on traces is
the policy that runs.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError

FREE, LOADING, READY = 0, 1, 2


class Eviction:
    """Base eviction policy: subclasses override `victim` and keep whatever statistics they need."""

    name = "base"

    def setup(self, n_layers: int, n_experts: int, n_slots: int) -> None:
        self.L, self.E, self.n_slots = n_layers, n_experts, n_slots

    def on_access(self, layer: int, experts: np.ndarray) -> None:
        """Layer `layer` of one step routes to `experts` (unique ids); called before its misses load."""

    def on_load(self, layer: int, e: int, prefetch: bool) -> None:
        """(layer, e) was given a slot (demand load or prefetch)."""

    def on_evict(self, layer: int, e: int) -> None:
        """(layer, e) left the cache."""

    def over_quota(self, resident: np.ndarray, layer: int) -> bool:
        """True when a load for `layer` must evict even though a slot is free (partitioned caches)."""
        return False

    def victim(self, candidates: np.ndarray, resident: np.ndarray, layer: int) -> int:
        """Flat id to evict among `candidates` (bool [L*E], never empty) for a load into `layer`."""
        raise NotImplementedError


def _argmin(score: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmin(np.where(mask, score, np.inf)))


def _argmax(score: np.ndarray, mask: np.ndarray) -> int:
    return int(np.argmax(np.where(mask, score, -np.inf)))


class LRU(Eviction):
    """Least recently used over the whole pool (a load counts as a use)."""

    name = "lru"

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.clock = 0
        self.last = np.zeros(n_layers * n_experts, dtype=np.int64)

    def on_access(self, layer, experts):
        self.clock += 1
        self.last[layer * self.E + np.asarray(experts)] = self.clock

    def on_load(self, layer, e, prefetch):
        self.last[layer * self.E + e] = self.clock

    def victim(self, candidates, resident, layer):
        return _argmin(self.last, candidates)


class DecayedFrequency(Eviction):
    """Least frequently used, counts decayed per access of their own layer (so per token in decode):
    f[l] <- decay * f[l] + used. Scores of different layers share a time scale, so the victim is the
    pool-wide minimum (ties: lowest id)."""

    name = "freq"

    def __init__(self, decay: float = 0.9):
        if not 0.0 < decay <= 1.0:
            raise ConfigError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.f = np.zeros((n_layers, n_experts), dtype=np.float64)

    def on_access(self, layer, experts):
        self.f[layer] *= self.decay
        self.f[layer, np.asarray(experts)] += 1.0

    def victim(self, candidates, resident, layer):
        return _argmin(self.f.reshape(-1), candidates)


class LayerFrequency(DecayedFrequency):
    """Decayed frequency within each layer: every layer owns an equal share of the slots and a load
    evicts the least frequent expert of its own layer (static partition, as vLLM-style per-layer
    caches do). Shares differ by at most one slot."""

    name = "layer-freq"

    def setup(self, n_layers, n_experts, n_slots):
        super().setup(n_layers, n_experts, n_slots)
        self.quota = np.full(n_layers, n_slots // n_layers, dtype=np.int64)
        self.quota[: n_slots % n_layers] += 1

    def over_quota(self, resident, layer):
        return int(resident.reshape(self.L, self.E)[layer].sum()) >= self.quota[layer]

    def victim(self, candidates, resident, layer):
        cand = candidates.reshape(self.L, self.E)
        counts = resident.reshape(self.L, self.E).sum(1)
        mine = np.zeros_like(cand)
        if counts[layer] >= self.quota[layer] and cand[layer].any():
            mine[layer] = cand[layer]
        else:                                        # take from layers above their share first
            mine[counts > self.quota] = cand[counts > self.quota]
        if not mine.any():
            mine = cand
        return _argmin(self.f.reshape(-1), mine.reshape(-1))


def make_eviction(name: str, **kw) -> Eviction:
    """Eviction policy by name: lru, freq (decayed frequency, pool-wide), layer-freq (per layer)."""
    table = {"lru": LRU, "freq": DecayedFrequency, "layer-freq": LayerFrequency}
    if name not in table:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {', '.join(table)} "
                          "(or use the expertflow policy's two-level eviction)")
    return table[name](**kw)


class ExpertCache:
    """Which expert sits in which of n_slots equal slots, and what may be evicted.

    The cache owns bookkeeping only; bytes move through a device pool and a copy engine
    (prefetch.py). Typical use: `slot, evicted = cache.allocate(l, e)` -> start the copy ->
    `cache.set_loading(l, e, event)` -> when the event is done `cache.complete(l, e)`.
    """

    def __init__(self, n_slots: int, n_layers: int, n_experts: int, eviction: Eviction | None = None):
        if n_slots < 1:
            raise ConfigError(f"the expert cache needs at least one slot, got {n_slots}")
        self.n_slots, self.L, self.E = int(n_slots), int(n_layers), int(n_experts)
        self.eviction = eviction if eviction is not None else LRU()
        self.eviction.setup(self.L, self.E, self.n_slots)
        # only partitioned policies override over_quota: the others skip building `resident` for it
        self._quota = type(self.eviction).over_quota is not Eviction.over_quota
        self.table = np.full((self.L, self.E), -1, dtype=np.int32)      # READY experts -> slot
        self.slot_of = np.full(self.L * self.E, -1, dtype=np.int32)     # loading or ready -> slot
        self.state = np.zeros(self.L * self.E, dtype=np.int8)           # FREE / LOADING / READY
        self.owner = np.full(self.n_slots, -1, dtype=np.int64)          # slot -> flat id
        self.pinned = np.zeros(self.L * self.E, dtype=bool)
        # kept as the states and pins change (a victim is chosen among them on most loads of a full
        # cache; rebuilding them took three numpy calls there): ready and unpinned, and not FREE
        self._unpinned_ready = np.zeros(self.L * self.E, dtype=bool)
        self._resident = np.zeros(self.L * self.E, dtype=bool)
        self._pins: set[int] = set()                                    # the pinned flat ids
        self.prefetched = np.zeros(self.L * self.E, dtype=bool)         # loaded ahead, not used yet
        self.events: dict[int, Any] = {}                                # flat id -> copy event
        self.free = list(range(self.n_slots - 1, -1, -1))

    # ---- queries ----------------------------------------------------------------------------------
    def flat(self, layer: int, e: int) -> int:
        return layer * self.E + e

    def is_ready(self, layer: int, e: int) -> bool:
        return self.state[layer * self.E + e] == READY

    def is_present(self, layer: int, e: int) -> bool:
        """Ready or loading: no new copy is needed."""
        return self.state[layer * self.E + e] != FREE

    @property
    def resident(self) -> np.ndarray:
        """bool [L*E]: ready or loading (a copy)."""
        return self._resident.copy()

    def occupancy(self) -> int:
        return self.n_slots - len(self.free)

    # ---- use --------------------------------------------------------------------------------------
    def access(self, layer: int, experts) -> tuple[int, int]:
        """A routed use of `experts` of `layer`: tells the policy; returns (hits, misses) where a hit
        is an expert already present (ready or in flight)."""
        if type(experts) is list:  # the runtime's: a few ids, sorted already; no numpy round trip
            keys = sorted(set(experts))
        else:
            keys = sorted(set(np.asarray(experts, dtype=np.int64).reshape(-1).tolist()))
        self.eviction.on_access(layer, np.asarray(keys, dtype=np.int64))
        base, state, pre = layer * self.E, self.state, self.prefetched
        hits = 0
        for e in keys:            # a few experts: Python indexing beats numpy calls on tiny arrays
            hits += state[base + e] != FREE
            pre[base + e] = False
        return int(hits), len(keys) - int(hits)

    def pin(self, layer: int, experts) -> None:
        base, pinned, ok = layer * self.E, self.pinned, self._unpinned_ready
        for e in experts:
            pinned[base + e] = True
            ok[base + e] = False
            self._pins.add(base + e)

    def unpin(self, layer: int | None = None, experts=None) -> None:
        """Unpin `experts` of `layer`, or every pinned expert (a few: Python beats a pass over all)."""
        pinned, state, ok = self.pinned, self.state, self._unpinned_ready
        if layer is None:
            fs, self._pins = self._pins, set()
        else:
            fs = [layer * self.E + e for e in experts]
            self._pins.difference_update(fs)
        for f in fs:
            pinned[f] = False
            ok[f] = state[f] == READY

    def evictable(self, protect: np.ndarray | None = None) -> np.ndarray:
        """bool [L*E]: ready, not pinned, not in `protect` (a new array)."""
        if protect is None:
            return self._unpinned_ready.copy()
        return np.greater(self._unpinned_ready, protect)          # a & ~b for bools

    def allocate(self, layer: int, e: int, *, prefetch: bool = False,
                 protect: np.ndarray | None = None) -> tuple[int, int] | None:
        """A slot for (layer, e) (marked loading): a free one or the policy's victim.

        Returns (slot, evicted flat id or -1), or None when every slot is pinned, in flight or
        protected (a prefetch should then wait; a demand load retries after the next completion)."""
        f = layer * self.E + e
        if self.state[f] != FREE:
            raise ConfigError(f"expert {e} of layer {layer} is already in the cache")
        evicted = -1
        # the policy gets the kept resident mask itself: read-only
        if not self.free or (self._quota and self.eviction.over_quota(self._resident, layer)):
            cand = self.evictable(protect)
            if not cand.any():
                if self.free:
                    return self._take(f, self.free.pop(), evicted, prefetch)
                return None
            evicted = self.eviction.victim(cand, self._resident, layer)
            self.free.append(self._drop(evicted))
        return self._take(f, self.free.pop(), evicted, prefetch)

    def peek_victim(self, layer: int, protect: np.ndarray | None = None) -> int:
        """What allocate would do now, without doing it: -1 a free slot, -2 nothing possible,
        else the flat id it would evict."""
        if self.free and not (self._quota and self.eviction.over_quota(self._resident, layer)):
            return -1
        cand = self.evictable(protect)
        if not cand.any():
            return -1 if self.free else -2
        return self.eviction.victim(cand, self._resident, layer)

    def _take(self, f: int, slot: int, evicted: int, prefetch: bool) -> tuple[int, int]:
        self.owner[slot] = f
        self.slot_of[f] = slot
        self.state[f] = LOADING
        self._resident[f] = True
        self.prefetched[f] = prefetch
        self.eviction.on_load(f // self.E, f % self.E, prefetch)
        return slot, evicted

    def _drop(self, f: int) -> int:
        if self.state[f] != READY or self.pinned[f]:
            raise ConfigError(f"expert {f % self.E} of layer {f // self.E} cannot be evicted now")
        slot = int(self.slot_of[f])
        self.table.reshape(-1)[f] = -1
        self.slot_of[f] = -1
        self.state[f] = FREE
        self._resident[f] = self._unpinned_ready[f] = False
        self.owner[slot] = -1
        self.eviction.on_evict(f // self.E, f % self.E)
        return slot

    def evict(self, layer: int, e: int) -> int:
        """Evict a ready, unpinned expert now; returns its slot (now free)."""
        slot = self._drop(layer * self.E + e)
        self.free.append(slot)
        return slot

    def set_event(self, layer: int, e: int, event) -> None:
        self.events[layer * self.E + e] = event

    def event(self, layer: int, e: int):
        return self.events.get(layer * self.E + e)

    def complete(self, layer: int, e: int) -> int:
        """The copy of (layer, e) landed: it becomes ready and visible in the slot table."""
        f = layer * self.E + e
        if self.state[f] != LOADING:
            raise ConfigError(f"expert {e} of layer {layer} was not loading")
        self.state[f] = READY
        self._unpinned_ready[f] = not self.pinned[f]
        self.events.pop(f, None)
        slot = int(self.slot_of[f])
        self.table[layer, e] = slot
        return slot

    def loading(self) -> list[tuple[int, int]]:
        return [(int(f) // self.E, int(f) % self.E) for f in np.flatnonzero(self.state == LOADING)]

    def check(self) -> None:
        """Internal consistency (tests): table, owners and states agree."""
        for slot, f in enumerate(self.owner):
            if f >= 0:
                assert self.slot_of[f] == slot and self.state[f] != FREE
        ready = np.flatnonzero(self.state == READY)
        assert (self.table.reshape(-1)[ready] == self.slot_of[ready]).all()
        assert (self.table.reshape(-1)[self.state != READY] == -1).all()
        assert len(self.free) + int((self.owner >= 0).sum()) == self.n_slots
        assert (self._resident == (self.state != FREE)).all()
        assert (self._unpinned_ready == ((self.state == READY) & ~self.pinned)).all()
        assert self._pins == set(np.flatnonzero(self.pinned).tolist())
