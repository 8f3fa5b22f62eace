"""`python -m efengine.policy_bench --json OUT`: host (CPU) time per MoE layer of each offload policy.

Legend: L MoE layers, E experts per layer, A active experts per token, N tokens.

On a GPU, every microsecond of Python the offload runtime spends per layer between launches adds
to the step unless the device is still busy: at batch 1 a Mixtral layer computes in ~0.17 ms, so
policy bookkeeping must cost well under that. This bench replays a routing trace (default gsm8k_2,
Mixtral shape L=32, E=8, A=2, 50% cache) through OffloadRuntime exactly as the GPU path drives it
(begin_step, begin_layer -> consume every expert -> end_layer, end_step), on a VirtualEngine whose
virtual clock advances by a compute time per layer, so copies are in flight, land late and stall
as on the device; no weights move. Host time is taken around the runtime's calls only: CPU time of
the thread by default (--clock cpu: steady on a shared machine), or wall time (--clock wall).

Reported per policy:
  host_us_per_layer   plain run (best of --repeat), tokens after --warmup
  split_us_per_layer  a second, instrumented run: exclusive time of each component's methods
                      (predictor, eviction, horizon, prefetcher, cache, stats; "runtime" = the rest:
                      OffloadRuntime's own code and the generator). Instrumentation adds overhead of
                      its own, so the split sums to more than the plain figure (instrumented_total).
  decisions           misses, prefetches, evictions and a sha256 of the ordered load log
                      ((layer, expert, prefetch, evicted) of every copy started, and each layer's
                      misses): two versions of a policy decide the same iff the digests match.
Pre-gate policies get no hidden states under trace replay (as in bench O1): pregate never
prefetches, expertflow predicts from routing history only.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import EfError

COMPONENTS = ("predictor", "eviction", "horizon", "prefetcher", "cache", "stats")


def make_runtime(trace, policy: str, fraction: float, blob_nbytes: int, bandwidth: float, **kw):
    from .offload.prefetch import VirtualClock, VirtualEngine
    from .offload.runtime import OffloadRuntime
    from .offload.store import NullStore
    store = NullStore(trace.n_layers, trace.n_experts, trace.top_k, blob_nbytes)
    engine = VirtualEngine(bandwidth, clock=VirtualClock())
    return OffloadRuntime(None, "numpy", policy=policy, fraction=fraction, store=store, engine=engine,
                          keep_log=False, **kw), engine


class DecisionLog:
    """Every copy started (layer, expert, prefetch, evicted flat id or -1) and each layer's misses."""

    def __init__(self, rt):
        self.events: list[tuple] = []
        cache = rt.cache
        allocate = cache.allocate

        def logged_allocate(i, e, *, prefetch=False, protect=None):
            got = allocate(i, e, prefetch=prefetch, protect=protect)
            if got is not None:
                self.events.append(("load", int(i), int(e), bool(prefetch), int(got[1])))
            return got
        cache.allocate = logged_allocate

    def misses(self, layer: int, missing) -> None:
        self.events.append(("miss", layer, *sorted(int(e) for e in missing)))

    def digest(self) -> str:
        return hashlib.sha256(repr(self.events).encode()).hexdigest()


class Profiler:
    """Exclusive time per component: each wrapped method's time minus that of wrapped calls inside it."""

    def __init__(self, now=time.perf_counter):
        self.acc = dict.fromkeys(COMPONENTS, 0.0)
        self.now = now
        self.stack: list[float] = []

    def wrap(self, obj, component: str) -> None:
        for name in dir(type(obj)):
            if name.startswith("__") or isinstance(getattr(type(obj), name, None), property):
                continue
            fn = getattr(obj, name, None)
            if callable(fn) and not isinstance(fn, type) and hasattr(fn, "__self__"):
                setattr(obj, name, self._timed(fn, component))

    def _timed(self, fn, component: str):
        acc, stack, now = self.acc, self.stack, self.now

        def timed(*a, **k):
            stack.append(0.0)
            t0 = now()
            try:
                return fn(*a, **k)
            finally:
                dt = now() - t0
                child = stack.pop()
                acc[component] += dt - child
                if stack:
                    stack[-1] += dt
        return timed


