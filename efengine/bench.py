"""`efengine bench`: resident speed of the cupy backend against ceilings measured in the same run.

    efengine bench [--models mixtral-8x7b:q4:q8,qwen1.5-moe-a2.7b:f16:f16] [--ef FILE.ef]
                   [--decode 256] [--context 128] [--prompt 512] [--layers N] [--json OUT]
                   [--act f16|int8|f16,int8]
    efengine bench --offload [--route-trace gsm8k_2] [--tokens 48] [--layers N] [--plot DIR]
                   (scenario O1, efengine/offload_gpu_bench.py; --plot: efengine/plot.py PNGs)
    efengine bench --host-bench GB      (host tiers -> GPU copy speed, efengine/host_bench.py)

Measured, in order: ceilings (device-to-device copy counting read + write, a read-only probe
kernel, pinned host -> GPU copies, an fp16 8192^3 matmul: H100 runs fp16 and bf16 at the same
tensor-core rate), kernel microbenchmarks (efengine/kernel_bench.py: quantized GEMVs with fp16 and
int8 activations, "act" in each entry, and the routed-expert kernels with each format of --act),
then per model: resident batch-1 greedy decode as a CUDA graph (DecodeGraph) for each activation
format of --act (the first one's numbers at the top level, all of them under "decode_by_act") and
a prefill through Model.forward (fp16 GEMMs whatever --act). Models are full-size synthetic ones
built directly on the GPU (gpu_synth.DeviceRandomSource: the shapes and stored types
`efconvert --random SHAPE --experts E --dense D` writes, random bytes; speed does not depend on
values) or a real .ef with --ef. Resident bound = bytes one decode step must read (weights it
touches + KV cache) / measured read bandwidth. JSON goes to stdout (or --json), a table to stderr.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np

from .errors import EfError
from .kernel_bench import gemv_bench, moe_bench, table_lines, timed as _timed

DEFAULT_MODELS = "mixtral-8x7b:q4:q8,qwen1.5-moe-a2.7b:f16:f16"


def _d2d() -> float:
    import cupy
    n = 1 << 30
    a = cupy.ones(n // 4, dtype=cupy.uint32)
    b = cupy.empty_like(a)
    return 2 * n / _timed(lambda: b.__setitem__(Ellipsis, a), 10)


def _read() -> float:
    import cupy
    from .ops.gpu_kernels import i64, launch
    big = cupy.full((4 << 30) // 4, 3, dtype=cupy.uint32)
    sink = cupy.zeros(1, dtype=cupy.uint32)
    n16 = big.nbytes // 16
    return big.nbytes / _timed(lambda: launch("misc", "read_probe", (132 * 8,), (512,), (big, i64(n16), sink)), 10)


def _h2d() -> float:
    import cupy
    n = 512 << 20
    host = np.frombuffer(cupy.cuda.alloc_pinned_memory(n), dtype=np.uint8, count=n)
    host[:] = 7
    dst = cupy.empty(n, dtype=cupy.uint8)
    return n / _timed(lambda: dst.set(host), 5)


def _matmul() -> float:
    import cupy
    m = 8192
    x = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    y = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    return 2 * m ** 3 / _timed(lambda: cupy.matmul(x, y), 10)


def ceilings() -> dict:
    import cupy
    out = {"d2d_GBps": _d2d() / 1e9, "read_GBps": _read() / 1e9, "h2d_pinned_GBps": _h2d() / 1e9,
           "matmul_f16_TFLOPs": _matmul() / 1e12}
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def _step_bytes(model, pool, pos: float) -> int:
    """Bytes one decode step reads: matrices it applies, A experts a MoE layer, 1-D weights, KV."""
    from .ops.gpu_weights import GpuWeight
    cfg = model.cfg
    total = model.lm_head.nbytes + cfg.hidden_size * 4
    for l, w in enumerate(model.layers):
        for v in w.values():
            if isinstance(v, GpuWeight):
                total += v.nbytes
            elif v is not None:
                total += int(v.nbytes)
        if cfg.is_moe_layer(l):
            total += cfg.top_k * sum(p_nbytes(p) for p in pool.layout.parts.values())
    kv = 2 * cfg.n_layers * (pos + 1) * cfg.n_kv_heads * cfg.head_dim * 4
    return int(total + kv)


def p_nbytes(p) -> int:
    from . import quant
    return quant.nbytes(p.qtype, p.shape, p.group)


def _active_params(model, pool) -> tuple[int, int]:
    """(weights a token multiplies in the layers, lm_head weights: applied to the last token only)."""
    from .ops.gpu_weights import GpuWeight
    cfg = model.cfg
    per_tok = 0
    for l, w in enumerate(model.layers):
        per_tok += sum(v.N * v.K for v in w.values() if isinstance(v, GpuWeight))
        if cfg.is_moe_layer(l):
            per_tok += cfg.top_k * sum(p.shape[0] * p.shape[1] for p in pool.layout.parts.values())
    return per_tok, model.lm_head.N * model.lm_head.K


def _breakdown(g, pos0: int, args, pool, step_bytes: int, step: float) -> dict:
    """Time of the step's parts: graphs of the same step without the routed experts, and without
    every matrix (wrong tokens, right kernels), subtracted from the whole step."""
    cfg = g.cfg
    parts = {}
    for key, skip in (("no_moe", {"moe"}), ("small_only", {"moe", "gemv"})):
        vg = g.variant(skip)

        def run_variant(vg=vg):
            g.start(1, pos0)
            for _ in range(args.decode):
                vg.launch(g.stream)
        parts[key] = _timed(run_variant, 3, stream=g.stream, warmup=1) / args.decode
    moe_bytes = len(cfg.moe_layers) * cfg.top_k * sum(p_nbytes(p) for p in pool.layout.parts.values())
    kv_bytes = 2 * cfg.n_layers * (pos0 + args.decode / 2 + 1) * cfg.n_kv_heads * cfg.head_dim * 4
    dense_bytes = step_bytes - moe_bytes - kv_bytes
    t_moe, t_dense = step - parts["no_moe"], parts["no_moe"] - parts["small_only"]
    return {"decode_breakdown_ms": {"routed_experts": 1e3 * t_moe, "dense_matrices": 1e3 * t_dense,
                                    "norms_attention_routing_rest": 1e3 * parts["small_only"]},
            "decode_breakdown_GBps": {"routed_experts": moe_bytes / max(1e-9, t_moe) / 1e9,
                                      "dense_matrices": dense_bytes / max(1e-9, t_dense) / 1e9}}


def _decode_bench(model, pool, cache, pos0: int, act: str, args, ceil: dict) -> dict:
    """Resident greedy decode from position pos0 as one CUDA graph with activations `act`."""
    from .ops import gpu_kernels
    from .ops.gpu_decode import DecodeGraph
    g = DecodeGraph(model, pool, cache, act=act)
    n0 = gpu_kernels.LAUNCHES[0]
    g.capture()
    r = {"kernels_per_step": (gpu_kernels.LAUNCHES[0] - n0) // 2,     # warm-up step + captured step
         "pdl": g.pdl}

    def decode():
        g.start(1, pos0)
        g.replay(args.decode)
    t = _timed(decode, 3, stream=g.stream, warmup=1)
    pool.check()
    r["decode_tok_s"] = args.decode / t
    r["decode_ms_per_token"] = 1e3 * t / args.decode
    r["bytes_per_step"] = _step_bytes(model, pool, pos0 + args.decode / 2)
    r.update(_breakdown(g, pos0, args, pool, r["bytes_per_step"], t / args.decode))
    r["resident_bound_tok_s"] = ceil["read_GBps"] * 1e9 / r["bytes_per_step"]
    r["frac_resident_bound"] = r["decode_tok_s"] / r["resident_bound_tok_s"]
    return r


def model_bench(name: str, experts: str, dense: str, args, ceil: dict, log) -> dict:
    import cupy
    from .model import Model
    from .ops.gpu_weights import ExpertPool, PoolExperts
    t0 = time.perf_counter()
    if name.endswith(".ef"):
        from .format import EfFile
        src = EfFile(name)
        pool = ExpertPool.resident(src)
        kind = "file"
    else:
        from efconvert.shapes import shape_config
        from .ops.gpu_synth import DeviceRandomSource
        _, cfg, _ = shape_config(name, args.layers)
        src = DeviceRandomSource(cfg, experts=experts, dense=dense, group=args.group)
        pool = src.pool()
        kind = "synthetic (random stored bytes made on the GPU)"
    from .ops.cupy_backend import CupyBackend
    acts = args.act
    model = Model(src, CupyBackend(act=acts[0]), experts=PoolExperts(pool))
    cfg = model.cfg
    cupy.cuda.Device().synchronize()
    r = {"model": name, "experts": experts, "dense": dense, "group": args.group, "weights": kind,
         "layers": cfg.n_layers, "build_s": time.perf_counter() - t0, "act": acts[0]}
    log(f"{name}: built in {r['build_s']:.1f} s")
    P = args.context + args.decode + 8
    rng = np.random.default_rng(0)
    cache = model.new_cache(max(P, args.prompt + 1))
    model.forward(rng.integers(0, cfg.vocab_size, args.context), cache, last_only=True)
    pos0 = cache.pos
    r["decode_by_act"] = {}
    for act in acts:
        d = _decode_bench(model, pool, cache, pos0, act, args, ceil)
        r["decode_by_act"][act] = d
        log(f"{name}: decode ({act} activations) {d['decode_tok_s']:.1f} tok/s "
            f"({100 * d['frac_resident_bound']:.1f}% of bound)")
    r.update(r["decode_by_act"][acts[0]])
    if args.prompt:
        prompt = rng.integers(0, cfg.vocab_size, args.prompt)

        def prefill():
            cache.reset()
            model.forward(prompt, cache, last_only=True)
        tp = _timed(prefill, 3, warmup=1)
        per_tok, lm = _active_params(model, pool)
        T = args.prompt
        attn = 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T * (T + 1) / 2
        flops = 2 * per_tok * T + 2 * lm + attn
        r["prefill_tokens"] = T
        r["prefill_tok_s"] = T / tp
        r["prefill_TFLOPs"] = flops / tp / 1e12
        r["frac_matmul_rate"] = r["prefill_TFLOPs"] / ceil["matmul_f16_TFLOPs"]
        log(f"{name}: prefill {T} tokens {r['prefill_tok_s']:.0f} tok/s ({r['prefill_TFLOPs']:.0f} TFLOP/s)")
    return r


def table(res: dict) -> str:
    c = res["ceilings"]
    lines = [f"device: {res['device']}",
             f"ceilings: D2D {c['d2d_GBps']:.0f} GB/s (read+write), read {c['read_GBps']:.0f} GB/s, "
             f"pinned H2D {c['h2d_pinned_GBps']:.1f} GB/s, fp16 matmul {c['matmul_f16_TFLOPs']:.0f} TFLOP/s"]
    lines += table_lines(res)
    hdr = f"{'model':30} {'decode tok/s':>12} {'% bound':>8} {'bound':>8} {'prefill tok/s':>14} {'% matmul':>9}"
    lines += [hdr, "-" * len(hdr)]
    for m in res.get("models", []):
        for act, d in m.get("decode_by_act", {m.get("act", "f16"): m}).items():
            lines.append(f"{m['model'] + ' ' + m['experts'] + '/' + m['dense'] + ' ' + act:30} "
                         f"{d['decode_tok_s']:12.1f} {100 * d['frac_resident_bound']:8.1f} "
                         f"{d['resident_bound_tok_s']:8.1f} {m.get('prefill_tok_s', float('nan')):14.0f} "
                         f"{100 * m.get('frac_matmul_rate', float('nan')):9.1f}")
    for m in res.get("models", []):
        for act, d in m.get("decode_by_act", {m.get("act", "f16"): m}).items():
            lines += _breakdown_line(m["model"], act, d)
    return "\n".join(lines)


def _breakdown_line(model: str, act: str, m: dict) -> list[str]:
    """The step's time by part of one decode measurement (empty without a breakdown)."""
    b, gb = m.get("decode_breakdown_ms"), m.get("decode_breakdown_GBps")
    if not b:
        return []
    return [f"  {model} ({act} x) step {m['decode_ms_per_token']:.2f} ms: routed experts {b['routed_experts']:.2f} ms "
            f"({gb['routed_experts']:.0f} GB/s), dense matrices {b['dense_matrices']:.2f} ms "
            f"({gb['dense_matrices']:.0f} GB/s), the rest {b['norms_attention_routing_rest']:.2f} ms "
            f"({m['kernels_per_step']} kernels a step)"]


