"""ExpertCache: slot table, pins, in-flight copies, eviction orders, and its error cases."""
from __future__ import annotations

import numpy as np
import pytest

from efengine.errors import ConfigError
from efengine.offload.cache import LRU, DecayedFrequency, ExpertCache, LayerFrequency, make_eviction


def load(c, l, e, **kw):
    got = c.allocate(l, e, **kw)
    assert got is not None
    c.complete(l, e)
    return got


def test_table_follows_ready_experts_only():
    c = ExpertCache(3, 2, 4)
    slot, ev = c.allocate(1, 2)
    assert ev == -1 and c.table[1, 2] == -1 and c.is_present(1, 2) and not c.is_ready(1, 2)
    assert c.complete(1, 2) == slot and c.table[1, 2] == slot and c.is_ready(1, 2)
    load(c, 0, 0)
    load(c, 0, 1)
    assert c.occupancy() == 3 and sorted(c.table[c.table >= 0].tolist()) == [0, 1, 2]
    c.check()
    with pytest.raises(ConfigError, match="already in the cache"):
        c.allocate(0, 0)
    with pytest.raises(ConfigError, match="was not loading"):
        c.complete(0, 0)


def test_lru_evicts_least_recent_and_frees_its_table_entry():
    c = ExpertCache(2, 1, 4, LRU())
    for e in (0, 1):
        c.access(0, [e])
        load(c, 0, e)
    c.access(0, [0])                       # 0 used again: 1 is now least recent
    c.access(0, [2])
    slot, ev = load(c, 0, 2)
    assert ev == 1 and c.table[0, 1] == -1 and c.table[0, 2] == slot
    c.check()


def test_pinned_and_in_flight_experts_are_never_evicted():
    c = ExpertCache(3, 1, 6, LRU())
    for e in (0, 1, 2):
        c.access(0, [e])
        load(c, 0, e)
    c.pin(0, [0, 1])
    assert c.allocate(0, 3)[1] == 2         # the only unpinned one
    assert c.allocate(0, 4) is None         # 0, 1 pinned; 3 still loading
    c.complete(0, 3)
    assert c.allocate(0, 4)[1] == 3
    c.unpin()
    c.complete(0, 4)
    c.check()
    with pytest.raises(ConfigError, match="cannot be evicted"):
        c.pin(0, [4])
        c.evict(0, 4)


def test_protect_mask_and_peek_victim_agree_with_allocate():
    c = ExpertCache(3, 2, 4, DecayedFrequency(0.5))
    rng = np.random.default_rng(0)
    for _ in range(40):
        l = int(rng.integers(2))
        ids = rng.choice(4, 2, replace=False)
        c.access(l, ids)
        c.pin(l, ids)
        for e in ids:
            if not c.is_present(l, int(e)):
                protect = np.zeros(8, bool)
                protect[rng.integers(8)] = True
                want = c.peek_victim(l, protect)
                got = c.allocate(l, int(e), protect=protect)
                if want == -2:
                    assert got is None
                    got = c.allocate(l, int(e))
                else:
                    assert got[1] == want and not protect[want]
                c.complete(l, int(e))
        c.unpin()
        c.check()


def test_kept_masks_follow_every_state_and_pin_change():
    """evictable() and the resident mask the policies see are kept as states and pins change, not
    rebuilt: loads left in flight, per-expert and all-at-once unpins, evictions in any order."""
    c = ExpertCache(5, 3, 4, LRU())
    rng = np.random.default_rng(3)
    loading = []
    for step in range(300):
        l = int(rng.integers(3))
        ids = [int(e) for e in rng.choice(4, 2, replace=False)]
        c.access(l, ids)
        c.pin(l, ids)
        for e in ids:
            if not c.is_present(l, e) and c.allocate(l, e) is not None:
                loading.append((l, e))
        while loading and rng.random() < 0.6:          # copies land late, in any order
            c.complete(*loading.pop(int(rng.integers(len(loading)))))
        want = (c.state == 2) & ~c.pinned
        assert (c.evictable() == want).all() and (c.resident == (c.state != 0)).all()
        protect = rng.random(12) < 0.3
        assert (c.evictable(protect) == (want & ~protect)).all()
        if step % 3:
            c.unpin(l, ids[:1])
        c.check()
        c.unpin() if step % 2 else c.unpin(l, ids)
        c.check()


def test_decayed_frequency_prefers_frequent_experts():
    ev = DecayedFrequency(0.9)
    c = ExpertCache(2, 1, 3, ev)
    for e in (0, 0, 0, 1):
        c.access(0, [e])
        if not c.is_present(0, e):
            load(c, 0, e)
    c.access(0, [2])
    assert load(c, 0, 2)[1] == 1            # 0 is more frequent, though 1 is more recent


def test_layer_frequency_evicts_within_its_own_layer():
    c = ExpertCache(4, 2, 4, LayerFrequency())
    for e in (0, 1):
        c.access(0, [e]); load(c, 0, e)
        c.access(1, [e]); load(c, 1, e)
    c.access(1, [3])
    assert load(c, 1, 3)[1] // 4 == 1        # layer 1 holds its share: a layer-1 expert leaves


def test_bad_arguments():
    with pytest.raises(ConfigError, match="at least one slot"):
        ExpertCache(0, 2, 2)
    with pytest.raises(ConfigError, match="unknown eviction policy 'mru'"):
        make_eviction("mru")
    with pytest.raises(ConfigError, match="decay"):
        DecayedFrequency(1.5)
