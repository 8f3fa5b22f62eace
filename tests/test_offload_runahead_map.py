"""The run-ahead decode's protocol between host and device, simulated on the CPU.

In the run-ahead decode (ops/gpu_runahead.py, kernels/offload.cu) the whole step runs on the
device; after each MoE router an `expert_gate` logs the ids for the host, waits until every routed
expert's slot is published in the host-held map (ExpertPool.host_map), claims the layer (its
kernels read those slots until the next gate starts) and goes on. The host follows: demand(layer,
wait=False) issues the misses' copies, end_layer plans prefetches. A copy publishes its slot from
the copy stream the moment its bytes land; the host learns that a copy landed only when it polls
the copy's event (at the next demand). A copy that evicts an expert waits on the copy stream
behind `slot_guard` while the victim's layer holds a claim.

Two ways this went wrong, both found on the H100 (expertflow, 8% of a random Qwen .ef):
  - a gate waited out its timeout for a copy that had landed: a prefetch Y evicted X, X was copied
    again into another slot and published, and the host then finished Y first (submit order),
    whose assign cleared X's entry because the pool still named X the slot's holder;
  - (found reading the code, the same interleavings) a demand copy overwrote a slot a later
    layer's kernels were reading: the device passes a gate whose experts are resident before the
    host reaches that layer, a prefetch may then evict one of them (guarded), the host's demand
    copies it again, and that demand copy's victim may belong to a layer the device has claimed.

`RunAhead` plays the device (gates, claims, a FIFO copy stream with guards and publishes) against
the real OffloadRuntime and the ExpertPool's host-side code (numpy standing in for cupy). Device
and copy stream move at random points of the host's work (event queries, pool writes) and while
the host waits for a gate's log, so copies land between the host's look at an event and its
bookkeeping, and the device runs layers ahead of the host. Checked: no gate waits with no copy
coming (deadlock), a gate reads only slots that hold its experts, no copy lands in a slot a
claimed layer reads, and the host map shows what has landed.

Shapes: L MoE layers, E experts, A active, S layers predicted ahead.
"""
from __future__ import annotations

import types

import numpy as np
import pytest

from efengine.offload import OffloadRuntime
from efengine.offload.cache import FREE, LOADING
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
    """One copy's event."""

    def __init__(self, sim: "RunAhead", nbytes: int):
        self.sim, self.nbytes, self.seconds, self.landed = sim, nbytes, COPY_S, False

    def done(self) -> bool:
        self.sim.tick()
        return self.landed

    def sync(self) -> None:
        while not self.landed:
            assert self.sim.advance(copies_only=True), "the host waits for a copy that cannot land"

    def wait(self) -> float:
        raise AssertionError("run-ahead decode: the compute stream never waits on a copy")


