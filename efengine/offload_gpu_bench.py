"""`efengine bench --offload`: scenario O1 of benchmarks.md on the GPU.

Mixtral-8x7B shape (int4 experts, int8 dense; full-size synthetic, gpu_synth), batch-1 decode
driven by a real routing trace (`--route-trace`): the model's router runs, then `route_hook`
replaces its top-k ids and weights with the trace's for that (token, layer). Experts live in a
device cache holding 25/50/75% of them; policies ondemand / pregate / expertflow.
`--route-trace none`: no trace, the synthetic model's own router decides, so hidden-state
predictions (pregate, expertflow's pre-gate) mean what they say; the routing the run took is
recorded (the same in every cell: lossless) and Belady is computed on it. A random model routes
near-uniformly (the JSON's "routing" says how much): it measures the mechanism, not how
predictable a trained model is.

Legend: N trace tokens, L MoE layers, E experts per layer, A active experts per token.

Per (policy, cache) it reports time per token (wall clock over `--tokens` decode steps after a
warm-up that fills the cache), misses / token, stall / token (CUDA events on the compute stream,
CudaEngine), hit rate, bytes copied and achieved copy bandwidth, and two bounds:
  oracle_bound_s = max(resident step, Belady misses / token x expert bytes / measured H2D)
  ondemand_efficiency = (misses / token x per-expert copy time + resident step) / time per token
(the resident step of the cell's own path: eager or graph, see "Decode path" below)
with the resident step measured two ways: the same eager Model.forward path with every expert
resident (`resident_eager_s`, what the offload machinery is compared against) and the CUDA-graph
decode (`resident_graph_s`, DecodeGraph, the fastest resident step this engine has).

Decode path: by default each cell runs OffloadDecodeGraph (ops/gpu_offload_decode.py: per-layer
CUDA-graph segments, the runtime between the router and the experts of each MoE layer, the trace's
ids / weights written into the device ids buffer after each router segment), or by default
RunaheadDecodeGraph (ops/gpu_runahead.py: the step as one graph, residency checked on the device,
the host follows it, issuing the misses' copies and planning prefetches; the trace's ids go to
the device as each step's plan) unless `--no-runahead` or the cell records a timeline;
`--eager` runs Model.forward per step with route_hook instead (the JSON's "path" says which).

Replay caveat: the hidden states are the synthetic model's, not the ones that produced the
trace, so pregate's predictions (next layer's router on those states) are meaningless here: it is
run and reported, flagged. expertflow runs history-only (no predictions reach it) under a trace.
Without a trace, the graph path computes the next `--predict-ahead` layers' routers on the device
(pregate: 1) and feeds them to the policy; cells report the next-layer router's top-k recall
(`pregate_recall_next`), prefetches issued / used / wasted.

Host timing of the graph path (cells' "host_per_token_s", ops/gpu_offload_decode.py): seconds
per token in the router read-back sync, route hook, runtime.demand, sync -> first demand copy,
graph launches, after-launch work (fences, planning). `timeline` (--timeline, or --plot): the
first cell of each policy records `--timeline-steps` steps at the end of its warm-up (cell's
"timeline", efengine/plot.py draws it).

Host tier: 256 full-size pinned blobs would be ~24 GB of page-locked memory; the L*E host experts
are backed by `--host-blobs` distinct pinned random blobs (expert f reads blob f mod n). Every
copy is still a real full-size host->device DMA from pinned memory (CudaEngine direct_pinned);
copy speed does not depend on values. The JSON says so.

The bookkeeping (TraceRouter, BlobStore, replay, demand_misses, bounds) is backend-agnostic and
tested on numpy (tests/test_offload_gpu_bench.py). This module measures (bookkeeping, one cell on
either path, the resident step) and holds the CLI (`add_args`, `main`); offload_gpu_report.py runs
the grid of cells, bounds each cell and prints the rows and the table.
"""
from __future__ import annotations

import gc
import sys
import time

import numpy as np

from .errors import ConfigError
from .offload.cache import ExpertCache
from .offload.sim import Belady
from .offload.stats import OffloadStats
from .offload.store import HostStore
from .offload.trace import Trace

