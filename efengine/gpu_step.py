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

The offloaded decode (gpu_mem / policy: the Engine's experts are an OffloadRuntime) steps through
OffloadStepper instead: RunaheadDecodeGraph (ops/gpu_runahead.py), the step as one graph whose
MoE gates check residency on the device while the host follows it layer by layer, issuing the
misses' copies and planning prefetches through the runtime (so its stats count as in the eager
path). Same contract: prefill through Model.forward, a rewind is a new position, logits out.

Legend: V vocab, A active experts.
"""
from __future__ import annotations

import shutil
import sys

import numpy as np

from .errors import ConfigError, EfError

# A gate that waits this long for an expert's copy gives the step up (the Engine redoes it
# eagerly): a copy takes milliseconds, a cold expert from a slow disk well under a second, so only
# a copy that will never come waits this long. The run-ahead graph's own default (20 s) is meant
# for a dead host; here it would be a 20 s pause in a chat.
GATE_TIMEOUT_S = 5.0
PROGRESS_MIN_BYTES = 1 << 30      # a bar for loads long enough to wonder about (~1 s and more)


def graph_config(cfg) -> bool:
    """Whether DecodeGraph takes this config (its constructor checks the same, and more)."""
    return cfg.attention == "gqa" and not cfg.qk_norm


def offload_graph_note(cfg, route_bias: float = 0.0) -> str:
    """"" where an offloaded decode may run as OffloadStepper, else why it stays eager (the
    Engine's graph_note): the segmented graph takes MoE configs DecodeGraph takes, and it never calls Model.forward's route hook, where route_bias
    (lossy, opt-in) reroutes."""
    if not cfg.is_moe:
        return "eager decode: the offloaded graph decode needs a model with routed experts"
    if not graph_config(cfg):
        return "eager decode: the offloaded graph decode takes GQA attention without qk-norm"
    if route_bias:
        return ("eager decode: route_bias reroutes in Model.forward's route hook, which the offloaded graph "
                "decode does not run")
    return ""


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
    import cupy

    from .ops.gpu_weights import PoolExperts
    try:
        pool = resident_pool(source)
    except ConfigError:
        return None, None
    except cupy.cuda.memory.OutOfMemoryError:
        need = len(source.expert_layers) * source.n_experts * source.blob_nbytes
        free = cupy.cuda.runtime.memGetInfo()[0]
        raise ConfigError(f"{getattr(source, 'path', 'the model')}: its routed experts need {need / 2**30:.1f} GiB "
                          f"on the GPU, which has {free / 2**30:.1f} GiB free: give --gpu-mem (Engine(gpu_mem=...)) "
                          "to keep them in host memory and cache some on the GPU") from None
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


class OffloadStepper:
    """Decode steps of `model` (cupy backend; experts = `runtime`, an OffloadRuntime whose copy
    engine is a CudaEngine, as build_provider makes it) continuing `cache`, as RunaheadDecodeGraph
    steps. predict_ahead: later MoE layers' routers the graph computes for the policy (None: the
    policy's default, pregate 1, expertflow 2, ondemand 0).

    Raises ConfigError where the run-ahead graph does not take the model or the runtime (the
    caller decodes eagerly). The graph is captured on the first step, after one eager warm-up step
    through the runtime at the same position and token, then undone (tok / pos restored): the only
    cache rows it writes are that position's, which the graph step writes again with the same
    values, so what the prefill wrote stays. The warm-up counts as one more step in the runtime's
    stats (its copies are real ones).

    A failed step (a gate that waited timeout_s for an expert no copy was coming for) raises after
    the device has finished, cache.pos unchanged; the Engine then redoes the token eagerly. Causes
    found on the H100 (expertflow, 8% cache, random Qwen1.5-MoE) and fixed: end_layer(l) unpinned
    layer l's experts while the gate could still poll for a miss (now pinned until
    OffloadRuntime.settled); a step's log sequence numbers were not cleared; and, timing dependent,
    a prefetch Y evicting X, X copied again elsewhere and published by the copy stream before the
    host polled it, then the host finishing Y first, whose ExpertPool.assign wrote -1 over X's new
    entry: the gate waiting for X saw it unpublished until the host's next poll, which comes only
    after that gate (ExpertPool.unassign now forgets the evicted expert).
    tests/test_offload_runahead_map.py simulates the protocol on the CPU."""

    def __init__(self, model, runtime, cache, predict_ahead: int | None = None):
        from .ops.gpu_runahead import RunaheadDecodeGraph
        self.model, self.runtime, self.cache = model, runtime, cache
        eng = runtime.engine
        self._compute = getattr(eng, "compute", None)
        # copies issued before the pool's slot map moves to host memory publish nothing there:
        # let them land and be assigned first (map_to_host copies the device table)
        if hasattr(eng, "stream"):
            eng.stream.synchronize()
            runtime.prefetcher.poll()
        try:
            self.graph = RunaheadDecodeGraph(model, runtime, cache, predict_ahead=predict_ahead,
                                             timeout_s=GATE_TIMEOUT_S)
        finally:
            self._restore()
        self.steps = 0

    def _restore(self) -> None:
        """The graph points the copy engine's compute-side waits and fences at its own stream;
        between steps they belong to Model.forward's (the current) stream again."""
        if hasattr(self.runtime.engine, "compute"):
            self.runtime.engine.compute = self._compute

    def step(self, token: int) -> np.ndarray:
        """Logits float32 [V] after `token` at position cache.pos; advances cache.pos by one."""
        import cupy
        g, c, cur = self.graph, self.cache, cupy.cuda.get_current_stream()
        pos = c.pos
        g.stream.wait_event(cur.record())       # the prefill's K/V writes come first
        if hasattr(self.runtime.engine, "compute"):
            self.runtime.engine.compute = g.stream
        try:
            g.start(token, pos)                 # ConfigError past the cache's end
            if g.graphs is None:
                g.capture()
            g.step()
            g.finish()                          # gate stall -> runtime stats; a failed gate raises
        except BaseException:
            self._drain(pos + 1)
            raise
        finally:
            self._restore()
        cur.wait_event(g.stream.record())
        logits = cupy.asnumpy(g.logits[0])
        c.pos = pos + 1
        self.steps += 1
        return logits

    def _drain(self, seq: int) -> None:
        """After an interrupted step (Ctrl-C while the host follows the device): serve each MoE layer
        the device still reaches, so no gate waits out its timeout for a copy nobody issues and the
        next prefill does not race the step's K/V writes. Best effort: the caller re-raises."""
        g, rt = self.graph, self.runtime
        A = g.cfg.top_k
        if g.stream.done:
            return
        try:
            for i, l in enumerate(g.moe):
                row = g.log[i]
                while row[A] != seq and not g.stream.done:
                    pass
                if row[A] != seq:
                    break                       # the device stopped before this layer
                rt.demand(l, np.array(row[:A]).reshape(1, A), wait=False)
                rt.end_layer(l)
        except Exception:  # noqa: BLE001 - the step's own exception is the one to report
            pass
        finally:            # whatever happened, nothing of the step may run on behind the caller
            g.stream.synchronize()
            rt.settled()
            g.pool.progress.fill(-1)            # a warm-up cut short never reached step_done's
            try:
                g.pool.check()
            except EfError:
                pass
