"""The run-ahead decode's host slot map (ExpertPool.host_map) while copies land under the host.

In the run-ahead decode (ops/gpu_runahead.py) the device's gates poll `host_map` for each routed
expert; a copy publishes its slot there from the copy stream the moment its bytes land, and the
host only learns that a copy landed later, when it polls the copy's event (Prefetcher.poll) at the
next layer's demand. So between a publish and the host's poll, the host must never write over a
published entry: after the host served layer l (demand, end_layer) nothing on the host runs until
the device has passed l's gate, so an entry cleared there stays cleared and the gate waits out its
timeout for a copy that has already landed (the H100 failure: expertflow, 8% of a random Qwen
.ef, "a run-ahead gate waited too long"; once drained, every expert published and resident).

The ExpertPool's host-side code runs here with numpy standing in for cupy; CopyStream plays the
copy stream: copies land in submit order, each publishing its slot into host_map, and one may land
whenever the host queries an event (as a real copy lands while the host works).

Shapes: L MoE layers, E experts, A active, S layers predicted ahead.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from efengine.offload import OffloadRuntime
from efengine.offload.cache import FREE, LOADING, READY
from efengine.offload.prefetch import VirtualClock
from efengine.offload.store import NullStore
from efengine.ops import gpu_weights

BLOB = 64                              # bytes per expert (NullStore: no bytes move)
COPY_S, LAYER_S = 50e-6, 100e-6        # a copy, a layer of compute (sizes the prefetch backlog)


@pytest.fixture
def mapped_pool(monkeypatch):
    """ExpertPool(n, L, E) with numpy for cupy and its map in (here: ordinary) host memory, as
    map_to_host leaves it for the run-ahead decode."""
    monkeypatch.setattr(gpu_weights, "cupy", np)

    def make(n: int, L: int, E: int):
        pool = gpu_weights.ExpertPool(types.SimpleNamespace(blob_nbytes=BLOB), n, L, E)
        pool.host_map = np.full((L, E), -1, dtype=np.int32)
        return pool
    return make


class _Copy:
    """One copy's event: done() once it has landed (asking may let the next copy land first)."""

    def __init__(self, stream: "CopyStream", nbytes: int):
        self.stream, self.nbytes, self.seconds, self.landed = stream, nbytes, COPY_S, False

    def done(self) -> bool:
        return self.stream.query(self)

    def sync(self) -> None:
        self.stream.land_through(self)

    def wait(self) -> float:
        raise AssertionError("run-ahead decode: the compute stream never waits on a copy")


class CopyStream:
    """The CudaEngine as the run-ahead host sees it: FIFO copies, each followed by the publish of
    its slot into the pool's host map; copies land when the host looks at them (query, watch)."""

    def __init__(self, seed: int, p: float):
        self.rng, self.p = np.random.default_rng(seed), p
        self.clock = VirtualClock()
        self.queue: list = []
        self.seen: _Copy | None = None

    def submit(self, nbytes, fn, *, slot, blob, pool, key=None, guard=None, **job) -> _Copy:
        ev = _Copy(self, nbytes)
        self.queue.append((ev, fn, pool, key, slot))
        return ev

    def land_one(self) -> bool:
        if not self.queue:
            return False
        ev, fn, pool, key, slot = self.queue.pop(0)
        fn()
        pool.host_map[key] = slot          # publish: after the bytes, on the copy stream
        ev.landed = True
        return True

    def query(self, ev: _Copy) -> bool:
        """The host asks whether `ev` landed; with probability p a copy it is told is in flight
        lands at the host's next step (an event query or a pool write), with the ones before it:
        the copy a gate waits for lands while the host polls and does its bookkeeping."""
        self.advance(ev)
        if not ev.landed and self.rng.random() < self.p:
            self.seen = ev
        return ev.landed

    def advance(self, ev: _Copy | None = None) -> None:
        seen, self.seen = self.seen, None
        if seen is not None and seen is not ev:
            self.land_through(seen)

    def watch(self, pool) -> None:
        """Let copies land before the host's writes into the pool map too."""
        for name in ("assign", "unassign"):
            inner = getattr(pool, name)
            setattr(pool, name, lambda *a, inner=inner: (self.advance(), inner(*a))[1])

    def land_through(self, ev: _Copy) -> None:
        while not ev.landed:
            self.land_one()

    def close(self) -> None:
        pass


def check_map(rt) -> None:
    """What a gate may read: a ready expert, or a loading one whose copy landed, at its slot; a
    loading one still in flight or an absent one nowhere."""
    cache, hm, E = rt.cache, rt.pool.host_map.reshape(-1), rt.store.E
    for f in range(cache.L * cache.E):
        st, want = cache.state[f], int(cache.slot_of[f])
        if st == LOADING and not rt.prefetcher.inflight[f][0].landed:
            want = -1
        assert hm[f] == (want if st != FREE else -1), \
            f"layer {f // E} expert {f % E}: host map {hm[f]}, cache {['free', 'loading', 'ready'][st]} in slot {want}"