POLICIES = ("ondemand", "pregate", "expertflow")
REPLAY_NOTE = {
    "pregate": "MEANINGLESS under trace replay: it predicts from hidden states that did not produce "
               "the trace (prefetches are mostly wasted copies); reported for completeness only",
    "expertflow": "history-only under trace replay (not attached to the model's hidden states)",
}
OWN_NOTE = {
    "pregate": "the model's own router decides (no trace): layer i+1's router on layer i's state predicts "
               "its experts; a random synthetic model routes near-uniformly (see 'routing'), so this "
               "measures the mechanism, not a trained model's predictability",
    "expertflow": "the model's own router decides (no trace): pre-gate of the next predict_ahead layers "
                  "+ routing history",
}


# ---- backend-agnostic parts (tested on numpy) -----------------------------------------------------
def fit_trace(trace: Trace, cfg) -> Trace:
    """The trace cut to the model's MoE layers (`--layers`) and validated against it."""
    L = len(cfg.moe_layers)
    if trace.n_layers < L:
        raise ConfigError(f"route trace {trace.name}: {trace.n_layers} layers, the model has {L} MoE layers")
    t = Trace(trace.name, np.ascontiguousarray(trace.experts[:, :L]), np.ascontiguousarray(trace.probs[:, :L]),
              trace.n_experts, trace.skipped)
    return t.validate(L, cfg.n_experts, cfg.top_k)


class TraceRouter:
    """Model.route_hook replaying trace token `t` (set by the driver before each step): a step of
    T tokens takes trace rows t..t+T-1 (mod N) at MoE layer index of `layer`."""

    def __init__(self, trace: Trace, backend, moe_layers):
        self.trace, self.backend, self.t = trace, backend, 0
        self.index = {l: i for i, l in enumerate(moe_layers)}
        # [N, L, A] in the returned types once: a decode step's lookup is then two views. The
        # graph path calls this between the router's read-back and the demand copies, so its
        # cost is on the critical path of every MoE layer (it is the harness, not the engine).
        self.ids = np.ascontiguousarray(trace.experts, dtype=np.int32)
        self.probs = np.ascontiguousarray(trace.probs, dtype=np.float32)

    def __call__(self, layer, logits, ids, weights):
        i, T = self.index[layer], int(ids.shape[0])
        b = self.backend
        if T == 1:
            r = self.t % self.trace.n_tokens
            return b.asarray(self.ids[r:r + 1, i]), b.asarray(self.probs[r:r + 1, i])
        rows = (self.t + np.arange(T)) % self.trace.n_tokens
        return b.asarray(self.ids[rows, i]), b.asarray(self.probs[rows, i])


class BlobStore(HostStore):
    """HostStore whose L*E experts read from a list of host blobs: expert f gets blob f mod n
    (n = L*E: the exact experts; fewer: full-size stand-ins with the same bytes per copy)."""

    def __init__(self, source, blobs: list):
        super().__init__(source)
        if not blobs or any(int(b.size) != self.blob_nbytes for b in blobs):
            raise ConfigError(f"BlobStore needs blobs of {self.blob_nbytes} bytes")
        self.blobs = blobs

    def blob(self, i: int, e: int) -> np.ndarray:
        self.reads += 1
        return self.blobs[(i * self.E + e) % len(self.blobs)]


def exact_blobs(source) -> list:
    """Every expert's own blob, in flat order (for BlobStore on small models)."""
    return [source.expert_blob(l, e) for l in source.expert_layers for e in range(source.n_experts)]


def demand_misses(trace: Trace, n_slots: int, eviction, warm: int) -> tuple[int, int]:
    """(misses in tokens warm.., misses in tokens ..warm) of demand loading with `eviction`
    (Belady needs to be built on this same trace), same walk as offload.sim.simulate."""
    L, E = trace.n_layers, trace.n_experts
    cache = ExpertCache(n_slots, L, E, eviction)
    counts = [0, 0]
    for t in range(trace.n_tokens):
        for l in range(L):
            ids = np.unique(trace.experts[t, l])
            _, m = cache.access(l, ids)
            counts[t >= warm] += m
            cache.pin(l, ids)
            for e in ids:
                if not cache.is_present(l, int(e)):
                    if cache.allocate(l, int(e)) is None:
                        raise ConfigError(f"{n_slots} slots cannot hold the {len(ids)} experts of one step")
                    cache.complete(l, int(e))
            cache.unpin(l, ids)
    return counts[1], counts[0]


def belady_misses(trace: Trace, n_slots: int, warm: int) -> int:
    return demand_misses(trace, n_slots, Belady(trace), warm)[0]