def instrument(rt, now=time.perf_counter) -> Profiler:
    prof = Profiler(now)
    pol = rt.policy
    if pol.predictor is not None:
        prof.wrap(pol.predictor, "predictor")
    prof.wrap(pol.eviction, "eviction")
    for sub in ("lru", "freq"):                       # expertflow's inner LRU / frequency tables
        if hasattr(pol.eviction, sub):
            prof.wrap(getattr(pol.eviction, sub), "eviction")
    prof.wrap(rt.horizon, "horizon")
    prof.wrap(rt.prefetcher, "prefetcher")
    prof.wrap(rt.cache, "cache")
    prof.wrap(rt.stats, "stats")
    return prof


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def replay(trace, policy: str, *, fraction: float, blob_nbytes: int, bandwidth: float, layer_s: float,
           warmup: int, profile: bool = False, log: bool = False, clock: str = "cpu", **kw) -> dict:
    """One timed replay; host seconds summed over the tokens after `warmup`."""
    rt, engine = make_runtime(trace, policy, fraction, blob_nbytes, bandwidth, **kw)
    dlog = DecisionLog(rt) if log else None
    prof = instrument(rt, CLOCKS[clock]) if profile else None
    clock, now = engine.clock, CLOCKS[clock]
    pos = np.zeros(1, dtype=np.int64)
    host = 0.0
    marks = None
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for t in range(trace.n_tokens):
            if t == warmup:
                host, marks = 0.0, (dict(prof.acc) if prof else None)
            t0 = now()
            rt.begin_step(pos)
            host += now() - t0
            for l in range(trace.n_layers):
                ids = trace.experts[t, l][None, :]
                k = len(np.unique(ids))
                clock.advance(layer_s / 2)                        # attention and router
                t0 = now()
                if dlog is not None:
                    dlog.misses(l, [e for e in np.unique(ids) if not rt.cache.is_present(l, int(e))])
                    t0 = now()
                it = iter(rt.begin_layer(l, ids))
                host += now() - t0
                while True:
                    t0 = now()
                    got = next(it, None)
                    host += now() - t0
                    if got is None:
                        break
                    clock.advance(layer_s / 2 / k)                # this expert's share of the compute
                t0 = now()
                rt.end_layer(l)
                host += now() - t0
            t0 = now()
            rt.end_step()
            host += now() - t0
    finally:
        if gc_was:
            gc.enable()
    n_layers = (trace.n_tokens - warmup) * trace.n_layers
    s = rt.summary()
    out = {"host_us_per_layer": host / n_layers * 1e6, "misses": s["misses"], "late": s["late"],
           "prefetch_issued": s["prefetch_issued"], "prefetch_used": s["prefetch_used"],
           "prefetch_wasted": s["prefetch_wasted"], "misses_per_token": s["misses_per_token"],
           "stall_per_token_ms": round(s["stall_per_token_s"] * 1e3, 4),
           "time_per_token_ms": round(clock.now() / trace.n_tokens * 1e3, 4)}
    if prof is not None:
        split = {c: (prof.acc[c] - marks[c]) / n_layers * 1e6 for c in COMPONENTS}
        split["runtime"] = max(0.0, out["host_us_per_layer"] - sum(split.values()))
        out["split_us_per_layer"] = {c: round(v, 2) for c, v in split.items()}
        out["instrumented_total_us_per_layer"] = round(out["host_us_per_layer"], 2)
    if dlog is not None:
        out["decisions_sha256"] = dlog.digest()
        out["evictions"] = sum(1 for e in dlog.events if e[0] == "load" and e[4] >= 0)
    return out


