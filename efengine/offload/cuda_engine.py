"""CudaEngine: expert copies on their own CUDA stream, one event per load (CuPy).

Host blobs (views of the mapped .ef, or the RAM tier) are staged into a ring of pinned buffers,
then copied with cudaMemcpyAsync on the copy stream into the pool slot; the load's event is
recorded after it. The compute stream never blocks the host: `wait()` makes it wait on the event
and brackets the wait with two timing events, whose elapsed time is the stall (`drain_stall()`).
With a pool host map (run-ahead decode) each copy is followed on the copy stream by `publish`,
which writes the slot into the map once the bytes have landed (kernels/offload.cu).
`fence(slot)` records the compute stream's progress after the model used a slot; the next copy
into that slot waits for it, so a copy never overwrites weights a queued kernel still reads.

Staging fills the ring buffer with `staging_threads` threads (store.ParallelCopy; one thread
copies at ~10 GB/s, hardware.md): submit returns once the blob is staged and its copy queued, so
the next blob is staged while this one crosses PCIe. With `direct_pinned=True`, blobs that already
live in page-locked memory (cupyx.empty_pinned, a registered mapping) are copied straight from
there at full PCIe speed, without staging: the caller promises not to change such a blob until its
copy has landed (read-only host tiers; the bench's pinned blob set).

`register_host(array)` page-locks an existing host range (the .ef mapping's expert region, see
HostStore.mapped_region) with cudaHostRegister, so its blobs count as pinned for direct copies.
It faults in and locks every page of the range (RAM for all of it, as a pinned tier needs, but no
second copy: the page cache is the tier). Which of the three is fastest on a given host:
`python -m efengine.host_bench` (figures in the README).
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .prefetch import WallClock
from .store import ParallelCopy

PAGE = 4096
HOST_REGISTER_READ_ONLY = 8          # cudaHostRegisterReadOnly (CUDA >= 11.1): the mapping is PROT_READ


class _CudaEvent:
    def __init__(self, engine, nbytes: int, start, end):
        self.engine, self.nbytes, self.start, self.end = engine, nbytes, start, end

    def done(self) -> bool:
        return self.end.done

    @property
    def seconds(self) -> float:
        self.end.synchronize()
        import cupy
        return cupy.cuda.get_elapsed_time(self.start, self.end) / 1e3

    def sync(self) -> None:
        """The host waits for the copy (run-ahead decode: the device has its own waits)."""
        self.end.synchronize()

    def wait(self) -> float:
        import cupy
        t0, t1 = self.engine.timing_pair()
        compute = self.engine.compute or cupy.cuda.get_current_stream()
        t0.record(compute)
        compute.wait_event(self.end)
        t1.record(compute)
        self.engine.waits.append((t0, t1))
        return 0.0          # measured on the device: see drain_stall


def _pinned(a: np.ndarray) -> bool:
    """Is a contiguous host array in page-locked memory (so a DMA can read it as it is)?"""
    if not a.flags.c_contiguous:
        return False
    import cupy
    try:
        return cupy.cuda.runtime.pointerGetAttributes(a.ctypes.data).type == 1     # cudaMemoryTypeHost
    except Exception:  # noqa: BLE001  (unregistered memory on older drivers raises)
        return False


def _slot_ptr(pool, slot: int) -> int:
    """Device address of a pool slot (ExpertPool: base + slot * stride, no view made per copy)."""
    base = getattr(pool, "base", None)
    if isinstance(base, int) and hasattr(pool, "stride"):
        return base + slot * pool.stride
    return pool.slot_array(slot).data.ptr


class HostRegistration:
    """A host range page-locked with cudaHostRegister; `close()` unregisters it (the range must stay
    mapped until then: keep the array)."""

    def __init__(self, array: np.ndarray):
        import cupy
        a = np.asarray(array)
        if not a.flags.c_contiguous or a.size == 0:
            raise ConfigError("register_host: needs a non-empty contiguous host array")
        start = a.ctypes.data // PAGE * PAGE                       # a mapping is page-granular
        end = -(-(a.ctypes.data + a.nbytes) // PAGE) * PAGE
        self.array, self.ptr, self.nbytes = a, start, end - start
        rt = cupy.cuda.runtime
        try:
            rt.hostRegister(self.ptr, self.nbytes, HOST_REGISTER_READ_ONLY)
        except rt.CUDARuntimeError:
            rt.hostRegister(self.ptr, self.nbytes, 0)             # older drivers: no read-only flag
        self.registered = True

    def close(self) -> None:
        if self.registered:
            import cupy
            cupy.cuda.runtime.hostUnregister(self.ptr)
            self.registered = False


def register_host(array: np.ndarray) -> HostRegistration:
    """Page-lock `array`'s pages for direct DMA (raises cupy's CUDARuntimeError when the driver
    refuses, e.g. not enough lockable memory: callers fall back to staging)."""
    return HostRegistration(array)


class CudaEngine:
    def __init__(self, n_staging: int = 4, compute_stream=None, direct_pinned: bool = False,
                 staging_threads: int = 1):
        import cupy
        self.direct_pinned = direct_pinned
        self.direct_copies = 0
        self.staged_copies = 0
        self.copy = ParallelCopy(staging_threads)
        self.registrations: list[HostRegistration] = []    # unregistered on close()
        self.cupy = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.compute = compute_stream
        self.n_staging = max(1, n_staging)
        self.staging: list = []
        self.staged: list = [None] * self.n_staging      # event of the copy that read each buffer
        self.k = 0
        self.fences: dict[int, object] = {}
        self.waits: list = []
        self.clock = WallClock()
        # reused events (no allocation per layer): fences once a copy stream waited on them (a wait
        # takes the event's state at the call), timing pairs once drain_stall has read them
        self.spare_fences: list = []
        self.spare_pairs: list = []
        self.pinned_at: dict[int, bool] = {}    # host address -> page-locked (pointerGetAttributes)

    def timing_pair(self) -> tuple:
        if self.spare_pairs:
            return self.spare_pairs.pop()
        return self.cupy.cuda.Event(), self.cupy.cuda.Event()

    def _is_pinned(self, host: np.ndarray) -> bool:
        if not host.flags.c_contiguous:
            return False
        p = host.ctypes.data
        got = self.pinned_at.get(p)
        if got is None:
            if len(self.pinned_at) > 65536:
                self.pinned_at.clear()
            got = self.pinned_at[p] = _pinned(host)
        return got

    def _stage(self, blob: np.ndarray):
        import cupyx
        if not self.staging:
            self.staging = [None] * self.n_staging
        k = self.k
        self.k = (k + 1) % self.n_staging
        if self.staged[k] is not None:
            self.staged[k].synchronize()                     # its previous copy has read it
        if self.staging[k] is None or self.staging[k].size < blob.size:   # blobs are equal-sized
            self.staging[k] = cupyx.empty_pinned(blob.size, dtype=np.uint8)
        self.copy(self.staging[k], blob)
        self.staged_copies += 1
        return k, self.staging[k]

    def submit(self, nbytes: int, fn, *, slot: int, blob, pool, key=None, guard=None, **job) -> _CudaEvent:
        """Queue blob -> slot; key (model layer, expert) names it in the pool's host map, if any;
        guard: the model layer of the expert it evicts, when a run-ahead gate may still claim it."""
        cp = self.cupy
        start, end = cp.cuda.Event(), cp.cuda.Event()
        fence = self.fences.pop(slot, None)
        if fence is not None:
            self.stream.wait_event(fence)
            self.spare_fences.append(fence)
        hm = getattr(pool, "host_map", None)
        if hm is not None and guard is not None:
            from ..ops.gpu_ops import slot_guard
            slot_guard(pool.progress, guard, pool.err, self.stream)
        if isinstance(blob, cp.ndarray):                      # already on the device
            dst = pool.slot_array(slot)
            start.record(self.stream)
            with self.stream:
                dst[: blob.size] = blob
        elif self.direct_pinned and self._is_pinned(np.asarray(blob)):
            host = np.asarray(blob).reshape(-1)
            start.record(self.stream)
            cp.cuda.runtime.memcpyAsync(_slot_ptr(pool, slot), host.ctypes.data, host.size, 1, self.stream.ptr)
            self.direct_copies += 1
        else:
            k, buf = self._stage(np.asarray(blob).reshape(-1))
            start.record(self.stream)
            cp.cuda.runtime.memcpyAsync(_slot_ptr(pool, slot), buf.ctypes.data, blob.size, 1, self.stream.ptr)
            self.staged[k] = end
        if hm is not None and key is not None:       # run-ahead: the device learns it has landed
            from ..ops.gpu_ops import publish
            publish(pool.host_map_addr(*key), slot, self.stream)
        end.record(self.stream)
        return _CudaEvent(self, nbytes, start, end)

    def fence(self, slot: int) -> None:
        ev = self.spare_fences.pop() if self.spare_fences else self.cupy.cuda.Event(disable_timing=True)
        ev.record(self.compute or self.cupy.cuda.get_current_stream())
        self.fences[slot] = ev

    def drain_stall(self) -> float:
        total = 0.0
        for t0, t1 in self.waits:
            t1.synchronize()
            total += self.cupy.cuda.get_elapsed_time(t0, t1) / 1e3
        self.spare_pairs.extend(self.waits)
        self.waits.clear()
        return total

    def close(self) -> None:
        self.stream.synchronize()
        self.copy.close()
        for r in self.registrations:
            r.close()
        self.registrations.clear()
