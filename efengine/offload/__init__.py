"""Expert offload: a budgeted device cache of experts, host tiers, prefetching, named policies.

  trace.py     routing traces (load, validate)         sim.py      offline cache simulators
  cache.py     ExpertCache + eviction policies         store.py    HostStore (host tiers)
  pool.py      simulated device pool (numpy)           prefetch.py copy engines + Prefetcher
  predict.py   HybridPredictor (pre-gate + history)    horizon.py  adaptive horizon S
  policy.py    ondemand / pregate / expertflow, route_bias (lossy, opt-in)
  stats.py     stall accounting, per-step log          runtime.py  OffloadRuntime (ExpertProvider)
"""
from __future__ import annotations

import warnings

from ..errors import ConfigError
from .policy import POLICIES
from .replay import replay_trace
from .runtime import OffloadRuntime
from .store import open_store, plan_tier

# Host tier defaults on CUDA, from python -m efengine.host_bench --gb 4 on the H100 (99 MB blobs,
# docs/results/host_tiers_h100.json): pinned RAM tier 54.7 GB/s (the PCIe ceiling, 55.1);
# registered mapping 54.7 GB/s once its pages are in RAM (registering 4 GB took 0.29 s, and it
# pins the page cache, so it needs the same RAM as a tier); staging from the page cache through
# pinned buffers 6.0 / 11.3 / 19.3 / 29.1 GB/s with 1 / 2 / 4 / 8 threads; from disk ~1.6 GB/s.
# So: a pinned tier when RAM allows, else 8-thread staging from the mapping.
STAGING_THREADS = 8
REGISTER = False

__all__ = ["OffloadRuntime", "replay_trace", "build_provider", "POLICIES"]


def dense_nbytes(ef) -> int:
    """Bytes of every stored tensor that is not a routed expert (they stay resident)."""
    return int(sum(t.nbytes for t in ef.tensors.values()))


def _check_free(gpu_mem: int, backend) -> None:
    """A budget above the GPU's free memory would fail later inside an allocation: say so now."""
    name = backend if isinstance(backend, str) else getattr(backend, "name", "numpy")
    if name != "cupy":
        return                     # the numpy backend simulates the device pool in host memory
    import cupy
    free, total = cupy.cuda.runtime.memGetInfo()
    if gpu_mem > free:
        raise ConfigError(f"gpu_mem={gpu_mem / 2**30:.2f} GiB is more than the GPU's free memory "
                          f"({free / 2**30:.2f} of {total / 2**30:.2f} GiB); lower --gpu-mem")


def build_provider(ef, backend, *, gpu_mem: int | None = None, policy: str | None = None,
                   host_mem: int | None = None, register: bool | None = None,
                   staging_threads: int = STAGING_THREADS, **kw) -> OffloadRuntime:
    """The Engine's entry point: an OffloadRuntime whose expert cache gets what `gpu_mem` leaves
    after the dense weights (None: room for every expert). Call `.attach(model)` once the Model
    exists so pre-gating policies see hidden states. kw includes route_bias=0.0 (LOSSY when > 0:
    prefer resident experts within that router-probability margin; offload/bias.py).

    host_mem: bytes of the host tier (None: every expert when available RAM allows; 0: none,
    blobs are staged from the mapped file); pinned memory on CUDA, numpy memory otherwise. A tier
    that does not fit, or whose pinned allocation fails, warns and stages instead.
    register (CUDA): page-lock the file mapping itself rather than a tier (None: REGISTER).
    staging_threads (CUDA): threads that fill the pinned staging buffers (and the tier)."""
    policy = policy or "expertflow"
    if policy not in POLICIES:
        raise ConfigError(f"unknown offload policy {policy!r}; choose one of {', '.join(POLICIES)}")
    budget = None
    if gpu_mem is not None:
        _check_free(int(gpu_mem), backend)
        budget = int(gpu_mem) - dense_nbytes(ef)
        if budget < ef.blob_nbytes:
            raise ConfigError(f"gpu_mem={gpu_mem} bytes does not hold the dense weights ({dense_nbytes(ef)} bytes) "
                              f"plus one expert ({ef.blob_nbytes} bytes); raise gpu_mem")
    n_dev = budget // ef.blob_nbytes if budget is not None else len(ef.expert_layers) * ef.n_experts
    cuda = (backend if isinstance(backend, str) else getattr(backend, "name", "numpy")) == "cupy"
    if not cuda:
        if register:
            raise ConfigError("register=True page-locks the mapping for CUDA copies: it needs the cupy backend")
        store = open_store(ef, host_mem, device_slots=n_dev)
        return OffloadRuntime(ef, backend, policy=policy, budget_bytes=budget, store=store, **kw)
    import cupyx
    from .cuda_engine import CudaEngine
    register = REGISTER if register is None else register
    engine = kw.pop("engine", None) or CudaEngine(direct_pinned=True, staging_threads=staging_threads)
    store = open_store(ef, 0 if register else host_mem, device_slots=n_dev, copy_threads=staging_threads,
                       alloc=lambda n: cupyx.empty_pinned(n, dtype="uint8"))
    if register and host_mem != 0:
        _register(store, engine)
    return OffloadRuntime(ef, backend, policy=policy, budget_bytes=budget, store=store, engine=engine, **kw)


def _register(store, engine) -> None:
    """Page-lock the mapping's expert region (kept until engine.close()); warn and stage when the
    blobs are not one mapped run, RAM cannot hold them all, or the driver refuses."""
    from .cuda_engine import register_host
    region = store.mapped_region()
    if region is None:
        warnings.warn("host tier: the expert blobs are not one contiguous mapped region, cannot "
                      "register it with CUDA; staging experts from the mapping", stacklevel=3)
        return
    nbytes, warning = plan_tier(None, region.nbytes, what="registering the mapping")
    if warning:
        warnings.warn(warning, stacklevel=3)
        return
    try:
        engine.registrations.append(register_host(region))
    except Exception as e:  # noqa: BLE001  (cupy's CUDARuntimeError)
        warnings.warn(f"host tier: cudaHostRegister of the mapping ({region.nbytes / 2**30:.2f} GiB) "
                      f"failed ({e}); staging experts from the mapping", stacklevel=3)
