"""Scenario O2 of benchmarks.md: a map of stall over (GPU budget x prompt length), fp16 MoE models.

    python -m efengine.o2_bench --model qwen1.5-moe-a2.7b [--budgets 20,24,max] [--prompts 8,128,512,2048]
                                [--decode 128] [--policies ondemand,expertflow] [--layers N] [--quick]
                                [--time-limit S] [--json OUT]

Model: a full-size synthetic fp16 model of a named shape (convert/shapes.py), built directly on the
GPU (ops/gpu_synth.DeviceRandomSource); its routed experts are offloaded for real: the host tier is
`--host-blobs` distinct full-size pinned random blobs shared by all experts (expert f reads blob
f mod n, offload_gpu_bench.BlobStore), so every miss is a real full-size pinned host->device DMA
(CudaEngine direct_pinned); copy speed does not depend on values.

Budget: GiB of GPU memory for the dense weights plus the expert cache (as Engine(gpu_mem=) reads
it): slots = (budget - dense bytes) // expert bytes. `max` = the largest whole GiB below the
model's size; a budget that would hold every expert is clamped to it (offloading must be real).
With `--layers N` the cut model keeps the full model's cache FRACTION of each budget.

Per (budget, policy) one OffloadRuntime (CudaEngine, stall timed with CUDA events on the compute
stream) serves a warm-up request, then one request per prompt length P (random ids, the same in
every cell): a prefill of P tokens, then `--decode` greedy tokens, through the eager
Model.forward with the runtime as ExpertProvider and the model's OWN router (no trace; what
Engine(device="cuda", gpu_mem=...) runs). The expert cache carries over between requests, as in a
server. A cell that fails records its error and the run goes on; `--time-limit` skips the cells
that would start after it. The JSON is rewritten after every cell.

Per phase (prefill, decode) of each cell and policy, with L MoE layers and n steps in the phase
(prefill: 1 step of P tokens; decode: n one-token steps):
  compute_per_layer_s      = (wall - stall) / (L n)
  missing_bytes_per_layer  = misses x expert bytes / (L n)
  hideable                 = missing_bytes_per_layer / H2D <= compute_per_layer_s
(H2D: pinned host->device bandwidth measured in the same run). The map (per budget x prompt, per
phase) gives each policy's stall / ondemand's stall, the cell's hideable flag (ondemand's misses:
the bytes the budget forces to move) and whether the target holds there: stall <= 0.1% of
ondemand's. Compute time on the eager path includes Python's launch overhead, which copies can
hide behind too: the flags are those of this path, not of the graph decode.

The loop and the figures are backend-agnostic (tests/test_o2_bench.py runs them on numpy).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np

from .errors import ConfigError, EfError

GiB = 1 << 30
TARGET = 1e-3                       # the target: at most 0.1% of ondemand's stall
PHASES = ("prefill", "decode")
KNOWN_POLICIES = ("ondemand", "pregate", "expertflow")
QUICK = dict(layers=4, prompts=[8, 128], decode=16)


# ---- sizes and budgets (host-only) ---------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Stored bytes of a model: dense (everything but routed experts), one expert blob, L*E experts."""
    dense: int
    blob: int
    experts: int
    moe_layers: int

    @property
    def total(self) -> int:
        return self.dense + self.experts * self.blob


def model_sizes(cfg, experts: str = "f16", dense: str = "f16", group: int = 64) -> Sizes:
    """Sizes of `cfg` stored as DeviceRandomSource / efconvert store it (matrices in `dense`,
    1-D tensors f32, experts in `experts`)."""
    import efmodels
    from . import quant
    from .format import expert_layout
    d = sum(quant.nbytes(dense if len(s) == 2 else "f32", s, group) for _, s, _ in efmodels.expected_tensors(cfg))
    _, blob = expert_layout({p: (experts, s, group) for p, s in efmodels.expert_shapes(cfg).items()})
    L = len(cfg.moe_layers)
    return Sizes(int(d), int(blob), L * int(cfg.n_experts), L)


