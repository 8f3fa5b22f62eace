"""Expert offload: a budgeted device cache of experts, host tiers, prefetching, named policies.

  trace.py     routing traces (load, validate)         sim.py      offline cache simulators
  cache.py     ExpertCache + eviction policies         store.py    HostStore (host tiers)
  pool.py      simulated device pool (numpy)           prefetch.py copy engines + Prefetcher
  predict.py   HybridPredictor (pre-gate + history)    horizon.py  adaptive horizon S
  policy.py    ondemand / pregate / expertflow, route_bias (lossy, opt-in)
  stats.py     stall accounting, per-step log          runtime.py  OffloadRuntime (ExpertProvider)
"""
from __future__ import annotations

from ..errors import ConfigError
from .policy import POLICIES
from .runtime import OffloadRuntime, replay_trace

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
                   **kw) -> OffloadRuntime:
    """The Engine's entry point: an OffloadRuntime whose expert cache gets what `gpu_mem` leaves
    after the dense weights (None: room for every expert). Call `.attach(model)` once the Model
    exists so pre-gating policies see hidden states. kw includes route_bias=0.0 (LOSSY when > 0:
    prefer resident experts within that router-probability margin; offload/bias.py)."""
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
    return OffloadRuntime(ef, backend, policy=policy, budget_bytes=budget, **kw)