def replay(model, router: TraceRouter | None, warm: int, tokens: int, rt=None, sync=None,
           timeline_steps: int = 0) -> dict:
    """Decode warm + tokens steps (trace tokens 0..; router None: the model routes), timing the last
    `tokens`; the runtime's stats restart after the warm-up. Returns time_per_token_s (+ the
    runtime's summary; + "timeline": the last timeline_steps warm-up steps, when asked)."""
    cache = model.new_cache(warm + tokens + 2)
    tok, t0, tl = 1, None, None
    for step in range(warm + tokens):
        if rt is not None and timeline_steps and step == max(0, warm - timeline_steps):
            tl = start_timeline(rt, timeline_steps)
        if step == warm:
            if rt is not None:
                rt.stats = rt.prefetcher.stats = OffloadStats(keep_log=False)
            if sync:
                sync()
            t0 = time.perf_counter()
        if router is not None:
            router.t = step
        logits = model.forward(np.array([tok]), cache)      # host logits: the step has finished
        tok = int(np.asarray(logits)[-1].argmax())
    if sync:
        sync()
    out = {"tokens": tokens, "time_per_token_s": (time.perf_counter() - t0) / max(tokens, 1)}
    if rt is not None:
        out.update(rt.summary())
    if tl is not None:
        out["timeline"] = tl
    return out


def start_timeline(rt, steps: int) -> list:
    """Record the runtime's next `steps` steps (compute / copy / stall; offload/timeline.py)."""
    tl: list = []
    rt.stats.timeline, rt.stats.timeline_steps = tl, int(steps)
    return tl


def routes_trace(routes: list, n_layers: int, n_experts: int, top_k: int, name: str = "own-router") -> Trace:
    """The routing a run took (ids [A] per MoE layer, execution order) as a Trace (for Belady)."""
    ids = np.asarray(routes, dtype=np.int32).reshape(-1, n_layers, top_k)
    return Trace(name, ids, np.full(ids.shape, 1.0 / top_k, dtype=np.float32), n_experts)


def routing_spread(trace: Trace) -> dict:
    """How uniform the routing is: the most used expert's share of its layer's uses (mean over
    layers) against the uniform 1/E, and how often a layer reuses an expert of the previous token."""
    N, L, A = trace.experts.shape
    E = trace.n_experts
    counts = np.zeros((L, E))
    for l in range(L):
        counts[l] = np.bincount(trace.experts[:, l].reshape(-1), minlength=E)[:E]
    share = counts.max(1) / np.maximum(counts.sum(1), 1)
    again = [len(set(trace.experts[t, l]) & set(trace.experts[t - 1, l])) / A for t in range(1, N) for l in range(L)]
    return {"max_expert_share_mean": round(float(share.mean()), 4), "uniform_share": round(1.0 / E, 4),
            "reuse_from_previous_token": round(float(np.mean(again)), 4) if again else None,
            "reuse_if_uniform": round(A / E, 4)}


def bounds(r: dict, *, blob_bytes: int, h2d_Bps: float, resident_s: float, belady_per_tok: float,
           resident_graph_s: float | None = None) -> dict:
    """Oracle offload bound and ondemand efficiency of one measured cell `r`."""
    copy_s = blob_bytes / h2d_Bps
    t = r["time_per_token_s"]
    out = {"belady_misses_per_token": round(belady_per_tok, 3),
           "oracle_bound_s": max(resident_s, belady_per_tok * copy_s),
           "ondemand_model_s": r["misses_per_token"] * copy_s + resident_s,
           "tokens_per_s": 1.0 / t}
    out["frac_of_oracle"] = out["oracle_bound_s"] / t
    out["ondemand_efficiency"] = out["ondemand_model_s"] / t
    if resident_graph_s is not None:
        out["oracle_bound_graph_s"] = max(resident_graph_s, belady_per_tok * copy_s)
        out["ondemand_efficiency_vs_graph"] = (r["misses_per_token"] * copy_s + resident_graph_s) / t
    return out


# ---- GPU scenario --------------------------------------------------------------------------------
def _free() -> None:
    import cupy
    gc.collect()
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()


