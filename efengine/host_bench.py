"""`python -m efengine.host_bench`: how fast expert blobs get from host memory toward the GPU.

    python -m efengine.host_bench [--gb 4] [--blob-mb 99.09] [--threads 1,2,4,8] [--dir DIR]
                                  [--cpu] [--json OUT]

Writes a temporary raw file of N random expert-sized blobs (Mixtral-8x7B int4: 99,090,432 bytes
each) under DIR (default: the system temp folder), maps it read-only as the engine maps a .ef, and
times each way of serving its blobs (GB/s = blob bytes moved / wall time, end synchronized):

  CUDA (CuPy and a GPU present, unless --cpu):
    pinned_tier      (a) blobs already in a pinned RAM tier, DMA straight to device slots
                         (its one-time fill from the mapping is reported as fill_GBps)
    staging_T        (b) CudaEngine staging each blob into a ring of pinned buffers with T threads
                         (store.ParallelCopy) while the previous blob's DMA runs
    registered       (c) the mapping page-locked with cudaHostRegister, DMA straight from it
                         (registering faults in and locks every page: register_s)
  everywhere:
    numpy_stage_T    staging from the mapping into a ring of numpy buffers with T threads
    numpy_ram        copies from a RAM array (the memcpy ceiling of the staging ways)

Ways that read the mapping run twice: "cold" after posix_fadvise(DONTNEED) dropped the file from
the page cache, and "warm" with it cached; `cached_before` is the fraction of the file's pages in
the page cache just before the run (mincore), so a cold run that was not cold shows it (tmpfs
folders cannot be dropped). JSON goes to stdout (or --json), a table to stderr.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError, EfError
from .offload.store import ParallelCopy

MIXTRAL_Q4_BLOB = 99_090_432
PAGE = 4096


# ---- the test file and the page cache ------------------------------------------------------------
def make_file(folder: str | Path, n_blobs: int, blob_nbytes: int, seed: int = 0) -> Path:
    """A raw file of n_blobs random blobs (one random block, each blob stamped with its index)."""
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, blob_nbytes, dtype=np.uint8)
    fd, name = tempfile.mkstemp(prefix="efengine-host-bench-", suffix=".bin", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for k in range(n_blobs):
                block[:8] = np.frombuffer(np.int64(k).tobytes(), dtype=np.uint8)
                f.write(block.data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def drop_cache(path: Path) -> bool:
    """Ask the kernel to drop the file's clean pages from the page cache (no root needed)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def cached_fraction(mm: np.ndarray) -> float | None:
    """Fraction of a page-aligned mapping's pages in the page cache (mincore), None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    n = -(-mm.nbytes // PAGE)
    vec = np.zeros(n, dtype=np.uint8)
    rc = libc.mincore(ctypes.c_void_p(mm.ctypes.data), ctypes.c_size_t(mm.nbytes),
                      vec.ctypes.data_as(ctypes.c_void_p))
    return None if rc != 0 else round(float((vec & 1).mean()), 4)


def fs_type(folder: Path) -> str | None:
    """Filesystem type of `folder` from /proc/mounts (longest matching mount point)."""
    try:
        mounts = [line.split()[1:3] for line in open("/proc/mounts")]
    except OSError:
        return None
    real = str(Path(folder).resolve())
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1] if best else None


# ---- ways of serving blobs ---------------------------------------------------------------------
def _blobs(mm: np.ndarray, blob: int) -> list[np.ndarray]:
    return [mm[o:o + blob] for o in range(0, mm.size - blob + 1, blob)]


def numpy_stage(blobs: list, threads: int, ring: int = 4) -> float:
    """Seconds to copy every blob into a ring of numpy buffers with `threads` threads."""
    bufs = [np.empty(blobs[0].size, dtype=np.uint8) for _ in range(ring)]
    for b in bufs:
        b.fill(0)                                  # fault the ring in before timing
    copy = ParallelCopy(threads)
    t0 = time.perf_counter()
    for k, b in enumerate(blobs):
        copy(bufs[k % ring], b)
    dt = time.perf_counter() - t0
    copy.close()
    return dt


class _DevicePool:
    """Device slots for the copies (what CudaEngine.submit needs of a pool)."""

    def __init__(self, slots: int, blob: int):
        import cupy
        self.data = cupy.empty((slots, blob), dtype=cupy.uint8)
        self.base, self.stride = int(self.data.data.ptr), blob       # raw slot addresses

    def slot_array(self, slot: int):
        return self.data[slot]


def cuda_copies(blobs: list, pool: _DevicePool, **engine_kw) -> tuple[float, dict]:
    """Seconds for CudaEngine to move every blob into the pool's slots (round robin), synchronized."""
    import cupy
    from .offload.cuda_engine import CudaEngine
    eng = CudaEngine(n_staging=4, **engine_kw)
    slots = pool.data.shape[0]
    cupy.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for k, b in enumerate(blobs):
        eng.submit(b.size, None, slot=k % slots, blob=b, pool=pool)
    eng.stream.synchronize()
    dt = time.perf_counter() - t0
    eng.close()
    return dt, {"direct_copies": eng.direct_copies, "staged_copies": eng.staged_copies}


