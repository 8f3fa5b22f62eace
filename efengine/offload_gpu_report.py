"""Scenario O1's driver and report (the scenario and its measurements: offload_gpu_bench.py).

`run_o1` measures the resident step, then one cell per (cache fraction, policy) on the eager or the
graph path, adds each cell's oracle bound and ondemand efficiency (Belady on the trace, or without
a trace on the routing the model took) and logs a row per cell; `table` is the summary printed at
the end. The JSON keys are those of the cells plus the run's header (see `run_o1`).

Legend: L MoE layers, E experts per layer, A active experts per token.
"""
from __future__ import annotations

import time

import numpy as np

from .errors import ConfigError
from .offload.trace import Trace
from .offload_gpu_bench import (OWN_NOTE, REPLAY_NOTE, BlobStore, _cell, _cell_graph, _free, _graph_ok,
                                _resident, belady_misses, bounds, fit_trace, pinned_blobs, routes_trace,
                                routing_spread)


def run_o1(a, log) -> dict:
    import cupy
    from efconvert.shapes import shape_config
    from . import bench
    from .offload import trace as trace_mod
    from .ops.gpu_synth import DeviceRandomSource
    h2d = bench._h2d()
    _free()
    _, cfg, _ = shape_config("mixtral-8x7b", a.layers)
    trace = _trace(a, cfg, trace_mod)
    src = DeviceRandomSource(cfg, experts="q4", dense="q8", group=a.group)
    L, E = len(cfg.moe_layers), cfg.n_experts
    res = {"scenario": "O1", "model": "mixtral-8x7b", "experts": "q4", "dense": "q8", "layers": cfg.n_layers,
           "route_trace": trace.name if trace is not None else None, "warmup_tokens": a.warmup, "tokens": a.tokens,
           "expert_bytes": src.blob_nbytes, "h2d_pinned_GBps": h2d / 1e9,
           "per_expert_copy_s": src.blob_nbytes / h2d,
           "path": "eager" if getattr(a, "eager", False) or not _graph_ok(cfg) else "graph"}
    res.update(_resident(src, trace, a, log))
    t0 = time.perf_counter()
    n_blobs = min(a.host_blobs, L * E)
    store = BlobStore(src, pinned_blobs(src, n_blobs))
    res["host_tier"] = (f"{L * E} host experts backed by {n_blobs} distinct pinned random blobs "
                        f"(expert f reads blob f mod {n_blobs}); each copy is a full-size pinned "
                        "host->device DMA (CudaEngine direct_pinned)")
    log(f"pinned {n_blobs} blobs of {src.blob_nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s")
    res["replay_notes" if trace is not None else "notes"] = REPLAY_NOTE if trace is not None else OWN_NOTE
    timeline = bool(getattr(a, "timeline", False) or getattr(a, "plot", None))
    res["cells"], seen = [], set()
    for frac in a.fractions:
        for policy in a.policies:
            run = _cell if res["path"] == "eager" else _cell_graph
            r = run(src, store, trace, policy, frac, a, timeline=timeline and policy not in seen)
            seen.add(policy)
            res["cells"].append(r)
            if trace is not None:
                _bound(res, r, trace, cfg, h2d, a)
                log(row(r))
            else:
                log(f"{policy:10} {100 * frac:4.0f}% {1e3 * r['time_per_token_s']:8.2f} ms/token, "
                    f"misses/tok {r['misses_per_token']:6.2f}, stall {1e3 * r['stall_per_token_s']:7.2f} ms/tok")
    if trace is None:
        _own_routing(res, cfg, h2d, a, log)
    del store
    cupy.get_default_memory_pool().free_all_blocks()
    return res


def _trace(a, cfg, trace_mod) -> Trace | None:
    """The trace cut to the model and to warmup + tokens, or None for --route-trace none."""
    if a.route_trace in (None, "", "none"):
        return None
    trace = fit_trace(trace_mod.load(a.route_trace), cfg)
    if a.warmup + a.tokens > trace.n_tokens:
        raise ConfigError(f"route trace {trace.name} has {trace.n_tokens} tokens; "
                          f"--warmup + --tokens = {a.warmup + a.tokens}")
    return trace.head(a.warmup + a.tokens)