def pinned_blobs(src, n: int) -> list:
    """n distinct full-size random expert blobs in page-locked host memory."""
    import cupy
    import cupyx
    out = []
    for k in range(n):
        buf = cupyx.empty_pinned(src.blob_nbytes, dtype=np.uint8)
        l, e = src.expert_layers[(k // src.n_experts) % len(src.expert_layers)], k % src.n_experts
        buf[:] = cupy.asnumpy(src.expert_blob(l, e))
        out.append(buf)
    return out


def _resident(src, trace, a, log) -> dict:
    """Resident step time: eager Model.forward (same path as offload) and the CUDA-graph decode."""
    import cupy
    from .model import Model
    from .ops.gpu_decode import DecodeGraph
    from .ops.gpu_weights import PoolExperts
    pool = src.pool()
    model = Model(src, "cupy", experts=PoolExperts(pool))
    router = TraceRouter(trace, model.backend, model.cfg.moe_layers) if trace is not None else None
    model.route_hook = router
    sync = cupy.cuda.Device().synchronize
    eager = replay(model, router, a.warmup, a.tokens, sync=sync)["time_per_token_s"]
    model.route_hook = None
    cache = model.new_cache(a.tokens + 24)
    model.forward(np.arange(16) % model.cfg.vocab_size, cache, last_only=True)
    g = DecodeGraph(model, pool, cache)
    g.capture()
    g.start(1, cache.pos)
    g.replay(2)
    g.stream.synchronize()
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    g.start(1, cache.pos)
    e0.record(g.stream)
    g.replay(a.tokens)
    e1.record(g.stream)
    e1.synchronize()
    graph = cupy.cuda.get_elapsed_time(e0, e1) / 1e3 / a.tokens
    pool.check()
    log(f"resident: eager {1e3 * eager:.2f} ms/token, graph {1e3 * graph:.2f} ms/token")
    del g, model, pool, cache
    _free()
    return {"resident_eager_s": eager, "resident_graph_s": graph}


def _cell(src, store, trace, policy: str, frac: float, a, timeline: bool = False) -> dict:
    import cupy
    from .model import Model
    from .offload import OffloadRuntime
    from .offload.cuda_engine import CudaEngine
    eng = CudaEngine(direct_pinned=True)
    rt = OffloadRuntime(src, "cupy", policy=policy, fraction=frac, store=store, engine=eng, keep_log=False)
    model = Model(src, "cupy", experts=rt)
    routes: list | None = None
    if trace is not None:
        router = TraceRouter(trace, model.backend, model.cfg.moe_layers)
        model.route_hook = router
        if policy == "pregate":             # it needs hidden states, meaningless here (REPLAY_NOTE)
            rt.attach(model)
    else:                                   # the model routes; record what it chose (for Belady)
        router, routes, to_host = None, [], model.backend.to_host

        def spy(layer, logits, ids, w):
            routes.append(np.asarray(to_host(ids)).reshape(-1))
            return ids, w
        model.route_hook = spy
        rt.attach(model)
    r = replay(model, router, a.warmup, a.tokens, rt=rt, sync=cupy.cuda.Device().synchronize,
               timeline_steps=_tl_steps(a) if timeline else 0)
    rt.pool.check()
    r.update(policy=policy, cache_fraction=frac, direct_pinned_copies=eng.direct_copies,
             stall_per_token_s=r["stall_s"] / max(a.tokens, 1), path="eager")
    _note(r, policy, trace)
    if routes is not None:
        r["_routes"] = routes
    rt.close()
    del rt, model, eng
    _free()
    return r


def _tl_steps(a) -> int:
    return max(1, min(int(getattr(a, "timeline_steps", 4)), a.warmup or 1))


def _note(r: dict, policy: str, trace) -> None:
    note = (REPLAY_NOTE if trace is not None else OWN_NOTE).get(policy)
    if note:
        r["replay_note" if trace is not None else "note"] = note


def predict_ahead(policy: str, trace, a) -> int:
    """Layers of routers predicted on the device per MoE layer (graph path): none under a trace
    except pregate's (flagged meaningless), so expertflow stays history-only there."""
    if policy == "pregate":
        return 1
    if policy == "expertflow" and trace is None:
        return int(getattr(a, "predict_ahead", 2))
    return 0


def _cell_graph(src, store, trace, policy: str, frac: float, a, timeline: bool = False) -> dict:
    """The cell on OffloadDecodeGraph (per-layer CUDA-graph segments; ops/gpu_offload_decode.py):
    the trace's ids / weights are written into the device ids buffer after each router segment."""
    from .model import Model
    from .offload import OffloadRuntime
    from .offload.cuda_engine import CudaEngine
    from .ops import get_backend
    from .ops.gpu_offload_decode import OffloadDecodeGraph
    from .ops.gpu_runahead import RunaheadDecodeGraph
    eng = CudaEngine(direct_pinned=True)
    rt = OffloadRuntime(src, "cupy", policy=policy, fraction=frac, store=store, engine=eng, keep_log=False)
    model = Model(src, "cupy", experts=rt)
    router = TraceRouter(trace, get_backend("numpy"), model.cfg.moe_layers) if trace is not None else None
    cache = model.new_cache(a.warmup + a.tokens + 2)
    ahead = not timeline and not getattr(a, "no_runahead", False)
    kind = RunaheadDecodeGraph if ahead else OffloadDecodeGraph
    g = kind(model, rt, cache, route_hook=router, predict_ahead=predict_ahead(policy, trace, a))
    g.start(1, 0)
    g.capture()                                 # one eager warm-up step at position 0, undone
    if trace is None:
        g.route_log = []
    n_tl, tl = (_tl_steps(a) if timeline else 0), None
    for step in range(a.warmup + a.tokens):
        if n_tl and step == max(0, a.warmup - n_tl):
            tl = start_timeline(rt, n_tl)
        if step == a.warmup:
            rt.stats = rt.prefetcher.stats = OffloadStats(keep_log=False)
            g.stream.synchronize()
            g.reset_host()
            t0 = time.perf_counter()
        if router is not None:
            router.t = step
        g.step()
    g.finish() if ahead else g.stream.synchronize()
    r = {"tokens": a.tokens, "time_per_token_s": (time.perf_counter() - t0) / max(a.tokens, 1),
         "path": "graph-runahead" if ahead else "graph"}
    r.update(rt.summary())
    rt.pool.check()
    r.update(policy=policy, cache_fraction=frac, direct_pinned_copies=eng.direct_copies,
             stall_per_token_s=r["stall_s"] / max(a.tokens, 1), predict_ahead=g.ahead,
             host_per_token_s={k: round(v, 7) for k, v in g.host_times().items()})
    _note(r, policy, trace)
    if tl is not None:
        r["timeline"] = tl
    if g.route_log is not None:
        r["_routes"] = g.route_log
    rt.close()
    del rt, model, eng, g
    _free()
    return r


def _graph_ok(cfg) -> bool:
    """Does the segmented graph decode support this config (else the eager path runs)?"""
    from .gpu_step import graph_config
    return graph_config(cfg) and cfg.is_moe


def add_args(p) -> None:
    p.add_argument("--offload", action="store_true", help="scenario O1: offloaded decode under trace replay")
    p.add_argument("--route-trace", default="gsm8k_2", help="routing trace replayed by --offload ('none': the model's own router decides)")
    p.add_argument("--tokens", type=int, default=48, help="--offload: timed decode tokens (default 48)")
    p.add_argument("--warmup", type=int, default=8, help="--offload: decode tokens before timing (default 8)")
    p.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.75],
                   help="--offload: expert cache sizes as fractions of all experts")
    p.add_argument("--policies", type=lambda s: s.split(","), default=list(POLICIES))
    p.add_argument("--eager", action="store_true",
                   help="--offload: eager Model.forward per step instead of the segmented CUDA-graph decode")
    p.add_argument("--no-runahead", action="store_true",
                   help="--offload: the segmented graph decode (host between router and experts) in every cell")
    p.add_argument("--host-blobs", type=int, default=16, help="--offload: distinct pinned host blobs")
    p.add_argument("--predict-ahead", type=int, default=2,
                   help="--offload without a trace: layers of routers expertflow predicts on the device (default 2)")
    p.add_argument("--timeline", action="store_true",
                   help="--offload: record a timeline in the first cell of each policy (on with --plot)")
    p.add_argument("--timeline-steps", type=int, default=4, help="--offload: steps a timeline records (default 4)")


def main(a, log=None) -> dict:
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    for p in a.policies:
        if p not in POLICIES:
            raise ConfigError(f"unknown offload policy {p!r}; choose from {', '.join(POLICIES)}")
    from .offload_gpu_report import run_o1, table   # here, not at the top: that module imports this one
    res = run_o1(a, log)
    log(table(res))
    return res