def max_budget_bytes(full: Sizes) -> int:
    """`max`: the largest whole GiB below the model's size (else the model minus one expert)."""
    b = (full.total - 1) // GiB * GiB
    return b if b > full.dense + full.blob else full.total - full.blob


def plan_budget(budget, full: Sizes, run: Sizes | None = None, top_k: int = 1) -> dict:
    """A GPU budget (bytes, or "max") -> the expert slots of the run model.

    slots = (budget - full.dense) // blob on the full model, clamped below every expert;
    `run` (a --layers cut) keeps the same fraction of its own experts. Raises ConfigError when
    the budget does not hold the dense weights plus top_k experts."""
    run = run or full
    note = None
    b = max_budget_bytes(full) if budget == "max" else int(budget)
    if b >= full.total - full.blob + 1 and budget != "max":
        note = f"{b / GiB:.2f} GiB would hold the whole model ({full.total / GiB:.2f} GiB): clamped to 'max'"
        b = max_budget_bytes(full)
    slots_full = (b - full.dense) // full.blob
    if slots_full < max(top_k, 1):
        raise ConfigError(f"a {b / GiB:.2f} GiB budget holds the dense weights ({full.dense / GiB:.2f} GiB) plus "
                          f"{max(slots_full, 0)} experts; one step needs {top_k}")
    slots_full = min(slots_full, full.experts - 1)
    frac = slots_full / full.experts
    slots = slots_full if run == full else min(run.experts - 1, max(top_k, int(frac * run.experts)))
    out = {"budget_gib": round(b / GiB, 3), "gpu_bytes": b, "slots": int(slots), "experts": run.experts,
           "cache_fraction": round(slots / run.experts, 4), "expert_budget_bytes": int(slots) * run.blob}
    if run != full:
        out["full_model_cache_fraction"] = round(frac, 4)
    if note:
        out["note"] = note
    return out


def unique_plans(plans: list[dict]) -> list[dict]:
    """Plans with distinct slot counts, in order (27 GiB clamped to 'max' is 'max')."""
    seen, out = set(), []
    for p in plans:
        if p["slots"] not in seen:
            seen.add(p["slots"])
            out.append(p)
    return out


def parse_budgets(text: str) -> list:
    """"20,24,max" -> [20 GiB in bytes, 24 GiB in bytes, "max"]."""
    out = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if tok == "max":
            out.append("max")
            continue
        try:
            v = float(tok)
        except ValueError:
            raise ConfigError(f"--budgets: {tok!r} is neither a number of GiB nor 'max'") from None
        if v <= 0:
            raise ConfigError(f"--budgets: {tok} GiB must be positive")
        out.append(int(v * GiB))
    return out


# ---- one request: prefill + greedy decode, per-phase runtime stats -------------------------------
def _counters(stats) -> dict:
    return {f.name: getattr(stats, f.name) for f in fields(stats)
            if f.type in ("int", "float", int, float) and not f.name.startswith("_")}


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def run_request(model, rt, prompt: np.ndarray, decode: int) -> dict:
    """Prefill `prompt`, then `decode` greedy steps. Returns {"prefill": raw phase, "decode": raw
    phase, "tokens": [decoded ids]}; a raw phase is the runtime's counter deltas + wall_s.
    Logits come back to the host after each step, so a step's wall time includes its device work."""
    cache = model.new_cache(len(prompt) + decode + 1)
    out, toks = {}, []
    c0, t0 = _counters(rt.stats), time.perf_counter()
    logits = model.forward(prompt, cache, last_only=True)
    tok = int(np.asarray(logits)[-1].argmax())
    out["prefill"] = dict(_delta(c0, _counters(rt.stats)), wall_s=time.perf_counter() - t0)
    c0, t0 = _counters(rt.stats), time.perf_counter()
    for _ in range(decode):
        toks.append(tok)
        logits = model.forward(np.array([tok]), cache)
        tok = int(np.asarray(logits)[-1].argmax())
    out["decode"] = dict(_delta(c0, _counters(rt.stats)), wall_s=time.perf_counter() - t0)
    out["tokens"] = toks
    return out


