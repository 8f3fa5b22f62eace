"""`python -m efengine.offload_bench`: replay routing traces through the cache simulators (CPU only).

For each trace and cache size: misses per decoded token of
  ondemand (global LRU), freq (decayed frequency, pool-wide), layer-freq (decayed frequency within
  each layer), expertflow (history-only hybrid predictor + two-level eviction; -lru / -freq: other
  orders within its unprotected tier), foresight-S (perfect knowledge of the next S layer-steps),
  belady (offline optimum),
and the transfer time those misses cost at a given expert size and copy bandwidth (the oracle
offload bound uses Belady's). `--timed` also replays ondemand / expertflow on a virtual clock with a
compute time per layer (stall and time per token, prefetching included, and the oracle bound
max(layers x layer time, Belady misses x copy time)); `--timeline N` records the first N steps of
each timed replay (compute / copy / stall intervals); `--plot DIR` draws them and the policies by
cache size (efengine/plot.py, needs matplotlib).
`--model PATH|demo` instead runs a real model (numpy) over text one token at a time (decode
steps, real routing and hidden states): misses, prefetch precision and the predictor's recall by
distance for ondemand / pregate / expertflow, and expertflow without hidden states.
JSON goes to stdout, a table to stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import EfError
from .offload.cache import LRU, DecayedFrequency, LayerFrequency
from .offload.policy import make_policy
from .offload.replay import replay_trace
from .offload.sim import Belady, Foresight, simulate, slots_for
from .offload.trace import load


def evictions(trace, names: list[str], foresight: list[int]):
    L, E, A = trace.n_layers, trace.n_experts, trace.top_k
    out = {"ondemand": lambda: LRU(), "freq": lambda: DecayedFrequency(0.9),
           "layer-freq": lambda: LayerFrequency(0.9),
           "expertflow": lambda: make_policy("expertflow", L, E, A).eviction,
           "expertflow-lru": lambda: make_policy("expertflow", L, E, A, inner="lru").eviction,
           "expertflow-freq": lambda: make_policy("expertflow", L, E, A, inner="freq").eviction,
           "belady": lambda: Belady(trace)}
    for s in foresight:
        out[f"foresight-{s}"] = (lambda s=s: Foresight(trace, s))
    return {n: out[n] for n in names + [f"foresight-{s}" for s in foresight]}


TIMED_KEYS = ("misses_per_token", "late", "stall_per_token_s", "time_per_token_s", "prefetch_issued",
              "prefetch_used", "prefetch_wasted", "horizon", "timeline")


def bench_trace(name: str, caches: list[float], *, policies: list[str], foresight: list[int],
                expert_bytes: int, bandwidth: float, timed: bool, layer_s: float, tokens: int | None,
                timeline: int = 0) -> dict:
    trace = load(name)
    if tokens:
        trace = trace.head(tokens)
    ms_per_miss = expert_bytes / bandwidth * 1e3
    res = {"trace": trace.name, "tokens": trace.n_tokens, "skipped_tokens": trace.skipped,
           "layers": trace.n_layers, "experts": trace.n_experts, "top_k": trace.top_k,
           "expert_bytes": expert_bytes, "bandwidth_gbps": bandwidth / 1e9,
           "ms_per_miss": round(ms_per_miss, 4), "caches": []}
    for frac in caches:
        slots = slots_for(frac, trace)
        row = {"cache": frac, "slots": slots, "misses_per_token": {}, "transfer_ms_per_token": {}}
        for pname, make in evictions(trace, policies, foresight).items():
            r = simulate(trace, slots, make())
            row["misses_per_token"][pname] = round(r.misses_per_token, 3)
            row["transfer_ms_per_token"][pname] = round(r.misses_per_token * ms_per_miss, 3)
        if timed:
            row["timed"] = {}
            for p in ("ondemand", "expertflow"):
                r = replay_trace(trace, p, fraction=frac, blob_nbytes=expert_bytes, bandwidth=bandwidth,
                                 layer_s=layer_s, **({"timeline": timeline} if timeline else {}))
                row["timed"][p] = {k: v for k, v in r.items() if k in TIMED_KEYS}
            bel = row["misses_per_token"].get("belady")
            if bel is not None:
                oracle = max(trace.n_layers * layer_s, bel * expert_bytes / bandwidth)
                for t in row["timed"].values():
                    t["oracle_bound_s"] = round(oracle, 6)
        res["caches"].append(row)
    return res


def table(res: dict) -> str:
    names = list(res["caches"][0]["misses_per_token"]) if res["caches"] else []
    lines = [f"{res['trace']}: {res['tokens']} tokens, misses per token "
             f"(x {res['ms_per_miss']:.2f} ms/miss = transfer bound)",
             "cache  slots  " + "  ".join(f"{n:>15}" for n in names)]
    for row in res["caches"]:
        lines.append(f"{row['cache']:>5.0%}  {row['slots']:>5}  "
                     + "  ".join(f"{row['misses_per_token'][n]:>15.2f}" for n in names))
        for p, t in row.get("timed", {}).items():
            lines.append(f"       timed {p:>10}: {t['time_per_token_s'] * 1e3:8.2f} ms/token, "
                         f"stall {t['stall_per_token_s'] * 1e3:8.2f} ms/token, misses {t['misses_per_token']:.2f}, "
                         f"prefetches {t['prefetch_issued']} (used {t['prefetch_used']})")
    return "\n".join(lines)


def model_tokens(ef, text_path: str | None, n: int) -> list[int]:
    from pathlib import Path

    from .tokenizer import Tokenizer
    default = Path(__file__).resolve().parent.parent / "tests" / "data" / "english_eval.txt"
    path = Path(text_path) if text_path else default
    try:
        text = path.read_text()
    except OSError as e:
        raise EfError(f"{path}: cannot read the text to run ({e.strerror}); pass --text FILE") from None
    return Tokenizer.from_ef(ef).encode(text)[:n]


def bench_model(path: str, caches: list[float], tokens: int, text: str | None) -> dict:
    """Decode `tokens` tokens of text one at a time through the offloaded model, per policy and cache."""
    import numpy as np

    from .format import EfFile
    from .model import Model
    from .offload import OffloadRuntime
    from .offload.prefetch import ImmediateEngine
    if path == "demo":
        from .demo import default_model_path
        path = str(default_model_path(progress=False))
    ef = EfFile(path)
    ids = model_tokens(ef, text, tokens)
    res = {"model": path, "tokens": len(ids), "layers": len(ef.expert_layers), "experts": ef.n_experts,
           "top_k": ef.config.top_k, "caches": []}
    for frac in caches:
        row = {"cache": frac, "policies": {}}
        for name, attach in (("ondemand", True), ("pregate", True), ("expertflow", True),
                             ("expertflow-history", False)):
            rt = OffloadRuntime(ef, "numpy", policy=name.split("-")[0], fraction=frac, engine=ImmediateEngine(),
                                pregate_span=8)     # recall by distance 1..8 with pre-gate scores
            model = Model(ef, "numpy", experts=rt)
            if attach:
                rt.attach(model)
            cache = model.new_cache(len(ids) + 1)
            for t in ids:
                model.forward(np.array([t]), cache, last_only=True)
            s = rt.summary()
            keep = ("misses_per_token", "hit_rate", "prefetch_issued", "prefetch_used", "prefetch_wasted",
                    "prefetch_precision", "horizon")
            row["policies"][name] = {k: s.get(k) for k in keep}
            if "prediction_recall_by_distance" in s:
                rec = s["prediction_recall_by_distance"]
                row["policies"][name]["recall_by_distance"] = {d: rec[d] for d in sorted(rec) if d <= 8}
            loads = s["misses"] + s["prefetch_issued"]
            row["policies"][name]["loads_per_token"] = round(loads / max(1, s["tokens"]), 3)
        res["caches"].append(row)
    return res


def model_table(res: dict) -> str:
    lines = [f"{res['model']}: {res['tokens']} decode steps, {res['layers']} MoE layers, "
             f"{res['experts']} experts, top-{res['top_k']}"]
    for row in res["caches"]:
        for name, p in row["policies"].items():
            rec = p.get("recall_by_distance", {})
            lines.append(f"{row['cache']:>5.0%}  {name:>18}: misses/token {p['misses_per_token']:6.2f}  "
                         f"loads/token {p['loads_per_token']:6.2f}  prefetch precision {p['prefetch_precision']}"
                         + (f"  recall d=1..4 {[rec.get(d) for d in (1, 2, 3, 4)]}" if rec else ""))
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m efengine.offload_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="gsm8k_2", help="trace names or paths, comma-separated "
                    "(names are looked up in the shared trace folder)")
    ap.add_argument("--cache", default="0.25,0.5,0.75", help="cache sizes as fractions of all experts")
    ap.add_argument("--policies", default="ondemand,freq,layer-freq,expertflow,expertflow-lru,expertflow-freq,belady")
    ap.add_argument("--foresight", default="8", help="foresight horizons S (layer-steps), comma-separated")
    ap.add_argument("--expert-mb", type=float, default=94.0, help="bytes per expert in MB (Mixtral int4: 94)")
    ap.add_argument("--bandwidth-gbps", type=float, default=55.0, help="host->GPU copy bandwidth (GB/s)")
    ap.add_argument("--timed", action="store_true", help="also replay on a virtual clock (stall, time per token)")
    ap.add_argument("--layer-us", type=float, default=75.0, help="compute time per layer for --timed (us)")
    ap.add_argument("--timeline", type=int, default=0, metavar="N",
                    help="--timed: record the first N steps of each replay (compute / copy / stall)")
    ap.add_argument("--plot", metavar="DIR", help="draw PNGs there (timelines need --timeline; needs matplotlib)")
    ap.add_argument("--tokens", type=int, default=None, help="only the first N tokens of each trace "
                    "(--model: decode steps to run, default 200)")
    ap.add_argument("--model", default=None, help="a .ef path or 'demo': run that model instead of traces")
    ap.add_argument("--text", default=None, help="text to run with --model (default: tests/data/english_eval.txt)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        caches = [float(x) for x in a.cache.split(",") if x]
        foresight = [int(x) for x in a.foresight.split(",") if x]
        policies = [p for p in a.policies.split(",") if p]
    except ValueError as e:
        print(f"error: bad --cache / --foresight list ({e})", file=sys.stderr)
        return 2
    known = {"ondemand", "freq", "layer-freq", "expertflow", "expertflow-lru", "expertflow-freq", "belady"}
    bad = [p for p in policies if p not in known] + [f"cache {c}" for c in caches if not 0 < c <= 1]
    if bad:
        print(f"error: unknown policies or bad cache sizes: {', '.join(map(str, bad))} "
              f"(policies: {', '.join(sorted(known))}; caches in (0, 1])", file=sys.stderr)
        return 2
    if a.plot:
        from . import plot
        try:
            plot.check()
        except EfError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not a.timed or a.model:
            print("error: --plot draws timed trace replays: add --timed (and not --model)", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    out = {"benchmark": "offload_traces", "results": []}
    try:
        if a.model:
            res = bench_model(a.model, caches, a.tokens or 200, a.text)
            out["benchmark"] = "offload_model"
            out["results"].append(res)
            print(model_table(res), file=sys.stderr)
        for name in [t for t in a.trace.split(",") if t and not a.model]:
            res = bench_trace(name, caches, policies=policies, foresight=foresight,
                              expert_bytes=int(a.expert_mb * 1e6), bandwidth=a.bandwidth_gbps * 1e9,
                              timed=a.timed, layer_s=a.layer_us * 1e-6, tokens=a.tokens,
                              timeline=a.timeline if a.timed else 0)
            out["results"].append(res)
            print(table(res), file=sys.stderr)
    except EfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=1))
    if a.plot:
        from . import plot
        try:
            for f in plot.plot_result(out, a.plot):
                print(f"wrote {f}", file=sys.stderr)
        except EfError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