def _check(pool: _DevicePool, blobs: list) -> None:
    """The last blobs landed intact (a fast wrong copy must not win)."""
    import cupy
    slots = pool.data.shape[0]
    for k in range(max(0, len(blobs) - slots), len(blobs)):
        if not np.array_equal(cupy.asnumpy(pool.data[k % slots, :4096]), np.asarray(blobs[k][:4096])):
            raise EfError(f"host bench: blob {k} arrived wrong on the device")


# ---- the runs -----------------------------------------------------------------------------------
def _row(name: str, nbytes: int, seconds: float, **extra) -> dict:
    return {"method": name, "GBps": round(nbytes / seconds / 1e9, 3), "seconds": round(seconds, 4), **extra}


def _map(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint8, mode="r")


def _both(path: Path, run, name: str, nbytes: int, log, **extra) -> list[dict]:
    """`run(mm)` -> (seconds, info) on a fresh mapping of the file dropped from the page cache,
    then cached. Each run maps anew and lets go of its mapping: pages mapped into this process
    are not dropped by posix_fadvise."""
    out = []
    for state in ("cold", "warm"):
        dropped = drop_cache(path) if state == "cold" else None
        mm = _map(path)
        if state == "warm":
            int(mm[::PAGE].sum())                      # one byte a page: the whole file is read
        before = cached_fraction(mm)
        dt, info = run(mm)
        del mm
        r = _row(name, nbytes, dt, cache=state, cached_before=before, **extra, **info)
        if dropped is False:
            r["note"] = "posix_fadvise unavailable: the page cache was not dropped"
        out.append(r)
        log(f"{name:18} {state:4} {r['GBps']:7.2f} GB/s  (page cache before: {before})")
    return out


def run_cpu(path: Path, n: int, blob: int, threads: list[int], log) -> list[dict]:
    nbytes = n * blob
    rows = []
    for t in threads:
        rows += _both(path, lambda mm, t=t: (numpy_stage(_blobs(mm, blob), t), {}), f"numpy_stage_{t}",
                      nbytes, log, threads=t)
    ram = np.array(_blobs(_map(path), blob)[: min(n, 8)])
    dt = numpy_stage(list(ram), max(threads))
    rows.append(_row("numpy_ram", ram.nbytes, dt, threads=max(threads)))
    log(f"{'numpy_ram':18}      {rows[-1]['GBps']:7.2f} GB/s")
    return rows


def run_cuda(path: Path, n: int, blob: int, threads: list[int], log) -> list[dict]:
    import cupyx
    from .offload.cuda_engine import register_host
    nbytes = n * blob
    pool = _DevicePool(4, blob)
    rows = []
    # (a) pinned RAM tier: fill once from the (cold) mapping, then direct copies
    drop_cache(path)
    mm = _map(path)
    blobs = _blobs(mm, blob)
    before = cached_fraction(mm)
    tier = cupyx.empty_pinned(nbytes, dtype=np.uint8).reshape(n, blob)
    fill = ParallelCopy(max(threads))
    t0 = time.perf_counter()
    for k, b in enumerate(blobs):
        fill(tier[k], b)
    fill_s = time.perf_counter() - t0
    fill.close()
    dt, info = cuda_copies(list(tier), pool, direct_pinned=True)
    _check(pool, list(tier))
    rows.append(_row("pinned_tier", nbytes, dt, fill_GBps=round(nbytes / fill_s / 1e9, 3), fill_threads=max(threads),
                     fill_cached_before=before, **info))
    log(f"{'pinned_tier':18}      {rows[-1]['GBps']:7.2f} GB/s  (fill from cold mapping {rows[-1]['fill_GBps']} GB/s)")
    del tier, blobs, mm
    # (b) staging through the pinned ring, T threads
    for t in threads:
        def stage(mm, t=t):
            blobs = _blobs(mm, blob)
            dt, info = cuda_copies(blobs, pool, staging_threads=t)
            _check(pool, blobs)
            return dt, info
        rows += _both(path, stage, f"staging_{t}", nbytes, log, threads=t)
    # (c) the mapping registered with CUDA
    drop_cache(path)
    mm = _map(path)
    blobs = _blobs(mm, blob)
    before = cached_fraction(mm)
    t0 = time.perf_counter()
    try:
        reg = register_host(mm)
    except Exception as e:  # noqa: BLE001  (the driver may refuse file-backed or read-only pages)
        rows.append({"method": "registered", "error": f"{type(e).__name__}: {e}"})
        log(f"{'registered':18}      failed: {e}")
        return rows
    reg_s = time.perf_counter() - t0
    try:
        dt, info = cuda_copies(blobs, pool, direct_pinned=True)
        _check(pool, blobs)
    finally:
        reg.close()
    rows.append(_row("registered", nbytes, dt, register_s=round(reg_s, 3), register_cached_before=before,
                     register_GBps=round(nbytes / reg_s / 1e9, 3), **info))
    log(f"{'registered':18}      {rows[-1]['GBps']:7.2f} GB/s  (registering took {reg_s:.2f} s)")
    return rows