def gate(rt, stream: CopyStream, layer: int, ids: np.ndarray) -> None:
    """The device at `layer`'s gate after the host served it: copies land (the host does nothing
    more until the next gate logs) until every routed expert is published, or none is left."""
    hm, slot_of, E = rt.pool.host_map, rt.cache.slot_of, rt.store.E
    keys = sorted(set(ids.tolist()))
    while any(hm[layer, e] < 0 for e in keys) and stream.land_one():
        pass
    for e in keys:
        assert hm[layer, e] == slot_of[layer * E + e] >= 0, \
            f"layer {layer}'s gate waits for expert {e}: no copy of it is coming"


def drive(rt, stream: CopyStream, ids: np.ndarray, S: int, seed: int) -> None:
    """RunaheadDecodeGraph's host order: per MoE layer demand(wait=False) -> end_layer(pregate=);
    the device passes each gate before the next demand (predictions mostly right)."""
    n, L, _ = ids.shape
    E = rt.store.E
    rng = np.random.default_rng(seed)
    for t in range(n):
        rt.begin_step(np.zeros(1, dtype=np.int64))
        for l in range(L):
            stream.clock.advance(LAYER_S)
            rt.demand(l, ids[t, l][None, :], wait=False)
            check_map(rt)
            nxt = ids[t, l + 1:l + 1 + S]
            lg = rng.normal(size=(len(nxt), E))
            for k, row in enumerate(nxt):
                if rng.random() < 0.7:
                    lg[k, row] += 5.0
            rt.end_layer(l, pregate=lg if len(nxt) else None)
            check_map(rt)
            gate(rt, stream, l, ids[t, l])
        rt.settled()
        rt.end_step()
        check_map(rt)
    rt.cache.check()


def routing(n: int, L: int, E: int, A: int, seed: int) -> np.ndarray:
    """[n, L, A] distinct ids per (token, layer); a few hot experts per layer, so predictions and
    evictions keep revisiting the same experts."""
    rng = np.random.default_rng(seed)
    hot = [rng.choice(E, 2 * A, replace=False) for _ in range(L)]
    return np.stack([[rng.choice(hot[l] if rng.random() < 0.6 else E, A, replace=False) for l in range(L)]
                     for _ in range(n)]).astype(np.int32)


@pytest.mark.parametrize("frac", [0.08, 0.15, 0.25])
@pytest.mark.parametrize("seed", range(3))
def test_expertflow_run_ahead_never_unpublishes_a_landed_copy(mapped_pool, frac, seed):
    """Each of these cases failed before ExpertPool.unassign forgot the evicted expert: a prefetch
    Y evicted X, X was copied again elsewhere and published, then the host finished Y and its
    assign cleared X's entry (X still named the slot in the pool's stale owner / where)."""
    L, E, A = 12, 16, 2
    stream = CopyStream(seed, p=0.7)
    n = max(3 * A, int(frac * L * E))
    rt = OffloadRuntime(None, "numpy", policy="expertflow", slots=n, store=NullStore(L, E, A, BLOB),
                        pool=mapped_pool(n, L, E), engine=stream, keep_log=False)
    stream.watch(rt.pool)
    drive(rt, stream, routing(80, L, E, A, seed), S=2, seed=seed)
    s = rt.summary()
    assert s["prefetch_issued"] > 0 and s["prefetch_wasted"] > 0 and s["misses"] > 0


def test_a_slots_next_holder_landing_keeps_the_old_holders_new_slot(mapped_pool):
    """X leaves slot 0 for Y (eviction: X's entry cleared), X is copied again into slot 1 and that
    copy publishes 1 before the host has polled either copy; then the host finishes Y: X's entry
    stays 1 (it is what the gate waiting for X reads; the host finishes X only at a later poll)."""
    pool = mapped_pool(2, 1, 4)
    X, Y = (0, 0), (0, 1)
    pool.host_map[X] = 0
    pool.assign(*X, 0)
    pool.unassign(0)                     # Y evicts X
    assert pool.host_map[X] == -1
    pool.host_map[X] = 1                 # X's new copy landed: the copy stream published it
    pool.assign(*Y, 0)                   # the host finishes Y's copy first (submit order)
    assert pool.host_map[0].tolist() == [1, 0, -1, -1]
    pool.assign(*X, 1)
    assert pool.host_map[0].tolist() == [1, 0, -1, -1]
    assert pool.where == {X: 1, Y: 0} and pool.owner == {1: X, 0: Y}
    pool.unassign(1)                     # X evicted again: unmapped at once
    assert pool.host_map[0].tolist() == [-1, 0, -1, -1] and X not in pool.where
