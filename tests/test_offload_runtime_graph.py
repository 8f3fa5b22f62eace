"""The runtime's graph-path entry points (demand, end_layer(pregate=)) and timeline recording,
on simulated engines (no GPU): demand makes the same decisions as begin_layer, copies go out
before the bookkeeping, device-style predictions reach pregate / expertflow, and the timeline
records compute / copy / stall intervals for the asked number of steps."""
from __future__ import annotations

import numpy as np
import pytest

from efengine.offload import OffloadRuntime, replay_trace
from efengine.offload.prefetch import VirtualClock, VirtualEngine
from efengine.offload.store import NullStore
from efengine.offload.trace import Trace

L, E, A = 6, 8, 2


def routing(n: int, seed: int = 0) -> np.ndarray:
    """[n, L, A] distinct ids per (token, layer), with some reuse across tokens."""
    rng = np.random.default_rng(seed)
    hot = rng.choice(E, 4, replace=False)
    out = np.empty((n, L, A), dtype=np.int32)
    for t in range(n):
        for l in range(L):
            pool = hot if rng.random() < 0.6 else np.arange(E)
            out[t, l] = rng.choice(pool, A, replace=False)
    return out


def runtime(policy: str, slots: int, **kw) -> OffloadRuntime:
    store = NullStore(L, E, A, 1_000_000)
    return OffloadRuntime(None, "numpy", policy=policy, slots=slots, store=store,
                          engine=VirtualEngine(1e9, clock=VirtualClock()), keep_log=False, **kw)


def drive(rt: OffloadRuntime, ids: np.ndarray, mode: str, logits=None) -> list:
    """Decode order through begin_layer (consumed) or demand; logits(t, l) -> [S, E] or None."""
    pos = np.zeros(1, dtype=np.int64)
    slots_seen = []
    for t in range(ids.shape[0]):
        rt.begin_step(pos)
        for l in range(L):
            rt.clock.advance(1e-4)
            if mode == "generator":
                for _ in rt.begin_layer(l, ids[t, l][None, :]):
                    pass
            else:
                slots = rt.demand(l, ids[t, l][None, :])
                assert sorted(int(rt.cache.owner[s]) % E for s in slots) == sorted(set(ids[t, l].tolist()))
                assert all(rt.cache.pinned[l * E + e] for e in ids[t, l])
                slots_seen.append(slots)
            rt.end_layer(l, pregate=None if logits is None else logits(t, l))
        rt.end_step()
    return slots_seen


@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
@pytest.mark.parametrize("slots", [A, 5, 24])
def test_demand_decides_like_begin_layer(policy, slots):
    ids = routing(30)
    a, b = runtime(policy, slots), runtime(policy, slots)
    drive(a, ids, "generator")
    drive(b, ids, "demand")
    sa, sb = a.summary(), b.summary()
    for k in ("misses", "hits", "late", "copies", "prefetch_issued"):
        assert sa[k] == sb[k], k
    assert sa["misses"] > 0
    assert np.array_equal(a.cache.owner, b.cache.owner)
    b.cache.check()


def test_demand_issues_copies_before_counting_the_access():
    """LRU: the first copy is on its way before the stats move (issue first, bookkeeping after)."""
    rt = runtime("ondemand", 3)
    seen = {}
    inner = rt.prefetcher.engine.submit

    def submit(nbytes, fn, **job):
        seen.setdefault("misses_at_first_copy", rt.stats.misses)
        return inner(nbytes, fn, **job)
    rt.prefetcher.engine.submit = submit
    rt.begin_step(np.zeros(1, dtype=np.int64))
    rt.demand(0, np.array([[1, 2]]))
    assert seen["misses_at_first_copy"] == 0 and rt.stats.misses == 2
    assert rt.first_issue_t is not None


def test_demand_without_a_free_slot_waits_for_a_copy():
    """Every slot pinned or loading: demand waits for the oldest copy, then loads (no error)."""
    rt = runtime("ondemand", A)
    drive(rt, routing(8, seed=3), "demand")
    assert rt.summary()["misses"] >= 8


def next_layer_logits(ids: np.ndarray, S: int, noise: float = 0.0, seed: int = 1):
    """Device-style predictions: router logits of layers l+1..l+S peaked on what they route."""
    rng = np.random.default_rng(seed)

    def f(t, l):
        rows = []
        for k in range(1, S + 1):
            if l + k >= L:
                break
            z = rng.normal(0, noise, E) if noise else np.zeros(E)
            z[ids[t, l + k]] += 5.0
            rows.append(z)
        return np.array(rows) if rows else None
    return f