def bench(trace_name: str, policies: list[str], *, tokens: int | None, fraction: float, blob_nbytes: int,
          bandwidth: float, layer_s: float, warmup: int, repeat: int, clock: str = "cpu") -> dict:
    from .offload.trace import load
    tr = load(trace_name)
    if tokens:
        tr = tr.head(tokens)
    if tr.n_tokens <= warmup:
        raise EfError(f"trace {tr.name}: {tr.n_tokens} tokens, need more than --warmup {warmup}")
    args = dict(fraction=fraction, blob_nbytes=blob_nbytes, bandwidth=bandwidth, layer_s=layer_s, warmup=warmup,
                clock=clock)
    res = {"trace": tr.name, "tokens": tr.n_tokens, "warmup_tokens": warmup, "layers": tr.n_layers,
           "experts": tr.n_experts, "top_k": tr.top_k, "cache": fraction, "blob_bytes": blob_nbytes,
           "bandwidth_gbps": bandwidth / 1e9, "layer_us": layer_s * 1e6, "clock": clock, "policies": {}}
    for p in policies:
        runs = [replay(tr, p, **args) for _ in range(max(1, repeat))]
        best = min(runs, key=lambda r: r["host_us_per_layer"])
        row = {k: v for k, v in best.items()}
        row["host_us_per_layer"] = round(best["host_us_per_layer"], 2)
        row["host_us_per_layer_runs"] = [round(r["host_us_per_layer"], 2) for r in runs]
        logged = replay(tr, p, log=True, **args)
        prof = replay(tr, p, profile=True, **args)
        row.update(decisions_sha256=logged["decisions_sha256"], evictions=logged["evictions"],
                   split_us_per_layer=prof["split_us_per_layer"],
                   instrumented_total_us_per_layer=prof["instrumented_total_us_per_layer"])
        res["policies"][p] = row
    return res


def table(res: dict) -> str:
    cols = ("runtime",) + COMPONENTS
    lines = [f"{res['trace']}: {res['tokens']} tokens (first {res['warmup_tokens']} not timed), L={res['layers']} "
             f"E={res['experts']} A={res['top_k']}, cache {res['cache']:.0%}, {res['layer_us']:.0f} us compute/layer",
             f"{'policy':<11} {'us/layer':>9}  misses  prefetch  | split (instrumented, us/layer): "
             + " ".join(f"{c:>10}" for c in cols)]
    for p, r in res["policies"].items():
        sp = r["split_us_per_layer"]
        lines.append(f"{p:<11} {r['host_us_per_layer']:9.1f}  {r['misses']:6d}  {r['prefetch_issued']:8d}  | "
                     f"{'':33}" + " ".join(f"{sp[c]:10.1f}" for c in cols))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m efengine.policy_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="also write the JSON to this file")
    ap.add_argument("--trace", default="gsm8k_2", help="trace name or path")
    ap.add_argument("--tokens", type=int, default=None, help="only the first N tokens of the trace")
    ap.add_argument("--warmup", type=int, default=8, help="tokens replayed before timing starts")
    ap.add_argument("--policies", default="ondemand,pregate,expertflow")
    ap.add_argument("--cache", type=float, default=0.5, help="cache size as a fraction of all experts")
    ap.add_argument("--expert-mb", type=float, default=99.09, help="bytes per expert in MB (Mixtral q4: 99.09)")
    ap.add_argument("--bandwidth-gbps", type=float, default=55.0, help="host->GPU copy bandwidth (GB/s)")
    ap.add_argument("--layer-us", type=float, default=170.0, help="device compute per layer (us)")
    ap.add_argument("--repeat", type=int, default=3, help="plain runs per policy (the best is reported)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="host time as thread CPU time "
                    "(default) or wall time")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from .offload.policy import POLICIES
    policies = [p for p in a.policies.split(",") if p]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not 0 < a.cache <= 1 or a.warmup < 0:
        print(f"error: unknown policies {bad} (choose from {', '.join(POLICIES)}), or --cache outside (0, 1], "
              "or a negative --warmup", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        res = bench(a.trace, policies, tokens=a.tokens, fraction=a.cache, blob_nbytes=int(a.expert_mb * 1e6),
                    bandwidth=a.bandwidth_gbps * 1e9, layer_s=a.layer_us * 1e-6, warmup=a.warmup, repeat=a.repeat,
                    clock=a.clock)
    except EfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import platform
    out = {"benchmark": "policy_host_time", "machine": platform.processor() or platform.machine(),
           "python": platform.python_version(), "numpy": np.__version__, "result": res,
           "seconds": round(time.perf_counter() - t0, 2)}
    print(table(res), file=sys.stderr)
    if a.json:
        path = Path(a.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(path)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