def phase_figures(raw: dict, *, moe_layers: int, blob: int, h2d_Bps: float) -> dict:
    """A phase's figures (module doc) from its raw counter deltas."""
    n, L = max(int(raw["steps"]), 1), max(moe_layers, 1)
    wall, stall = float(raw["wall_s"]), float(raw["stall_s"])
    compute = max(wall - stall, 0.0)
    missing = raw["misses"] * blob / (L * n)
    out = {"wall_s": wall, "steps": int(raw["steps"]), "tokens": int(raw["tokens"]), "stall_s": stall,
           "stall_frac": stall / wall if wall > 0 else None, "misses": int(raw["misses"]),
           "hits": int(raw["hits"]), "late": int(raw["late"]), "copies": int(raw["copies"]),
           "bytes_copied": int(raw["bytes_copied"]),
           "copy_gbps": raw["bytes_copied"] / raw["copy_s"] / 1e9 if raw.get("copy_s", 0) > 0 else None,
           "prefetch_issued": int(raw["prefetch_issued"]), "prefetch_used": int(raw["prefetch_used"]),
           "prefetch_wasted": int(raw["prefetch_wasted"]),
           "compute_per_layer_s": compute / (L * n), "missing_bytes_per_layer": missing,
           "copy_per_layer_s": missing / h2d_Bps}
    out["hideable"] = bool(out["copy_per_layer_s"] <= out["compute_per_layer_s"])
    if n > 1:
        out["wall_per_token_s"] = wall / n
        out["stall_per_token_s"] = stall / n
    return out


# ---- the map: cells per (budget, policy, prompt) and the per-cell comparison ---------------------
class Env:
    """What the map needs from a backend: `source` (weight source), `backend` name, `store` (host
    tier), `make_engine()` -> copy engine, `h2d_Bps`, `free()` (release device memory)."""

    def __init__(self, source, backend: str, store, make_engine, h2d_Bps: float, free=None):
        self.source, self.backend, self.store = source, backend, store
        self.make_engine, self.h2d_Bps = make_engine, float(h2d_Bps)
        self.free = free or gc.collect


def prompt_ids(P: int, vocab: int, seed: int = 0) -> np.ndarray:
    """The prompt of length P (the same in every cell: depends only on P and the seed)."""
    return np.random.default_rng([seed, P]).integers(0, vocab, P)


def _runtime(env: Env, policy: str, plan: dict):
    from .model import Model
    from .offload import OffloadRuntime
    rt = OffloadRuntime(env.source, env.backend, policy=policy, budget_bytes=plan["expert_budget_bytes"],
                        store=env.store, engine=env.make_engine(), keep_log=False)
    if rt.n_slots != plan["slots"]:
        raise EfError(f"runtime holds {rt.n_slots} experts, the plan {plan['slots']}")
    model = Model(env.source, env.backend, experts=rt)
    rt.attach(model)
    return rt, model


def _close(rt) -> None:
    """Stop a runtime's copy engine (the caller then drops its references and frees memory)."""
    if rt is not None:
        try:
            rt.close()
        except Exception:  # noqa: BLE001 - a failed runtime may not close cleanly; memory is freed after
            pass


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def run_map(env: Env, plans: list, prompts: list, decode: int, policies: list, *, warmup: tuple = (64, 4),
            time_limit: float = 0.0, log=None, on_cell=None) -> list[dict]:
    """Every (budget plan, policy, prompt) cell; budgets outer, then policies, then prompts."""
    log = log or (lambda m: None)
    cfg = env.source.config
    t_start, cells = time.perf_counter(), []
    for plan in plans:
        for policy in policies:
            rt = model = None
            for P in prompts:
                cell = {"budget_gib": plan["budget_gib"], "slots": plan["slots"],
                        "cache_fraction": plan["cache_fraction"], "prompt": int(P), "decode_tokens": int(decode),
                        "policy": policy}
                if time_limit and time.perf_counter() - t_start > time_limit:
                    cell["skipped"] = f"time limit ({time_limit:.0f} s) reached before this cell"
                else:
                    try:
                        if rt is None:
                            rt, model = _runtime(env, policy, plan)
                            if warmup[0] > 0:       # fill the expert cache: a server's steady state
                                run_request(model, rt, prompt_ids(warmup[0], cfg.vocab_size, seed=1), warmup[1])
                        cell.update(_measure(env, model, rt, P, decode))
                    except Exception as e:  # noqa: BLE001 - record (OOM, kernel errors...) and go on
                        cell["error"] = _error(e)
                    if "error" in cell:     # outside the except: its traceback no longer holds the pool
                        _close(rt)
                        rt = model = None
                        env.free()
                cells.append(cell)
                log(cell_line(cell))
                if on_cell is not None:
                    on_cell(cells)
            _close(rt)
            rt = model = None
            env.free()
    return cells