def run(gb: float, *, blob_nbytes: int = MIXTRAL_Q4_BLOB, threads: list[int] | None = None,
        folder: str | None = None, cpu: bool = False, log=None) -> dict:
    """Measure every way (see the module docstring); the temp file is removed afterwards."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    threads = threads or [1, 2, 4, 8]
    n = int(gb * 1e9) // blob_nbytes
    if n < 2 or min(threads) < 1:
        raise ConfigError(f"host bench: --gb {gb} holds {n} blobs of {blob_nbytes} bytes (need >= 2), "
                          f"threads {threads} (need >= 1)")
    folder = Path(folder or tempfile.gettempdir())
    from .ops import cupy_available
    cuda = not cpu and cupy_available()
    res = {"benchmark": "host_tiers", "backend": "cupy" if cuda else "numpy", "blob_bytes": blob_nbytes,
           "blobs": n, "bytes": n * blob_nbytes, "dir": str(folder), "fs": fs_type(folder),
           "cpu_count": os.cpu_count()}
    if cuda:
        import cupy
        from . import bench
        props = cupy.cuda.runtime.getDeviceProperties(0)
        res["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        res["h2d_pinned_GBps_512MB"] = round(bench._h2d() / 1e9, 3)
    t0 = time.perf_counter()
    path = make_file(folder, n, blob_nbytes)
    res["write_s"] = round(time.perf_counter() - t0, 2)
    try:
        res["methods"] = run_cpu(path, n, blob_nbytes, threads, log)
        if cuda:
            res["methods"] += run_cuda(path, n, blob_nbytes, threads, log)
    finally:
        path.unlink(missing_ok=True)
    res["fastest"] = fastest(res["methods"], cuda)
    return res


def fastest(rows: list[dict], cuda: bool) -> dict:
    """Fastest way per page-cache state among the ways that reach the device (or numpy ones)."""
    pick = {}
    for r in rows:
        if "GBps" not in r or r["method"] == "numpy_ram" or (cuda and r["method"].startswith("numpy")):
            continue
        for state in ([r["cache"]] if "cache" in r else ["cold", "warm"]):
            if state not in pick or r["GBps"] > pick[state]["GBps"]:
                pick[state] = {"method": r["method"], "GBps": r["GBps"]}
    return pick


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m efengine.host_bench", description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=4.0, help="size of the test file in GB (default 4)")
    p.add_argument("--blob-mb", type=float, default=MIXTRAL_Q4_BLOB / 1e6, help="bytes per blob in MB "
                   "(default: Mixtral-8x7B int4 expert, 99.09)")
    p.add_argument("--threads", default="1,2,4,8", help="staging thread counts, comma-separated")
    p.add_argument("--dir", default=None, help="folder for the temp file (default: system temp; "
                   "pick a disk, not tmpfs, for cold-cache figures)")
    p.add_argument("--cpu", action="store_true", help="numpy ways only, even with a GPU")
    p.add_argument("--json", metavar="OUT", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    try:
        threads = [int(x) for x in a.threads.split(",") if x]
        res = run(a.gb, blob_nbytes=int(a.blob_mb * 1e6) // PAGE * PAGE, threads=threads, folder=a.dir, cpu=a.cpu)
    except ValueError as e:
        print(f"host bench: bad --threads {a.threads!r} ({e})", file=sys.stderr)
        return 2
    except (EfError, OSError) as e:
        print(f"host bench: {e}", file=sys.stderr)
        return 1
    text = json.dumps(res, indent=1)
    print(text)
    if a.json:
        tmp = Path(a.json).with_suffix(".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(a.json)
    print(f"fastest: {res['fastest']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