class RunAhead:
    """Device and copy stream of the run-ahead decode; also the runtime's copy engine (submit)."""

    def __init__(self, pool, seed: int, p_device: float = 0.5, p_copy: float = 0.5):
        self.pool, self.rng = pool, np.random.default_rng(seed)
        self.p_device, self.p_copy = p_device, p_copy
        self.clock = VirtualClock()
        self.queue: list = []                  # ("guard", layer) | ("copy", event, slot, key)
        self.content = {}                      # slot -> (layer, e) whose bytes it holds
        self.ids = None                        # the step's routing [L, A]; None between steps
        self.at, self.state = 0, "done"        # gate index; arrive | wait | run | done
        self.claim, self.reading = None, set()
        self.logged = -1
        self.guards = 0

    # ---- the copy engine ---------------------------------------------------------------------
    def submit(self, nbytes, fn, *, slot, blob, pool, key=None, guard=None, **job) -> _Copy:
        ev = _Copy(self, nbytes)
        if guard is not None:
            self.queue.append(("guard", guard))
            self.guards += 1
        self.queue.append(("copy", ev, slot, key))
        return ev

    def close(self) -> None:
        pass

    # ---- moving ------------------------------------------------------------------------------
    def _copy_step(self) -> bool:
        if not self.queue:
            return False
        head = self.queue[0]
        if head[0] == "guard":
            if self.claim == head[1]:
                return False                   # slot_guard: the victim's layer holds a claim
            self.queue.pop(0)
            return True
        _, ev, slot, key = self.queue.pop(0)
        assert not (self.claim is not None and slot in self.reading), \
            f"a copy of {key} lands in slot {slot} while layer {self.claim}'s kernels read it"
        self.content[slot] = key
        self.pool.host_map[key] = slot         # publish, after the bytes
        ev.landed = True
        return True

    def _device_step(self) -> bool:
        if self.ids is None or self.state == "done":
            return False
        g, hm = self.at, self.pool.host_map
        if self.state == "arrive":             # the gate logs the ids; the previous claim ends
            self.claim, self.reading = None, set()
            self.logged, self.state = g, "wait"
        elif self.state == "wait":             # every slot published: claim, read them
            keys = sorted(set(self.ids[g].tolist()))
            slots = [int(hm[g, e]) for e in keys]
            if min(slots) < 0:
                return False
            for e, s in zip(keys, slots):
                assert self.content.get(s) == (g, e), f"layer {g}'s gate reads slot {s} for expert {e}: it holds {self.content.get(s)}"
            self.claim, self.reading, self.state = g, set(slots), "run"
        else:                                  # the layer's kernels ran: on to the next gate
            self.at += 1
            self.state = "arrive" if self.at < len(self.ids) else "done"
            if self.state == "done":
                self.claim, self.reading = None, set()      # step_done
        return True

    def advance(self, copies_only: bool = False) -> bool:
        """One move of the device or the copy stream (random order); False if neither can move."""
        order = [self._copy_step] if copies_only else \
            ([self._device_step, self._copy_step] if self.rng.random() < 0.5 else [self._copy_step, self._device_step])
        return any(f() for f in order)

    def tick(self) -> None:
        """The host did a bit of work: the device and the copy stream may have moved meanwhile."""
        if self.rng.random() < self.p_device:
            self._device_step()
        if self.rng.random() < self.p_copy:
            self._copy_step()

    # ---- a step ------------------------------------------------------------------------------
    def start(self, ids: np.ndarray) -> None:
        self.ids, self.at, self.state, self.logged = ids, 0, "arrive", -1

    def until_logged(self, g: int) -> None:
        """The host spins on gate g's log row."""
        while self.logged < g:
            assert self.advance(), f"deadlock: gate {self.at} waits for {self.waiting()}, no copy is coming"

    def finish(self) -> None:
        """The host waits for the step (and the copies) to end."""
        while self.state != "done" or self.queue:
            assert self.advance(), f"deadlock: gate {self.at} waits for {self.waiting()}, no copy is coming"
        self.ids = None

    def waiting(self) -> list:
        hm = self.pool.host_map
        return [int(e) for e in sorted(set(self.ids[self.at].tolist())) if hm[self.at, e] < 0]


def watch(sim: RunAhead, pool) -> None:
    """The device and copy stream may move before each host write into the pool map too."""
    for name in ("assign", "unassign"):
        inner = getattr(pool, name)
        setattr(pool, name, lambda *a, inner=inner: (sim.tick(), inner(*a))[1])


def check_map(rt, sim: RunAhead) -> None:
    """What a gate may read: a ready expert, or a loading one whose copy landed, at its slot; a
    loading one still in flight or an absent one nowhere."""
    cache, hm, E = rt.cache, rt.pool.host_map.reshape(-1), rt.store.E
    for f in range(cache.L * cache.E):
        st, want = cache.state[f], int(cache.slot_of[f])
        if st == LOADING and not rt.prefetcher.inflight[f][0].landed:
            want = -1
        assert hm[f] == (want if st != FREE else -1), \
            f"layer {f // E} expert {f % E}: host map {hm[f]}, cache {['free', 'loading', 'ready'][st]} in slot {want}"


def drive(rt, sim: RunAhead, ids: np.ndarray, S: int, seed: int, right: float = 0.7) -> None:
    """RunaheadDecodeGraph's host order: launch, then per MoE layer wait for its log ->
    demand(wait=False) -> end_layer(pregate=); finish (device done) -> settled. The predicted
    logits boost what the next layers route with probability `right`, else push it down (then
    prefetches evict what the device is about to use)."""
    n, L, _ = ids.shape
    E = rt.store.E
    rng = np.random.default_rng(seed)
    for t in range(n):
        rt.begin_step(np.zeros(1, dtype=np.int64))
        sim.start(ids[t])
        for l in range(L):
            sim.clock.advance(LAYER_S)
            sim.until_logged(l)
            rt.demand(l, ids[t, l][None, :], wait=False)
            check_map(rt, sim)
            nxt = ids[t, l + 1:l + 1 + S]
            lg = rng.normal(size=(len(nxt), E))
            for k, row in enumerate(nxt):
                lg[k, row] += 5.0 if rng.random() < right else -5.0
            rt.end_layer(l, pregate=lg if len(nxt) else None)
            check_map(rt, sim)
        rt.end_step()
        sim.finish()
        rt.settled()
        rt.prefetcher.poll()
        check_map(rt, sim)
    rt.cache.check()