def _measure(env: Env, model, rt, P: int, decode: int) -> dict:
    r = run_request(model, rt, prompt_ids(P, env.source.config.vocab_size), decode)
    kw = dict(moe_layers=rt.store.L, blob=rt.store.blob_nbytes, h2d_Bps=env.h2d_Bps)
    out = {ph: phase_figures(r[ph], **kw) for ph in PHASES}
    out["_tokens"] = r["tokens"]
    out["horizon_end"] = rt.horizon.value
    return out


def compare(cells: list[dict], baseline: str = "ondemand") -> list[dict]:
    """Per (budget: its slot count, prompt): per phase, the baseline's hideable flag and stall, each other policy's
    stall / baseline stall and whether it is <= TARGET; and whether every policy decoded the
    baseline's tokens (lossless). Pops the cells' token lists."""
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["slots"], c["prompt"]), {})[c["policy"]] = c
    out = []
    for (slots, P), by in groups.items():
        base, any_cell = by.get(baseline), next(iter(by.values()))
        entry = {"budget_gib": any_cell["budget_gib"], "slots": slots, "prompt": P,
                 "cache_fraction": any_cell["cache_fraction"]}
        ok = base is not None and "error" not in base and "skipped" not in base
        if not ok:
            entry["missing"] = f"no {baseline} result for this cell"
        for ph in PHASES:
            e = entry[ph] = {}
            if ok:
                b = base[ph]
                e.update(hideable=b["hideable"], baseline_stall_s=b["stall_s"],
                         copy_per_layer_s=b["copy_per_layer_s"], compute_per_layer_s=b["compute_per_layer_s"])
            for pol, c in by.items():
                if pol == baseline or not ok or ph not in c:
                    continue
                s, s0 = c[ph]["stall_s"], base[ph]["stall_s"]
                e[pol] = {"stall_s": s, "stall_ratio": s / s0 if s0 > 0 else None,
                          "target_met": bool(s <= TARGET * s0) if base[ph]["hideable"] else None}
        if ok:
            entry["same_tokens"] = {pol: c["_tokens"] == base["_tokens"]
                                    for pol, c in by.items() if pol != baseline and "_tokens" in c}
        out.append(entry)
    for c in cells:
        c.pop("_tokens", None)
    return out


def verdict(cmap: list[dict]) -> dict:
    """Counts over the map: per phase, hideable cells, and per policy how many of them meet TARGET."""
    out = {}
    for ph in PHASES:
        hide = [e for e in cmap if e.get(ph, {}).get("hideable")]
        pols = {p for e in cmap for p in e.get(ph, {}) if isinstance(e[ph][p], dict)}
        out[ph] = {"cells": sum(1 for e in cmap if "hideable" in e.get(ph, {})), "hideable": len(hide),
                   "target_met": {p: sum(1 for e in hide if e[ph].get(p, {}).get("target_met")) for p in sorted(pols)}}
    return out


# ---- report --------------------------------------------------------------------------------------
def _ms(x) -> str:
    return "    -" if x is None else f"{1e3 * x:7.2f}"


def cell_line(c: dict) -> str:
    head = f"{c['budget_gib']:6.2f} GiB ({100 * c['cache_fraction']:5.1f}%) P={c['prompt']:5d} {c['policy']:10}"
    if "error" in c or "skipped" in c:
        return f"{head} {'ERROR ' + c['error'] if 'error' in c else 'skipped'}"
    p, d = c["prefill"], c["decode"]
    return (f"{head} prefill {_ms(p['wall_s'])} ms stall {_ms(p['stall_s'])} ms misses {p['misses']:5d}"
            f" | decode {_ms(d.get('wall_per_token_s'))} ms/tok stall {_ms(d.get('stall_per_token_s'))} ms/tok"
            f" misses/tok {d['misses'] / max(d['steps'], 1):6.2f}")