def _bound(res: dict, r: dict, trace: Trace, cfg, h2d: float, a) -> None:
    """The oracle bound and ondemand efficiency of cell r (Belady on `trace`, the cell's own path)."""
    L = trace.n_layers
    slots = max(cfg.top_k, int(r["cache_fraction"] * L * cfg.n_experts))
    bel = belady_misses(trace, slots, a.warmup) / a.tokens
    step = res["resident_eager_s" if res["path"] == "eager" else "resident_graph_s"]   # same path
    r.update(bounds(r, blob_bytes=res["expert_bytes"], h2d_Bps=h2d, resident_s=step,
                    belady_per_tok=bel, resident_graph_s=res["resident_graph_s"]))


def _own_routing(res: dict, cfg, h2d: float, a, log) -> None:
    """No trace: Belady on the routing the model took (recorded per cell; lossless, so the same in
    every cell: checked), and how uniform that routing is."""
    L, E, A = len(cfg.moe_layers), cfg.n_experts, cfg.top_k
    first = None
    for r in res["cells"]:
        routes = r.pop("_routes")
        if first is None:
            first = routes
        r["routing_equals_first_cell"] = bool(len(routes) == len(first)
                                              and all(np.array_equal(x, y) for x, y in zip(routes, first)))
    trace = routes_trace(first, L, E, A)
    res["routing"] = routing_spread(trace)
    for r in res["cells"]:
        _bound(res, r, trace, cfg, h2d, a)
        log(row(r))


def row(r: dict) -> str:
    flag = " (!)" if r["policy"] == "pregate" and "replay_note" in r else ""
    out = (f"{r['policy'] + flag:14} {100 * r['cache_fraction']:4.0f}% {r['tokens_per_s']:8.2f} tok/s "
           f"{1e3 * r['time_per_token_s']:8.2f} ms  misses/tok {r['misses_per_token']:6.2f} "
           f"(Belady {r['belady_misses_per_token']:6.2f})  stall {1e3 * r['stall_per_token_s']:7.2f} ms/tok  "
           f"hit {r['hit_rate'] or 0:.3f}  copy {r['copy_gbps'] or 0:5.1f} GB/s  "
           f"oracle {1e3 * r['oracle_bound_s']:7.2f} ms  ondemand-eff {r['ondemand_efficiency']:.2f}")
    if r.get("prefetch_issued"):
        out += (f"  prefetch {r['prefetch_issued']} (used {r['prefetch_used']}, wasted {r['prefetch_wasted']})")
    if r.get("pregate_recall_next") is not None:
        out += f"  next-layer recall {r['pregate_recall_next']:.3f}"
    h = r.get("host_per_token_s")
    if h:
        out += ("  host ms/tok: sync {:.2f} runtime {:.2f} first-copy {:.2f} launch {:.2f} after {:.2f}".format(
            *(1e3 * h[k] for k in ("router_sync_s", "runtime_s", "to_first_copy_s", "launch_s", "after_launch_s"))))
    return out


def table(res: dict) -> str:
    trace = res.get("route_trace")
    lines = [f"O1 ({res.get('path', 'eager')} path) {res['model']} {res['layers']} layers, "
             f"{'trace ' + trace if trace else 'own router (no trace)'}, {res['tokens']} tokens; "
             f"H2D {res['h2d_pinned_GBps']:.1f} GB/s, expert {res['expert_bytes'] / 1e6:.1f} MB "
             f"({1e3 * res['per_expert_copy_s']:.2f} ms), resident eager {1e3 * res['resident_eager_s']:.2f} ms, "
             f"graph {1e3 * res['resident_graph_s']:.2f} ms",
             "(!) pregate: " + REPLAY_NOTE["pregate"] if trace else f"routing: {res.get('routing')}"]
    lines += [row(r) for r in res["cells"]]
    return "\n".join(lines)