def routing(n: int, L: int, E: int, A: int, seed: int) -> np.ndarray:
    """[n, L, A] distinct ids per (token, layer); a few hot experts per layer, so predictions and
    evictions keep revisiting the same experts."""
    rng = np.random.default_rng(seed)
    hot = [rng.choice(E, 2 * A, replace=False) for _ in range(L)]
    return np.stack([[rng.choice(hot[l] if rng.random() < 0.6 else E, A, replace=False) for l in range(L)]
                     for _ in range(n)]).astype(np.int32)


def run(mapped_pool, policy: str, frac: float, seed: int, n_tokens: int = 80, p_device: float = 0.5,
        right: float = 0.7):
    L, E, A = 12, 16, 2
    n = max(3 * A, int(frac * L * E))
    pool = mapped_pool(n, L, E)
    sim = RunAhead(pool, seed, p_device=p_device)
    rt = OffloadRuntime(None, "numpy", policy=policy, slots=n, store=NullStore(L, E, A, BLOB),
                        pool=pool, engine=sim, keep_log=False)
    watch(sim, pool)
    drive(rt, sim, routing(n_tokens, L, E, A, seed), S=2 if policy == "expertflow" else 1, seed=seed, right=right)
    return rt, sim


@pytest.mark.parametrize("frac", [0.08, 0.15, 0.25])
@pytest.mark.parametrize("seed", range(3))
def test_expertflow_run_ahead_protocol(mapped_pool, frac, seed):
    rt, sim = run(mapped_pool, "expertflow", frac, seed)
    s = rt.summary()
    assert s["prefetch_issued"] > 0 and s["prefetch_wasted"] > 0 and s["misses"] > 0
    assert sim.guards > 0


@pytest.mark.parametrize("policy", ["ondemand", "pregate"])
def test_other_policies_run_ahead_protocol(mapped_pool, policy):
    rt, _ = run(mapped_pool, policy, 0.15, 5)
    assert rt.summary()["misses"] > 0


def test_a_demand_copy_waits_while_its_victims_layer_is_claimed(mapped_pool):
    """Layers 0, 1, 2 route a, V, Z, all resident: the device passes all three gates and runs
    layer 2 (claimed) before the host is done with layer 0. A prefetch for layer 1 evicts V (LRU);
    the host's demand of layer 1 copies V again and evicts Z, which layer 2's kernels read: that
    copy must wait behind a guard until the claim ends (the step's end here)."""
    a, V, Z, W = 0, 1, 2, 3
    pool = mapped_pool(3, 3, 4)
    sim = RunAhead(pool, 0, p_device=0.0, p_copy=0.0)
    rt = OffloadRuntime(None, "numpy", policy="ondemand", slots=3, store=NullStore(3, 4, 1, BLOB),
                        pool=pool, engine=sim, keep_log=False)
    ids = np.array([[a], [V], [Z]])
    drive(rt, sim, ids[None], S=1, seed=0)                 # step 0: a, V, Z loaded
    rt.begin_step(np.zeros(1, dtype=np.int64))
    sim.start(ids)
    while sim.claim != 2:
        assert sim._device_step()
    rt.demand(0, ids[0][None], wait=False)
    rt.end_layer(0)
    assert rt.prefetcher.load(1, W, prefetch=True)           # evicts V: layer 1 is done
    assert rt.cache.state[1 * 4 + V] == FREE
    while sim.queue:
        assert sim._copy_step()
    slot_z = int(rt.cache.slot_of[2 * 4 + Z])
    rt.demand(1, ids[1][None], wait=False)                   # V again: evicts Z (LRU)
    assert rt.cache.state[2 * 4 + Z] == FREE and rt.cache.slot_of[1 * 4 + V] == slot_z
    assert sim.queue[0] == ("guard", 2) and not sim._copy_step()    # held while layer 2 runs
    rt.end_layer(1)
    sim.finish()                                             # step_done ends the claim
    assert sim.content[slot_z] == (1, V)
    rt.settled()
    rt.end_step()


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
