"""Host tiers: where expert blobs are read from before a copy moves them to the device.

Legend: L MoE layers (MoE order i = 0..L-1; `layers[i]` is the model's layer number), E experts.

HostStore(source) serves one contiguous blob per expert:
  - from the memory-mapped .ef (EfFile.expert_blob: no copy; the page cache is the tier), or
  - from a RAM tier of `host_bytes` (LRU over blobs; all of them when RAM allows). Its buffer
    comes from `alloc(nbytes)`: numpy memory here, pinned memory on CUDA (pass
    cupyx.empty_pinned-style allocator) so copies run at full PCIe speed. An allocation that
    fails leaves no tier (blobs come from the mapping) with a warning naming the sizes.
    A tier blob is filled from the mapping on first use by `copy_threads` threads (ParallelCopy).
    LRU reuse is safe while the tier holds more blobs than the device cache has slots: copies in
    flight each own a device slot and read the most recently served blobs, never the LRU one
    (build_provider enforces it: a smaller tier holds nothing the GPU does not).
Sources without stored blobs (in-memory test models) are packed as float32 gate|up|down.
`decode(blob)` turns a blob back into {gate, up, down} float32 exactly as EfFile does.
`plan_tier(requested, need)` sizes a tier against /proc/meminfo's MemAvailable (less a margin).
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from .. import quant
from ..errors import ConfigError

PARTS = ("gate", "up", "down")


class HostStore:
    def __init__(self, source, *, host_bytes: int = 0,
                 alloc: Callable[[int], np.ndarray] | None = None, copy_threads: int = 1):
        cfg = source.config
        self.source = source
        self.layers = tuple(getattr(source, "expert_layers", None) or cfg.moe_layers)
        if not self.layers:
            raise ConfigError("offload: the model has no MoE layers, there are no experts to offload")
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.L, self.E, self.A = len(self.layers), int(cfg.n_experts), int(cfg.top_k)
        self.packed = not hasattr(source, "expert_blob")
        if self.packed:
            w = source.expert_weights(self.layers[0], 0)
            self.shapes = {p: tuple(w[p].shape) for p in PARTS}
            self.blob_nbytes = sum(int(np.prod(s)) * 4 for s in self.shapes.values())
        else:
            self.layout = source.expert_layout
            self.blob_nbytes = int(source.blob_nbytes)
        n = int(host_bytes) // self.blob_nbytes if host_bytes else 0
        self.ram_slots = min(n, self.L * self.E)
        self.ram = None
        self.copy = ParallelCopy(copy_threads)
        if self.ram_slots:
            self.ram = self._alloc(alloc or (lambda nbytes: np.empty(nbytes, dtype=np.uint8)))
            self.ram_map: OrderedDict[int, int] = OrderedDict()     # flat id -> RAM slot
        self.reads = 0                                              # blobs read from the source

    def _alloc(self, alloc: Callable[[int], np.ndarray]) -> np.ndarray | None:
        nbytes = self.ram_slots * self.blob_nbytes
        try:
            buf = alloc(nbytes)
        except Exception as e:  # noqa: BLE001  (cupy raises its own errors for pinned memory)
            warnings.warn(f"host tier: could not allocate {gib(nbytes)} ({self.ram_slots} experts) of "
                          f"host memory ({type(e).__name__}: {e}); staging experts from the mapped file "
                          "instead (lower --host-mem, or --host-mem 0 to skip the tier)", stacklevel=3)
            self.ram_slots = 0
            return None
        return np.asarray(buf).reshape(-1)[:nbytes].reshape(self.ram_slots, self.blob_nbytes)

    @property
    def tier_bytes(self) -> int:
        """Bytes of the RAM tier (0: blobs come from the mapping)."""
        return self.ram_slots * self.blob_nbytes

    def mapped_region(self) -> np.ndarray | None:
        """uint8 view of the mapping holding every expert blob back to back (for registering it
        with CUDA), or None when the blobs are not one contiguous run of a mapped file."""
        if self.packed or not hasattr(self.source, "expert_offset"):
            return None
        first, last = self.source.expert_blob(self.layers[0], 0), self.source.expert_blob(self.layers[-1], self.E - 1)
        span = last.ctypes.data + last.size - first.ctypes.data
        if span != self.L * self.E * self.blob_nbytes:
            return None
        base = self.source.expert_offset(self.layers[0], 0)
        mm = getattr(self.source, "mm", None)
        return None if mm is None else mm[base:base + span]

    @property
    def n_experts_total(self) -> int:
        return self.L * self.E

    def blob(self, i: int, e: int) -> np.ndarray:
        """uint8 [blob_nbytes] of expert e of MoE layer i (a view: do not write to it)."""
        if self.ram is None:
            return self._read(i, e)
        f = i * self.E + e
        slot = self.ram_map.get(f)
        if slot is not None:
            self.ram_map.move_to_end(f)
            return self.ram[slot]
        if len(self.ram_map) < self.ram_slots:
            slot = len(self.ram_map)
        else:
            _, slot = self.ram_map.popitem(last=False)
        self.copy(self.ram[slot], self._read(i, e))
        self.ram_map[f] = slot
        return self.ram[slot]

    def _read(self, i: int, e: int) -> np.ndarray:
        self.reads += 1
        layer = self.layers[i]
        if not self.packed:
            return self.source.expert_blob(layer, e)
        w = self.source.expert_weights(layer, e)
        return np.concatenate([np.ascontiguousarray(w[p], dtype=np.float32).reshape(-1) for p in PARTS]).view(np.uint8)

    def decode(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        """{gate [I, D], up [I, D], down [D, I]} float32 from a blob (the same bits EfFile gives)."""
        if self.packed:
            out, o = {}, 0
            f = np.asarray(blob).view(np.float32)
            for p in PARTS:
                n = int(np.prod(self.shapes[p]))
                out[p] = f[o:o + n].reshape(self.shapes[p])
                o += n
            return out
        return {p: quant.dequantize(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group)
                for p, t in self.layout.items()}

    def warm(self, progress: Callable[[int], None] | None = None) -> None:
        """Fill the RAM tier in expert order (up to its size)."""
        for f in range(min(self.ram_slots, self.L * self.E)):
            self.blob(f // self.E, f % self.E)
            if progress:
                progress(f)


    def close(self) -> None:
        self.copy.close()


class ParallelCopy:
    """dst[:] = src split over `threads` threads. numpy releases the GIL while it copies, and the
    page faults of a cold mapping are served in parallel, so a copy out of the page cache or the
    disk runs several times faster than on one thread (hardware.md: ~10 GB/s on one)."""

    def __init__(self, threads: int = 1, min_chunk: int = 4 << 20):
        if int(threads) < 1:
            raise ConfigError(f"copy threads must be >= 1, got {threads}")
        self.threads, self.min_chunk = int(threads), int(min_chunk)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="efengine-stage") if self.threads > 1 else None

    def __call__(self, dst: np.ndarray, src: np.ndarray) -> None:
        n = src.size
        if dst.size < n:
            raise ConfigError(f"staging copy: destination of {dst.size} bytes for a blob of {n}")
        step = -(-n // self.threads)
        step = -(-max(step, self.min_chunk) // 4096) * 4096        # whole pages per thread
        if self.pool is None or step >= n:
            np.copyto(dst[:n], src)
            return
        futs = [self.pool.submit(np.copyto, dst[o:min(o + step, n)], src[o:o + step]) for o in range(0, n, step)]
        for f in futs:
            f.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def mem_info() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where there is none: not Linux)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                parts = v.split()
                if parts and parts[0].isdigit():
                    out[k] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def mem_available() -> int | None:
    """Bytes the kernel can hand out without swapping (MemAvailable), None when unknown."""
    info = mem_info()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def ram_margin(available: int) -> int:
    """RAM left to the rest of the process and the system: max(2 GiB, 10% of what is available)."""
    return max(2 << 30, available // 10)


def plan_tier(requested: int | None, need: int, available: int | None = None,
              what: str | None = None) -> tuple[int, str | None]:
    """(bytes of the host tier, warning or None) for a request of `requested` bytes (None: all the
    `need` bytes of experts when they fit; 0: no tier). A tier that does not fit in available RAM
    less ram_margin() is not made: experts are staged from the mapping, and the warning says so."""
    if requested is not None and int(requested) <= 0:
        return 0, None
    want = need if requested is None else min(int(requested), need)
    available = mem_available() if available is None else available
    if available is None:
        return (want, None) if requested is not None else \
               (0, "host tier: available RAM unknown, staging experts from the mapped file (set --host-mem)")
    room = max(0, available - ram_margin(available))
    if want <= room:
        return want, None
    what = what or ("all experts" if requested is None else "--host-mem")
    return 0, (f"host tier: {what} would take {gib(want)} but only {gib(available)} of RAM is available "
               f"({gib(room)} after a {gib(available - room)} margin); staging experts from the mapped "
               f"file instead (slower copies; --host-mem 0 silences this)")


def open_store(source, host_mem: int | None, *, device_slots: int,
               alloc: Callable[[int], np.ndarray] | None = None, copy_threads: int = 1,
               available: int | None = None) -> HostStore:
    """The HostStore for `--host-mem` (None: all experts when RAM allows; 0: none). The tier is
    only made when it holds more than the device cache (`device_slots` experts) or every expert:
    a smaller one would hold nothing the GPU does not, and LRU reuse of its blobs is safe only
    then (module docstring). Anything that does not fit warns and stages from the mapping."""
    probe = HostStore(source)                       # sizes only: no tier yet
    total, blob = probe.L * probe.E, probe.blob_nbytes
    if host_mem is None and device_slots >= total:
        return probe                                # every expert resident: each is copied once
    nbytes, warning = plan_tier(host_mem, total * blob, available)
    slots = nbytes // blob
    if nbytes and slots < total and slots <= device_slots:
        warning = (f"host tier: --host-mem {gib(nbytes)} holds {slots} experts, no more than the GPU "
                   f"cache's {device_slots}: it would hold nothing the GPU does not; staging experts "
                   "from the mapped file")
        nbytes = 0
    if warning:
        warnings.warn(warning, stacklevel=3)
    if not nbytes:
        return probe
    return HostStore(source, host_bytes=nbytes, alloc=alloc, copy_threads=copy_threads)


class NullStore:
    """A store without bytes (timed trace replay: only sizes and timing matter)."""

    packed = True
    has_bytes = False

    def __init__(self, n_layers: int, n_experts: int, top_k: int, blob_nbytes: int):
        self.L, self.E, self.A, self.blob_nbytes = n_layers, n_experts, top_k, int(blob_nbytes)
        self.layers = tuple(range(n_layers))
        self.index = {l: l for l in self.layers}
        self.reads = 0

    def blob(self, i: int, e: int):
        return None


def resolve_slots(store, slots: int | None = None, fraction: float | None = None,
                  budget_bytes: int | None = None) -> int:
    """Slots from exactly one of: a count, a fraction of all experts, a byte budget."""
    given = [x is not None for x in (slots, fraction, budget_bytes)]
    total = store.L * store.E
    if sum(given) > 1:
        raise ConfigError("offload: give one of slots, fraction or budget_bytes")
    if slots is not None:
        n = int(slots)
    elif fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"offload: cache fraction must be in (0, 1], got {fraction}")
        n = int(fraction * total)
    elif budget_bytes is not None:
        n = int(budget_bytes) // store.blob_nbytes
    else:
        n = total
    if n < 1:
        raise ConfigError(f"offload: the expert budget holds no expert (one needs {store.blob_nbytes} bytes)")
    return min(n, total)
