"""The Engine's resident GPU decode: one token a CUDA graph replay (ops/gpu_decode.DecodeGraph).

Used when the Engine runs on the cupy backend with every expert resident (no gpu_mem / policy)
and the config is one DecodeGraph takes (GQA without qk-norm): the routed experts sit in an
ExpertPool (slot table on the device), so a step's routing never visits the host, and the whole
step is one graph launch instead of hundreds of kernel launches from Python plus a host round
trip per MoE layer (Model.forward's decode).

Prefill stays Model.forward (chunks) on the same KVCache: the graph writes K/V into the cache's
fixed arrays and reads the position from device memory, so a rewind (cache.truncate) is only a
new position for the next step; a new cache object needs a new stepper (the graph holds the
arrays' addresses). Sampling stays on the host: a step returns the logits.

Legend: V vocab.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np

from .errors import ConfigError

PROGRESS_MIN_BYTES = 1 << 30      # a bar for loads long enough to wonder about (~1 s and more)


def graph_config(cfg) -> bool:
    """Whether DecodeGraph takes this config (its constructor checks the same, and more)."""
    return cfg.attention == "gqa" and not cfg.qk_norm


class _Counting:
    """A weight source whose expert_blob reads advance a progress bar (the rest is the source's)."""

    def __init__(self, source, bar):
        self._source, self._bar = source, bar

    def __getattr__(self, name):
        return getattr(self._source, name)

    def expert_blob(self, layer: int, e: int):
        blob = self._source.expert_blob(layer, e)
        self._bar.update(self._source.blob_nbytes)
        return blob


def resident_pool(source, progress: bool | None = None):
    """ExpertPool.resident(source): every routed expert in its own slot on the GPU.

    progress: a tqdm bar of bytes on stderr (None: on a terminal, when the experts are
    PROGRESS_MIN_BYTES or more), as conversion and `efengine info --verify` show theirs."""
    from tqdm import tqdm

    from .ops.gpu_weights import ExpertPool
    total = len(source.expert_layers) * source.n_experts * source.blob_nbytes
    if progress is None:
        progress = sys.stderr.isatty() and total >= PROGRESS_MIN_BYTES
    size = shutil.get_terminal_size((100, 20))       # a 0x0 pty would hide the bar
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="experts -> GPU",
              disable=not progress, file=sys.stderr, ncols=size.columns, nrows=size.lines) as bar:
        return ExpertPool.resident(_Counting(source, bar))


def resident_experts(source, backend):
    """(PoolExperts provider, pool) for a cupy-backend Model that may decode through a graph, or
    (None, None) where it cannot (a dense model, another backend, a config DecodeGraph rejects,
    experts the pool's kernels cannot take): the Model's default provider then."""
    if getattr(backend, "name", backend) != "cupy" or not source.config.is_moe or not graph_config(source.config):
        return None, None
    from .ops.gpu_weights import PoolExperts
    try:
        pool = resident_pool(source)
    except ConfigError:
        return None, None
    return PoolExperts(pool), pool


class GraphStepper:
    """Decode steps of `model` (cupy backend) continuing `cache`, as DecodeGraph replays.

    Raises ConfigError where DecodeGraph does not take the model (the caller decodes eagerly).
    The graph is captured on the first step (and the model's kernels compiled then)."""

    def __init__(self, model, pool, cache):
        from .ops.gpu_decode import DecodeGraph
        self.model, self.pool, self.cache = model, pool, cache
        self.graph = DecodeGraph(model, pool, cache)
        self.steps = 0

    def step(self, token: int) -> np.ndarray:
        """Logits float32 [V] after `token` at position cache.pos; advances cache.pos by one."""
        import cupy
        g, c, cur = self.graph, self.cache, cupy.cuda.get_current_stream()
        pos = c.pos
        # Model.forward (prefill) runs on the current stream: each side's K/V writes come first for
        # the other, even when the host stops waiting here (Ctrl-C) and a prefill follows at once
        g.stream.wait_event(cur.record())
        g.start(token, pos)             # ConfigError past the cache's end
        g.replay(1)
        cur.wait_event(g.stream.record())
        g.stream.synchronize()
        if self.pool is not None:
            self.pool.check()       # an expert missing from the pool raises (never silent garbage)
        logits = cupy.asnumpy(g.logits[0])
        c.pos = pos + 1
        self.steps += 1
        return logits