def test_pregate_prefetches_from_device_predictions():
    ids = routing(20)
    base = runtime("pregate", 12)
    drive(base, ids, "demand")                        # no predictions: pregate never prefetches
    assert base.summary()["prefetch_issued"] == 0
    rt = runtime("pregate", 12)
    drive(rt, ids, "demand", logits=next_layer_logits(ids, 1))
    s = rt.summary()
    assert s["prefetch_issued"] > 0 and s["prefetch_used"] > 0
    assert s["pregate_recall_next"] == 1.0            # the logits name exactly what the next layer routes
    assert s["pregate_scored"] == sum(len(set(ids[t, l])) for t in range(20) for l in range(1, L))
    assert s["misses"] < base.summary()["misses"]


def test_expertflow_reads_device_predictions():
    ids = routing(40)
    rt = runtime("expertflow", 12)
    drive(rt, ids, "demand", logits=next_layer_logits(ids, 2, noise=0.5))
    s = rt.summary()
    assert s["pregate_recall_next"] > 0.9
    assert s["prediction_recall_by_distance"][1] > 0.6   # the pre-gate feature reaches the predictor


def test_timeline_on_the_virtual_clock():
    n, E2, A2, L2 = 10, 8, 2, 4
    rng = np.random.default_rng(0)
    ids = np.array([[rng.choice(E2, A2, replace=False) for _ in range(L2)] for _ in range(n)], dtype=np.int32)
    trace = Trace("t", ids, np.full(ids.shape, 0.5, np.float32), E2)
    out = replay_trace(trace, "ondemand", fraction=0.25, blob_nbytes=1_000_000, bandwidth=1e9,
                       layer_s=1e-4, timeline=3)
    tl = out["timeline"]
    assert {d["kind"] for d in tl} == {"compute", "copy", "stall"}
    assert sorted({d["step"] for d in tl}) == [0, 1, 2]
    assert min(d["t0"] for d in tl) >= 0 and all(d["t1"] >= d["t0"] for d in tl)
    assert all(set(d) == {"step", "layer", "kind", "t0", "t1", "expert"} for d in tl)
    copies = sorted((d["t0"], d["t1"]) for d in tl if d["kind"] == "copy")
    assert all(abs(c1 - c0 - 1e-3) < 1e-12 for c0, c1 in copies)          # 1 MB at 1 GB/s
    assert all(b[0] >= a[1] - 1e-12 for a, b in zip(copies, copies[1:]))   # one FIFO copy queue
    stall = sum(d["t1"] - d["t0"] for d in tl if d["kind"] == "stall")
    assert stall > 0
    # a stall ends when a copy of its expert lands
    ends = {(d["expert"], round(d["t1"], 12)) for d in tl if d["kind"] == "copy"}
    assert all((d["expert"], round(d["t1"], 12)) in ends for d in tl if d["kind"] == "stall")
    assert all(d["expert"] is None for d in tl if d["kind"] == "compute")


def test_timeline_records_only_the_asked_steps_and_untaps():
    rt = runtime("ondemand", 4)
    eng = rt.prefetcher.engine
    rt.stats.timeline, rt.stats.timeline_steps = [], 2
    drive(rt, routing(6), "demand")
    tl = rt.stats.timeline
    assert tl and {d["step"] for d in tl} == {0, 1}
    assert rt.prefetcher.engine is eng and rt.recorder is None
    n_copies = sum(1 for d in tl if d["kind"] == "copy")
    assert n_copies == sum(1 for d in tl if d["kind"] == "copy" and d["expert"] is not None) > 0


@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_run_ahead_keeps_a_layers_experts_until_the_device_is_past_its_gate(policy):
    """demand(wait=False) is the run-ahead path: the device may still poll at layer l's gate after
    the host's end_layer(l), so l's experts stay pinned (no prefetch may evict one) until the next
    layer's demand or settled(); the eager / segmented paths (wait=True) unpin at end_layer."""
    ids = routing(6, seed=4)
    rt = runtime(policy, 3 * A)
    rt.begin_step(np.zeros(1, dtype=np.int64))
    for l in range(L):
        rt.demand(l, ids[0, l][None, :], wait=False)
        rt.end_layer(l)
        assert all(rt.cache.pinned[l * E + e] for e in ids[0, l])              # still pinned
        assert not any(rt.cache.pinned[k * E + e] for k in range(l) for e in range(E))   # earlier: free
    rt.settled()
    assert not rt.cache.pinned.any()
    rt.end_step()
    rt.begin_step(np.zeros(1, dtype=np.int64))
    rt.demand(0, ids[1, 0][None, :])
    rt.end_layer(0)
    assert not rt.cache.pinned.any()