def table(res: dict) -> str:
    lines = [f"O2 {res['model']} ({res['layers']} layers, {res.get('precision', 'f16')}, eager path, own router): H2D "
             f"{res['h2d_pinned_GBps']:.1f} GB/s, expert {res['expert_bytes'] / 1e6:.1f} MB; "
             "ratio = policy stall / ondemand stall, H = hideable, target <= 0.1%"]
    for e in res["map"]:
        row = f"{e['budget_gib']:6.2f} GiB ({100 * e['cache_fraction']:5.1f}%) P={e['prompt']:5d}"
        if "missing" in e:
            lines.append(f"{row}  {e['missing']}")
            continue
        for ph in PHASES:
            x = e[ph]
            row += f" | {ph} {'H' if x['hideable'] else '-'} od {_ms(x['baseline_stall_s'])} ms"
            for pol, v in x.items():
                if isinstance(v, dict):
                    r = "    n/a" if v["stall_ratio"] is None else f"{100 * v['stall_ratio']:6.2f}%"
                    row += f" {pol} {r}{' ok' if v['target_met'] else ''}"
        lines.append(row)
    lines.append(f"verdict: {json.dumps(res['verdict'])}")
    return "\n".join(lines)


def write_json(path: str, res: dict) -> None:
    """Atomic: a temp file renamed over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=float)
    os.replace(tmp, path)


# ---- GPU -----------------------------------------------------------------------------------------
def _free_gpu() -> None:
    import cupy
    gc.collect()
    cupy.cuda.Device().synchronize()
    cupy.get_default_memory_pool().free_all_blocks()


def gpu_env(cfg, host_blobs: int, group: int, log) -> tuple[Env, Sizes]:
    """The synthetic fp16 model on the device, its pinned blob host tier, the measured H2D."""
    from . import bench
    from .offload import dense_nbytes
    from .offload.cuda_engine import CudaEngine
    from .offload_gpu_bench import BlobStore, pinned_blobs
    from .ops.gpu_synth import DeviceRandomSource
    h2d = bench._h2d()
    _free_gpu()
    src = DeviceRandomSource(cfg, experts="f16", dense="f16", group=group)
    sizes = model_sizes(cfg, group=group)
    if src.blob_nbytes != sizes.blob:
        raise EfError(f"expert sizes disagree: source blob {src.blob_nbytes}, computed {sizes.blob}")
    if dense_nbytes(src) != sizes.dense:       # layout padding of the device source: slots are
        log(f"note: dense bytes on the device {dense_nbytes(src)}, planned {sizes.dense}")   # planned on blobs
    t0 = time.perf_counter()
    n = min(host_blobs, sizes.experts)
    store = BlobStore(src, pinned_blobs(src, n))
    log(f"pinned {n} host blobs of {sizes.blob / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s; "
        f"H2D {h2d / 1e9:.1f} GB/s")
    env = Env(src, "cupy", store, lambda: CudaEngine(direct_pinned=True), h2d, free=_free_gpu)
    env.host_blobs = n
    return env, sizes


def run(a, log) -> dict:
    from efconvert.shapes import shape_config
    _, full_cfg, _ = shape_config(a.model)
    _, cfg, _ = shape_config(a.model, a.layers)
    full, cut = model_sizes(full_cfg, group=a.group), model_sizes(cfg, group=a.group)
    plans = unique_plans([plan_budget(b, full, cut, cfg.top_k) for b in a.budgets])
    env, sizes = gpu_env(cfg, a.host_blobs, a.group, log)
    res = {"scenario": "O2", "model": a.model, "precision": "f16 (dense and experts)", "layers": cfg.n_layers,
           "moe_layers": cut.moe_layers, "experts_per_layer": cfg.n_experts, "top_k": cfg.top_k,
           "expert_bytes": cut.blob, "dense_bytes": cut.dense, "model_bytes": cut.total,
           "full_model_gib": round(full.total / GiB, 3), "prompts": a.prompts, "decode": a.decode,
           "policies": a.policies, "warmup": {"prompt": a.warmup_prompt, "decode": a.warmup_decode},
           "h2d_pinned_GBps": env.h2d_Bps / 1e9, "budgets": plans, "path": "eager Model.forward, own router",
           "host_tier": f"{cut.experts} host experts backed by {env.host_blobs} distinct pinned random blobs; "
                        "each copy a full-size pinned host->device DMA (CudaEngine direct_pinned)",
           "notes": NOTES, "cells": [], "map": [], "verdict": {}}
    if a.layers:
        res["budgets_note"] = "--layers cut: each budget keeps the full model's expert cache fraction"
    t0 = time.perf_counter()

    def save(cells):
        res["cells"], res["elapsed_s"] = cells, time.perf_counter() - t0
        if a.json:
            write_json(a.json, res)
    cells = run_map(env, plans, a.prompts, a.decode, a.policies, warmup=(a.warmup_prompt, a.warmup_decode),
                    time_limit=a.time_limit, log=log, on_cell=save)
    res["map"] = compare(cells)
    res["verdict"] = verdict(res["map"])
    save(cells)
    return res


NOTES = {
    "hideable": "missing expert bytes per MoE layer (ondemand's misses) / measured pinned H2D <= compute time "
                "per MoE layer ((wall - stall) / layers / steps); compute on the eager path includes Python "
                "launch overhead, which copies also hide behind",
    "target": "a policy meets the target in a hideable cell and phase when its stall <= 0.1% of ondemand's",
    "routing": "the synthetic model's own random router decides: it routes near-uniformly, so predictions "
               "measure the mechanism, not a trained model's predictability",
    "requests": "per (budget, policy): one warm-up request fills the cache, then one request per prompt "
                "length in order; the cache carries over between requests",
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m efengine.o2_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen1.5-moe-a2.7b", help="shape name (convert/shapes.py)")
    p.add_argument("--budgets", default="20,24,max", help="GPU budgets in GiB, or 'max' (default 20,24,max)")
    p.add_argument("--prompts", default=None, help="prompt lengths (default 8,128,512,2048)")
    p.add_argument("--decode", type=int, default=None, help="greedy tokens after each prompt (default 128)")
    p.add_argument("--policies", default="ondemand,expertflow")
    p.add_argument("--layers", type=int, default=None, help="cut the model to N layers (quick runs)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} unless given")
    p.add_argument("--warmup-prompt", type=int, default=64, help="warm-up request's prompt (0: none)")
    p.add_argument("--warmup-decode", type=int, default=4)
    p.add_argument("--host-blobs", type=int, default=32, help="distinct pinned host blobs")
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds after which cells are skipped (0: none)")
    p.add_argument("--json", default=None, help="write the JSON here too (rewritten after each cell)")
    a = p.parse_args(argv)
    if a.quick:
        a.layers = a.layers or QUICK["layers"]
        a.prompts = a.prompts or ",".join(map(str, QUICK["prompts"]))
        a.decode = QUICK["decode"] if a.decode is None else a.decode
    a.prompts = [int(x) for x in (a.prompts or "8,128,512,2048").split(",")]
    a.decode = 128 if a.decode is None else a.decode
    a.budgets = parse_budgets(a.budgets)
    a.policies = [x.strip() for x in a.policies.split(",") if x.strip()]
    bad = [x for x in a.policies if x not in KNOWN_POLICIES]
    if bad or "ondemand" not in a.policies:
        raise ConfigError(f"--policies must include ondemand (the baseline) and only {', '.join(KNOWN_POLICIES)}")
    if min(a.prompts) < 1 or a.decode < 1:
        raise ConfigError("--prompts and --decode must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)
    try:
        a = parse(argv)
        res = run(a, log)
    except EfError as e:
        log(f"error: {e}")
        return 2
    log(table(res))
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