def _acts(text: str) -> list[str]:
    from .ops.act_int8 import ACTS
    acts = [a for a in text.split(",") if a]
    if not acts or any(a not in ACTS for a in acts) or len(set(acts)) < len(acts):
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(ACTS)}, got {text!r}")
    return acts


def parse(args: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="efengine bench", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma list of SHAPE:EXPERTS:DENSE (efconvert --list-shapes) or FILE.ef")
    p.add_argument("--ef", action="append", default=[], help="also bench this .ef file (all experts resident)")
    p.add_argument("--decode", type=int, default=256, help="decode steps timed (default 256)")
    p.add_argument("--context", type=int, default=128, help="prompt before the timed decode (default 128)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length timed; 0 skips (default 512)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers of synthetic shapes")
    p.add_argument("--group", type=int, default=64, help="quantization group of synthetic models (default 64)")
    p.add_argument("--no-gemv", action="store_true", help="skip the kernel microbenchmarks (GEMV, routed experts)")
    p.add_argument("--act", type=_acts, default=["f16"], metavar="f16|int8|f16,int8",
                   help="activation formats of the quantized decode kernels to time decode with (default f16)")
    p.add_argument("--json", metavar="OUT", help="write the JSON here instead of stdout")
    p.add_argument("--plot", metavar="DIR", help="--offload: draw policies.png and timelines there (needs matplotlib)")
    p.add_argument("--host-bench", type=float, metavar="GB", help="only measure host tier -> GPU copies "
                   "(pinned tier, threaded staging, registered mapping) on a temp file of GB gigabytes")
    from .offload_gpu_bench import add_args
    add_args(p)
    return p.parse_args(args)


def main(args: list[str]) -> int:
    a = parse(args)
    from .ops import cupy_available
    if not cupy_available():
        print("efengine bench needs CuPy and a CUDA GPU", file=sys.stderr)
        return 2
    import cupy

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
    try:
        props = cupy.cuda.runtime.getDeviceProperties(0)
        res = {"device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
               "cupy": cupy.__version__}
        if a.host_bench:                # host tiers (efengine/host_bench.py)
            from . import host_bench
            res["host_tiers"] = host_bench.run(a.host_bench, log=log)
            return _emit(res, a)
        if a.offload:                   # scenario O1 (efengine/offload_gpu_bench.py)
            from . import offload_gpu_bench
            if a.plot:
                from . import plot
                plot.check()            # before a long run, not after it
            res["offload"] = offload_gpu_bench.main(a, log)
            _emit(res, a)
            if a.plot:
                for f in plot.plot_result(res, a.plot):
                    log(f"wrote {f}")
            return 0
        res["ceilings"] = ceilings()
        log(table({**res, "models": []}))
        if not a.no_gemv:
            res["gemv"] = gemv_bench(res["ceilings"]["read_GBps"])
            res["moe_kernels"] = moe_bench(res["ceilings"]["read_GBps"], a.act)
        res["models"] = []
        specs = [s for s in a.models.split(",") if s] + [f"{f}::" for f in a.ef]
        for spec in specs:
            name, experts, dense = (spec.split(":") + ["q4", "q8"])[:3]
            res["models"].append(model_bench(name, experts, dense, a, res["ceilings"], log))
            gc.collect()
            cupy.get_default_memory_pool().free_all_blocks()     # the model is gone: reuse its memory
    except EfError as e:
        print(f"efengine bench: {e}", file=sys.stderr)
        return 1
    _emit(res, a)
    log(table(res))
    return 0


def _emit(res: dict, a) -> int:
    text = json.dumps(res, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
