"""Copy engines (one event per expert load) and the prefetcher that feeds them in priority order.

A CopyEngine moves one blob into one device slot per `submit(nbytes, fn, slot=, blob=)` and returns
an Event (simulated engines run `fn`, which writes the pool; a CUDA engine copies `blob` into
`pool.slot_array(slot)` itself):
  event.done() -> bool      has the copy landed (never blocks)
  event.wait() -> float     make the compute side wait for it; returns the stall it measured
                            (simulated engines: their clock; a CUDA engine makes the compute
                            stream wait on the event and measures stall with CUDA events)
  event.nbytes, event.seconds   size and copy duration, for the measured bandwidth C_s
Engines here:
  ImmediateEngine  copies inside submit (deterministic, no time model)
  ThreadEngine     a copy thread, FIFO, sleeps so a copy takes nbytes / bandwidth (+ latency):
                   the numpy stand-in for a CUDA copy stream; stall is wall-clock time
  VirtualEngine    the same timing on a virtual clock that the caller advances for compute:
                   deterministic timed replay of traces (misses, stall, overlap) in milliseconds
The CUDA engine plugs in behind the same calls: submit stages the blob in pinned memory (or
reads a registered mapping) and copies on its own stream, recording one cudaEvent per load;
done() queries it; wait() makes the compute stream wait on it (no host sync) and keeps a pair of
timing events around the wait; two optional hooks the runtime calls when present:
  fence(slot)     after the model issued its work on a slot: the next copy into that slot waits
                  for a compute-stream event recorded here (no overwrite under a running kernel)
  drain_stall()   at the end of a step: stall seconds measured by the timing events since the
                  last call (host clocks see none: the wait is on the device)
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np

from ..errors import ConfigError, EfError
from .pool import unassign


class WallClock:
    def now(self) -> float:
        return time.perf_counter()

    def advance(self, seconds: float) -> None:
        """Compute time passes by itself on a wall clock."""


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += max(0.0, seconds)


class _DoneEvent:
    def __init__(self, nbytes: int, seconds: float):
        self.nbytes, self.seconds = nbytes, seconds

    def done(self) -> bool:
        return True

    def wait(self) -> float:
        return 0.0


class ImmediateEngine:
    """Copies run inside submit; nothing is ever in flight."""

    def __init__(self):
        self.clock = WallClock()

    def submit(self, nbytes: int, fn: Callable[[], None], **job) -> _DoneEvent:
        t0 = time.perf_counter()
        fn()
        return _DoneEvent(nbytes, time.perf_counter() - t0)

    def close(self) -> None:
        pass


class _ThreadEvent:
    def __init__(self, nbytes: int, clock: WallClock):
        self.nbytes, self.seconds, self.clock = nbytes, 0.0, clock
        self.flag = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.flag.is_set()

    def wait(self) -> float:
        t0 = self.clock.now()
        self.flag.wait()
        if self.error is not None:
            raise EfError(f"expert copy failed: {self.error}") from self.error
        return self.clock.now() - t0


class ThreadEngine:
    """A copy thread with a configurable bandwidth (bytes/s; None = as fast as memcpy)."""

    def __init__(self, bandwidth: float | None = None, latency: float = 0.0):
        if bandwidth is not None and bandwidth <= 0:
            raise ConfigError(f"copy bandwidth must be positive, got {bandwidth}")
        self.bandwidth, self.latency = bandwidth, latency
        self.clock = WallClock()
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="efengine-copy", daemon=True)
        self.thread.start()

    def submit(self, nbytes: int, fn: Callable[[], None], **job) -> _ThreadEvent:
        ev = _ThreadEvent(nbytes, self.clock)
        self.jobs.put((ev, fn))
        return ev

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            ev, fn = job
            t0 = time.perf_counter()
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                ev.error = e
            if self.bandwidth:
                rest = ev.nbytes / self.bandwidth + self.latency - (time.perf_counter() - t0)
                if rest > 0:
                    time.sleep(rest)
            ev.seconds = time.perf_counter() - t0
            ev.flag.set()

    def close(self) -> None:
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()


class _VirtualEvent:
    def __init__(self, nbytes: int, start: float, finish: float, clock: VirtualClock):
        self.nbytes, self.seconds, self.finish, self.clock = nbytes, finish - start, finish, clock

    def done(self) -> bool:
        return self.clock.now() >= self.finish

    def wait(self) -> float:
        stall = max(0.0, self.finish - self.clock.now())
        self.clock.advance(stall)
        return stall


class VirtualEngine:
    """One FIFO copy queue on a virtual clock: a copy starts when the queue is free and takes
    nbytes / bandwidth + latency. Bytes land at submit (the timing is what is simulated)."""

    def __init__(self, bandwidth: float, latency: float = 0.0, clock: VirtualClock | None = None):
        if bandwidth <= 0:
            raise ConfigError(f"copy bandwidth must be positive, got {bandwidth}")
        self.bandwidth, self.latency = bandwidth, latency
        self.clock = clock or VirtualClock()
        self.busy_until = 0.0

    def submit(self, nbytes: int, fn: Callable[[], None], **job) -> _VirtualEvent:
        fn()
        start = max(self.clock.now(), self.busy_until)
        self.busy_until = start + nbytes / self.bandwidth + self.latency
        return _VirtualEvent(nbytes, start, self.busy_until, self.clock)

    def close(self) -> None:
        pass


class Prefetcher:
    """Expert loads on a copy engine: demand loads at once, prefetch requests in priority order.

    Requests are (MoE layer i, expert e, deadline tick, score): lower (deadline, score) goes first;
    a request is dropped when its deadline has passed or the expert became present. At most
    `max_inflight` prefetches are in flight (demand loads are not counted), so a demand miss never
    queues behind more than that many copies.
    """

    def __init__(self, cache, pool, store, engine, stats, *, max_inflight: int = 4,
                 on_copy: Callable[[int, float], None] | None = None):
        self.cache, self.pool, self.store, self.engine, self.stats = cache, pool, store, engine, stats
        self.max_inflight = max(1, int(max_inflight))
        self.on_copy = on_copy
        self.inflight: dict[int, tuple[object, bool]] = {}      # flat id -> (event, is prefetch)
        self.requests: dict[int, tuple[int, float]] = {}        # flat id -> (deadline, score)
        self.timing: list = []                                  # landed or waited, not yet timed
        # run-ahead decode: the MoE layer whose gate the device has reached in this step (it may be
        # further ahead); None while no gate runs. Set by the runtime's demand(wait=False).
        self.device_at: int | None = None

    # ---- loads -------------------------------------------------------------------------------------
    def load(self, i: int, e: int, *, prefetch: bool = False, protect: np.ndarray | None = None) -> bool:
        """Start copying expert e of MoE layer i into a slot; False when no slot can be had now."""
        got = self.cache.allocate(i, e, prefetch=prefetch, protect=protect)
        if got is None:
            return False
        slot, evicted = got
        if evicted >= 0:
            unassign(self.pool, slot)
            if self.cache.prefetched[evicted]:
                self.cache.prefetched[evicted] = False
                self.stats.prefetch_wasted += 1
        blob = self.store.blob(i, e)
        nbytes = self.store.blob_nbytes
        # run-ahead decode: a victim of a layer past the one whose gate the device has reached may
        # be in use, the device being further ahead (a gate whose experts are resident passes at
        # once). A prefetch's, plainly; a demand load's too: a prefetch may evict an expert after
        # its gate passed, and the host's demand of that layer copies it again, evicting one of a
        # layer further ahead. Earlier layers' claims have ended, the reached layer's own experts
        # are pinned. Engines without a run-ahead pool ignore the guard.
        at, ev_i = self.device_at, evicted // self.cache.E
        guard = self.store.layers[ev_i] if evicted >= 0 and at is not None and ev_i > at else None
        ev = self.engine.submit(nbytes, lambda: self.pool.put(slot, blob) if blob is not None else None,
                                slot=slot, blob=blob, pool=self.pool, key=(self.store.layers[i], e), guard=guard)
        self.cache.set_event(i, e, ev)
        self.inflight[i * self.cache.E + e] = (ev, prefetch)
        self.requests.pop(i * self.cache.E + e, None)
        self.stats.copies += 1
        self.stats.bytes_copied += nbytes
        if prefetch:
            self.stats.prefetch_issued += 1
        return True

    def _finish(self, f: int) -> None:
        ev, _ = self.inflight.pop(f)
        i, e = divmod(f, self.cache.E)
        slot = self.cache.complete(i, e)
        self.pool.assign(self.store.layers[i], e, slot)
        self.timing.append(ev)
        self._account()

    def _account(self) -> None:
        """Copy durations of landed copies (bandwidth C_s). A CUDA wait does not block the host,
        so a waited-for copy may land later: it is counted then, never by syncing here."""
        keep = []
        for ev in self.timing:
            if not ev.done():
                keep.append(ev)
                continue
            self.stats.copy_s += ev.seconds
            if self.on_copy is not None:
                self.on_copy(ev.nbytes, ev.seconds)
        self.timing = keep

    def poll(self) -> None:
        """Mark every landed copy ready (in submit order)."""
        for f in [f for f, (ev, _) in self.inflight.items() if ev.done()]:
            self._finish(f)
        self._account()

    def wait(self, i: int, e: int) -> float:
        """Wait for the copy of (i, e); returns the stall."""
        f = i * self.cache.E + e
        ev, _ = self.inflight[f]
        stall = ev.wait()
        self._finish(f)
        return stall

    def wait_any(self, host: bool = False) -> float:
        """Wait for the oldest copy in flight (to free a slot); returns the stall. host=True: the
        host waits for it (an engine's `sync`), not the compute stream (run-ahead decode)."""
        f = next(iter(self.inflight))
        if host:
            ev, _ = self.inflight[f]
            getattr(ev, "sync", ev.wait)()
            self._finish(f)
            return 0.0
        return self.wait(*divmod(f, self.cache.E))

    def in_flight(self, i: int, e: int) -> bool:
        return i * self.cache.E + e in self.inflight

    def prefetches_in_flight(self) -> int:
        return sum(1 for _, p in self.inflight.values() if p)

    # ---- prefetch requests -------------------------------------------------------------------------
    def request(self, i: int, e: int, deadline: int, score: float = 0.0) -> None:
        f = i * self.cache.E + e
        old = self.requests.get(f)
        if old is None or (deadline, score) < old:
            self.requests[f] = (deadline, score)

    def clear_requests(self) -> None:
        self.requests.clear()

    def backlog(self) -> int:
        """Bytes queued or copying on the engine."""
        return sum(ev.nbytes for ev, _ in self.inflight.values() if not ev.done())

    def pump(self, tick: int, *, protect: np.ndarray | None = None,
             worth: Callable[[int, int], bool] | None = None, max_backlog: int | None = None,
             max_inflight: int | None = None) -> int:
        """Drop useless requests, then issue the best ones while the in-flight bound allows.

        worth(flat, victim) may veto a prefetch that would evict `victim` (victim -1: a free slot).
        max_backlog (bytes): issue only while the engine has less than this queued, so prefetches
        use idle copy time and a demand miss never waits behind more than that.
        max_inflight: this call's bound on prefetches in flight (default: the prefetcher's).
        Returns how many copies were started."""
        bound = self.max_inflight if max_inflight is None else max(1, int(max_inflight))
        if not self.requests:              # nothing asked: nothing to drop or start
            return 0
        E = self.cache.E
        for f, (deadline, _) in list(self.requests.items()):
            if deadline < tick or self.cache.state[f] != 0:
                del self.requests[f]
                self.stats.prefetch_dropped += 1
        started = 0
        for f, _ in sorted(self.requests.items(), key=lambda kv: kv[1]):
            if self.prefetches_in_flight() >= bound:
                break
            if max_backlog is not None and self.backlog() + self.store.blob_nbytes > max_backlog:
                break
            i, e = divmod(f, E)
            if worth is not None:
                v = self.cache.peek_victim(i, protect)
                if v == -2 or (v >= 0 and not worth(f, v)):
                    continue
            if not self.load(i, e, prefetch=True, protect=protect):
                break
            started += 1
        return started
