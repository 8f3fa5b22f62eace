"""Copy engines (events, stall), the prefetcher (priorities, deadlines, bounds) and timed replay."""
from __future__ import annotations

import time

import numpy as np
import pytest

from efengine.errors import ConfigError, EfError
from efengine.offload.cache import LRU, ExpertCache
from efengine.offload.policy import make_policy
from efengine.offload.pool import SimDevicePool
from efengine.offload.prefetch import ImmediateEngine, Prefetcher, ThreadEngine, VirtualClock, VirtualEngine
from efengine.offload.replay import replay_trace
from efengine.offload.sim import simulate
from efengine.offload.stats import OffloadStats
from efengine.offload.store import NullStore
from efengine.offload.trace import TRACE_DIR, Trace, load


def test_virtual_engine_queues_copies_and_measures_stall():
    eng = VirtualEngine(bandwidth=1000.0, latency=0.0)       # 1000 B/s
    a = eng.submit(500, lambda: None)                         # 0.0 -> 0.5
    b = eng.submit(1000, lambda: None)                        # 0.5 -> 1.5 (FIFO)
    eng.clock.advance(0.2)
    assert not a.done() and a.wait() == pytest.approx(0.3) and a.done()
    eng.clock.advance(1.0)                                    # now 1.5: b just landed
    assert b.done() and b.wait() == 0.0 and b.seconds == pytest.approx(1.0)


def test_thread_engine_copies_in_order_at_its_bandwidth():
    eng = ThreadEngine(bandwidth=1e6)                         # 1 MB/s: 20 kB takes 20 ms
    out = []
    evs = [eng.submit(20_000, lambda i=i: out.append(i)) for i in range(3)]
    t0 = time.perf_counter()
    stall = evs[-1].wait()
    assert out == [0, 1, 2] and all(e.done() for e in evs)
    assert 0.05 <= stall <= 0.5 and time.perf_counter() - t0 >= 0.05
    assert evs[0].seconds >= 0.019
    bad = eng.submit(1, lambda: 1 / 0)
    with pytest.raises(EfError, match="expert copy failed"):
        bad.wait()
    eng.close()
    with pytest.raises(ConfigError):
        ThreadEngine(bandwidth=0)


def make_prefetcher(n_slots=4, L=3, E=4, engine=None, max_inflight=2):
    store = NullStore(L, E, 2, blob_nbytes=100)
    cache = ExpertCache(n_slots, L, E, LRU())
    stats = OffloadStats()
    engine = engine or VirtualEngine(bandwidth=1000.0)
    pf = Prefetcher(cache, SimDevicePool(store, n_slots, L), store, engine, stats, max_inflight=max_inflight)
    return pf, cache, stats, engine


def test_prefetcher_orders_bounds_and_drops():
    pf, cache, stats, eng = make_prefetcher()
    pf.request(2, 1, deadline=5, score=-0.9)
    pf.request(1, 3, deadline=3, score=-0.2)
    pf.request(1, 0, deadline=3, score=-0.8)                 # same deadline, more likely: first
    pf.request(0, 2, deadline=1, score=0.0)                  # deadline passes before the pump
    assert pf.pump(tick=2) == 2                               # bounded: 2 prefetches in flight
    assert stats.prefetch_dropped == 1 and list(pf.inflight) == [1 * 4 + 0, 1 * 4 + 3]
    assert pf.pump(tick=2) == 0
    eng.clock.advance(1.0)                                    # both copies land (0.1 s each)
    pf.poll()
    assert cache.is_ready(1, 0) and cache.is_ready(1, 3) and pf.pool.table[1, 0] >= 0
    assert pf.pump(tick=2) == 1 and cache.is_present(2, 1)
    pf.request(1, 0, deadline=9)                              # already resident: dropped
    pf.pump(tick=2)
    assert stats.prefetch_dropped == 2 and stats.prefetch_issued == 3


def test_prefetcher_backlog_and_worth():
    pf, cache, stats, eng = make_prefetcher(max_inflight=8)
    for e in range(4):
        pf.request(0, e, deadline=1, score=-e)
    assert pf.pump(0, max_backlog=250) == 2                   # 100 B blobs: two fit in 250 B
    eng.clock.advance(10)
    pf.poll()
    assert pf.pump(0, worth=lambda f, v: False) == 2          # free slots: nothing to veto
    eng.clock.advance(10)
    pf.poll()
    pf.request(1, 0, deadline=1)
    assert pf.pump(0, worth=lambda f, v: False) == 0          # the cache is full: vetoed


def test_wait_counts_stall_and_wasted_prefetches():
    pf, cache, stats, eng = make_prefetcher(n_slots=1)
    pf.request(0, 1, deadline=1)
    pf.pump(0)
    assert pf.wait(0, 1) == pytest.approx(0.1)
    assert pf.load(0, 2)                                      # evicts the unused prefetch
    assert stats.prefetch_wasted == 1 and pf.pool.table[0, 1] == -1


needs_traces = pytest.mark.skipif(not (TRACE_DIR / "gsm8k_2_routing.jsonl").exists(),
                                  reason="shared routing traces not present")


@needs_traces
def test_runtime_replay_counts_match_the_simulator():
    t = load("gsm8k_2").head(40)
    for frac in (0.5, 0.75):
        slots = int(frac * 256)
        r = replay_trace(t, "ondemand", fraction=frac)
        assert r["misses"] == simulate(t, slots, LRU()).misses
        copies = r["misses"] * 94e6 / 55e9
        # copies start at routing time; resident experts computed first hide up to half a layer each
        assert copies - 40 * 32 * 75e-6 / 2 <= r["stall_s"] < copies
        no_prefetch = replay_trace(t, "expertflow", fraction=frac, p_prefetch=2.0)
        assert no_prefetch["misses"] == simulate(t, slots, make_policy("expertflow", 32, 8, 2).eviction).misses
        assert no_prefetch["prefetch_issued"] == 0


def test_prefetch_hides_copies_when_compute_is_long():
    """Every token routes like the previous one: prefetching the predicted experts of later layers
    during compute hides the copies that on-demand loading stalls on."""
    rng = np.random.default_rng(0)
    L, E = 4, 8
    base = np.array([rng.choice(E, 2, replace=False) for _ in range(L)])
    ex = np.stack([base if t % 2 else (base + 1) % E for t in range(60)]).astype(np.int32)
    t = Trace("alternating", ex, np.full(ex.shape, 0.5, np.float32), E)
    kw = dict(fraction=0.25, blob_nbytes=1000, bandwidth=1e6, layer_s=4e-3)   # 1 ms copy, 4 ms layer
    od, ef = replay_trace(t, "ondemand", **kw), replay_trace(t, "expertflow", **kw)
    assert od["stall_per_token_s"] > 1e-3
    assert ef["stall_per_token_s"] < 0.25 * od["stall_per_token_s"]
    assert ef["prefetch_used"] > 0.8 * ef["prefetch_issued"]


def test_immediate_engine_runs_copies_at_once():
    ran = []
    ev = ImmediateEngine().submit(10, lambda: ran.append(1))
    assert ran == [1] and ev.done() and ev.wait() == 0.0
    assert VirtualClock().now() == 0.0
