"""The slot table the MoE kernels read stays right under the graph path's driving order.

OffloadDecodeGraph calls runtime.demand(layer, ids) -> launches the expert segment (which reads
pool.table) -> fences -> runtime.end_layer(layer, pregate=logits). After every demand each routed
expert must be ready and mapped to the slot demand returned, and every ready expert of the cache
must be mapped in the pool's table (a later "hit" reads it without any copy).

The GPU ExpertPool (gpu_weights.py) does not unmap an evicted expert at once: its next `assign` of
the slot clears the previous holder's entry. Its host-side bookkeeping runs here on numpy arrays
(cupy swapped for numpy in gpu_weights): the bug these tests pin down is a prefetch copy that
evicted X, X demanded again into another slot and waited for first (copies are finished out of
submit order), then the prefetch landing and clearing X's NEW entry ("an MoE kernel read an
expert whose slot table entry is -1" on the H100 with pregate / expertflow predictions).

Shapes: L MoE layers, E experts, A active, S layers predicted ahead.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from efengine.offload import OffloadRuntime
from efengine.offload.prefetch import VirtualClock, VirtualEngine
from efengine.offload.store import NullStore
from efengine.offload.trace import TRACE_DIR, load
from efengine.ops import gpu_weights

BLOB = 64                     # bytes per expert; copies take COPY_S each on the virtual engine
COPY_S, ATTN_S, MOE_S = 50e-6, 30e-6, 50e-6


@pytest.fixture
def host_gpu_pool(monkeypatch):
    """ExpertPool(n_slots, L, E) with numpy standing in for cupy (its table is then a numpy array)."""
    monkeypatch.setattr(gpu_weights, "cupy", np)
    return lambda n, L, E: gpu_weights.ExpertPool(types.SimpleNamespace(blob_nbytes=BLOB), n, L, E)


def routing(kind: str, n: int):
    """[n, L, A] routed ids: the gsm8k_2 Mixtral trace (32 layers, 8 experts, top-2) or random."""
    if kind == "trace":
        if not (TRACE_DIR / "gsm8k_2_routing.jsonl").is_file():
            pytest.skip("routing trace gsm8k_2 not available")
        t = load("gsm8k_2")
        return t.experts[:n], t.n_experts
    rng = np.random.default_rng(1)
    L, E, A = 12, 16, 2
    return np.stack([[rng.choice(E, A, replace=False) for _ in range(L)] for _ in range(n)]), E


def predicted(rng, nxt: np.ndarray, E: int, mode: str) -> np.ndarray:
    """Router logits [S, E] for the next S layers: mostly right (the routed ids boosted 70% of the
    time), or adversarial (the routed ids pushed to the bottom, so prefetches evict what is needed)."""
    lg = rng.normal(size=(len(nxt), E))
    for k, ids in enumerate(nxt):
        if mode == "right" and rng.random() < 0.7:
            lg[k, ids] += 5.0
        elif mode == "adversarial":
            lg[k, ids] -= 5.0
    return lg


def check_demand(rt, layer: int, ids: np.ndarray, slots: list) -> None:
    cache, table, E = rt.cache, np.asarray(rt.pool.table), rt.store.E
    keys = sorted(set(ids.tolist()))
    assert len(slots) == len(keys)
    for e, s in zip(keys, slots):
        f = layer * E + e
        assert cache.is_ready(layer, e) and cache.pinned[f], (layer, e)
        assert cache.slot_of[f] == s and cache.owner[s] == f, (layer, e)
        assert table[layer, e] == s, f"layer {layer} expert {e}: table {table[layer, e]}, slot {s}"
    ready = np.flatnonzero(cache.state == 2)
    assert (table.reshape(-1)[ready] == cache.slot_of[ready]).all(), "a ready expert is unmapped"
    cache.check()


def drive(rt, ids: np.ndarray, S: int, mode: str, seed: int = 0) -> None:
    """OffloadDecodeGraph's order on a virtual clock; no copy may target a slot the pending
    segment reads between demand and end_layer (the segment runs then)."""
    n, L, _ = ids.shape
    E = rt.store.E
    rng = np.random.default_rng(seed)
    submitted: list = []
    inner = rt.engine.submit
    rt.engine.submit = lambda nbytes, fn, **job: (submitted.append(job.get("slot")), inner(nbytes, fn, **job))[1]
    for t in range(n):
        rt.begin_step(np.zeros(1, dtype=np.int64))
        for l in range(L):
            rt.clock.advance(ATTN_S)
            slots = rt.demand(l, ids[t, l][None, :])
            check_demand(rt, l, ids[t, l], slots)
            mark = len(submitted)
            rt.clock.advance(MOE_S)                         # the expert segment runs
            check_demand(rt, l, ids[t, l], slots)           # nothing moved under it
            assert len(submitted) == mark
            nxt = ids[t, l + 1:l + 1 + S] if S else ids[t, :0]
            rt.end_layer(l, pregate=predicted(rng, nxt, E, mode) if len(nxt) else None)
        rt.end_step()


def runtime(pool, policy: str, frac: float, L: int, E: int, A: int = 2) -> OffloadRuntime:
    n = int(frac * L * E)
    return OffloadRuntime(None, "numpy", policy=policy, slots=n, store=NullStore(L, E, A, BLOB),
                          pool=None if pool is None else pool(n, L, E),
                          engine=VirtualEngine(BLOB / COPY_S, clock=VirtualClock()), keep_log=False)


@pytest.mark.parametrize("route", ["trace", "random"])
@pytest.mark.parametrize("mode", ["right", "adversarial"])
@pytest.mark.parametrize("frac", [0.25, 0.5])
@pytest.mark.parametrize("policy,S", [("pregate", 1), ("expertflow", 2)])
@pytest.mark.parametrize("pool_kind", ["gpu", "sim"])
def test_routed_experts_stay_mapped(host_gpu_pool, pool_kind, policy, S, frac, mode, route):
    ids, E = routing(route, 40)
    rt = runtime(host_gpu_pool if pool_kind == "gpu" else None, policy, frac, ids.shape[1], E)
    drive(rt, ids, S, mode)
    s = rt.summary()
    assert s["prefetch_issued"] > 0 and s["misses"] > 0


def test_gsm8k_pregate_half_cache_long(host_gpu_pool):
    """The H100 crash's setting (gsm8k_2, pregate, 50% cache) over the whole trace."""
    ids, E = routing("trace", 10_000)
    drive(runtime(host_gpu_pool, "pregate", 0.5, ids.shape[1], E), ids, 1, "right", seed=3)


def test_assign_keeps_an_expert_that_moved(host_gpu_pool):
    """X leaves slot 0 for a prefetch Y (not yet landed), X is loaded into slot 1 and assigned;
    then Y lands in slot 0: X stays mapped to slot 1."""
    pool = host_gpu_pool(2, 1, 4)
    pool.assign(0, 0, 0)                 # X = (0, 0) in slot 0
    pool.assign(0, 0, 1)                 # X again, now in slot 1 (evicted from 0 meanwhile)
    pool.assign(0, 1, 0)                 # Y lands in slot 0
    assert pool.table[0].tolist() == [1, 0, -1, -1]
    assert pool.where == {(0, 0): 1, (0, 1): 0} and pool.owner == {1: (0, 0), 0: (0, 1)}
    pool.assign(0, 2, 1)                 # X evicted from slot 1 for Z: X unmapped
    assert pool.table[0].tolist() == [-1, 0, 1, -1]
