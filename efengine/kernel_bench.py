"""Kernel microbenchmarks of `efengine bench`: the decode GEMVs and the routed-expert kernels alone,
each timed as a CUDA graph of many launches (as a decode step launches them: one graph, programmatic
dependent launches where the GPU takes them), on weights too big to stay in L2.

Legend: N rows and K inputs of a matrix, I expert width, D hidden, A experts a token (pairs).
"""
from __future__ import annotations

import statistics

GEMV_CASES = [("q4", (14336, 4096), "f16"), ("q4", (4096, 14336), "f16"), ("q8", (4096, 4096), "f16"),
              ("f16", (14336, 4096), "f16"),
              ("q4", (14336, 4096), "int8"), ("q4", (4096, 14336), "int8"), ("q8", (4096, 4096), "int8")]
# routed experts of this shape (efconvert --list-shapes), stored type and group
MOE_CASE = ("mixtral-8x7b", "q4", 64)


def timed(fn, reps: int, stream=None, warmup: int = 2) -> float:
    """Median seconds of fn() measured with CUDA events on `stream`."""
    import cupy
    for _ in range(warmup):
        fn()
    s = stream or cupy.cuda.get_current_stream()
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    out = []
    for _ in range(reps):
        e0.record(s)
        fn()
        e1.record(s)
        e1.synchronize()
        out.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
    return statistics.median(out)


def graph_of(run, pdl: bool):
    """run()'s launches captured as one CUDA graph (after an eager warm-up), and its stream."""
    import cupy
    from .ops import gpu_kernels
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream, gpu_kernels.dependent_launches(pdl):
        run()
        stream.synchronize()
        stream.begin_capture()
        try:
            run()
        finally:
            graph = stream.end_capture()
    return graph, stream


def _graph_time(run, launches: int, pdl: bool) -> float:
    """Seconds a launch of run()'s graph of `launches` kernels."""
    graph, stream = graph_of(run, pdl)
    return timed(lambda: graph.launch(stream), 5, stream=stream) / launches


def gemv_bench(read_GBps: float) -> list[dict]:
    """GEMV kernels on matrices of expert shape (6 copies: none stays in L2), quantized ones with
    each activation format ("act"); 60 launches a graph."""
    import cupy
    from .ops import gpu_kernels
    from .ops import gpu_ops as ops
    from .ops.gpu_synth import fill_tensor
    from .ops.gpu_weights import GpuWeight
    from . import quant
    out = []
    pdl = gpu_kernels.pdl_supported()
    for qtype, (N, K), act in GEMV_CASES:
        copies = 6
        nb = quant.nbytes(qtype, (N, K), 64)
        Ws = []
        for i in range(copies):
            buf = cupy.empty(nb, dtype=cupy.uint8)
            fill_tensor(int(buf.data.ptr), qtype, (N, K), 64, 11 + i, (3.0 / K) ** 0.5)
            Ws.append(GpuWeight(qtype, (N, K), 64, buf))
        x = cupy.random.standard_normal((1, K), dtype=cupy.float32)
        prep = ops.XPrep(1, K, Ws[0].Kp, act)
        ops.rows_prep(x, K, prep=prep)
        y = cupy.empty((1, N), dtype=cupy.float32)
        descs = [ops.gemv_desc([(W, y, None, False)]) for W in Ws]
        reps = 10

        def run():
            for _ in range(reps):
                for W, d in zip(Ws, descs):
                    ops.gemv_launch(d, [W], 1, x, prep if W.quantized else None)
        t = _graph_time(run, reps * copies, pdl)
        gbps = nb / t / 1e9
        out.append({"type": qtype, "shape": [N, K], "bytes": nb, "us": t * 1e6, "GBps": gbps,
                    "frac_read_bw": gbps / read_GBps, "act": act, "pdl": pdl})
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def moe_bench(read_GBps: float, acts=("f16", "int8"), A: int = 2) -> list[dict]:
    """The routed-expert kernels of a decode step alone: gate+up (SiLU fused, writing the down
    projection's prep) and down, for A experts of Mixtral's shape read through the slot table,
    a different pair of experts each launch (8 in the pool: none stays in L2); 40 launches of one
    kernel a graph, then the two alternating as a decode step runs them."""
    import cupy
    import numpy as np
    from efconvert.shapes import shape_config
    from .ops import gpu_kernels
    from .ops import gpu_ops as ops
    from .ops.gpu_kernels import addr
    from .ops.gpu_synth import DeviceRandomSource
    from .ops.gpu_weights import ExpertLayout, ExpertPool
    from . import quant
    shape, qt, group = MOE_CASE
    _, cfg, _ = shape_config(shape, 1)
    src = DeviceRandomSource(cfg, experts=qt, group=group)
    E = cfg.n_experts
    pool = ExpertPool(ExpertLayout(src.expert_layout, src.blob_nbytes), E, cfg.n_layers, E)
    for e in range(E):
        src.fill_blob(pool.base + e * pool.stride, 0, e)
        pool.assign(0, e, e)
    nl = E // A
    ids = cupy.asarray(np.arange(nl * A, dtype=np.int32).reshape(nl, A))
    srcs = [ops.Experts(base=pool.base, stride=pool.stride, ids=ids[i], table=addr(pool.table), E=E, err=pool.err)
            for i in range(nl)]
    gate, up, down = (ops.Mat.of_part(pool.layout.parts[p]) for p in ("gate", "up", "down"))
    pdl = gpu_kernels.pdl_supported()
    I, D = gate.N, gate.K
    bytes_gu = A * 2 * quant.nbytes(qt, (I, D), group)
    bytes_d = A * quant.nbytes(qt, (D, I), group)
    x = cupy.random.standard_normal((1, D), dtype=cupy.float32)
    rw = cupy.full(A, 1.0 / A, dtype=cupy.float32)
    out = []
    for act in acts:
        prep = ops.XPrep(1, D, gate.Kp, act)
        ops.rows_prep(x, D, prep=prep)
        h = cupy.zeros((A, I), dtype=cupy.float32)
        hprep = ops.XPrep(A, I, max(down.Kp, ops.cdiv(I, 32) * 32), act)
        y = cupy.zeros((A, D), dtype=cupy.float32)
        reps = 40 // nl

        def gu():
            for _ in range(reps):
                for s in srcs:
                    ops.moe_gateup(s, gate, up, A, A, x, prep, h, hprep)

        def dn():
            for _ in range(reps):
                for s in srcs:
                    ops.moe_down(s, down, A, h, hprep, rw, y)

        def both():
            for _ in range(reps):
                for s in srcs:
                    ops.moe_gateup(s, gate, up, A, A, x, prep, h, hprep)
                    ops.moe_down(s, down, A, h, hprep, rw, y)
        n = reps * nl
        t_gu, t_d, t_both = _graph_time(gu, n, pdl), _graph_time(dn, n, pdl), _graph_time(both, n, pdl)
        pool.check()
        for kern, t, nb in (("gateup", t_gu, bytes_gu), ("down", t_d, bytes_d), ("gateup+down", t_both, bytes_gu + bytes_d)):
            gbps = nb / t / 1e9
            out.append({"kernel": kern, "type": qt, "I": I, "D": D, "A": A, "act": act, "bytes": nb,
                        "us": t * 1e6, "GBps": gbps, "frac_read_bw": gbps / read_GBps, "pdl": pdl})
    del pool
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def table_lines(res: dict) -> list[str]:
    lines = []
    for gv in res.get("gemv", []):
        x = f" ({gv.get('act', 'f16')} x)" if gv["type"] in ("q4", "q8") else ""
        lines.append(f"GEMV {gv['type']} {gv['shape'][0]}x{gv['shape'][1]}{x}: {gv['us']:.1f} us, "
                     f"{gv['GBps']:.0f} GB/s = {100 * gv['frac_read_bw']:.0f}% of read bandwidth")
    for m in res.get("moe_kernels", []):
        lines.append(f"MoE {m['kernel']} {m['A']} x {m['type']} {m['I']}x{m['D']} ({m['act']} x): {m['us']:.1f} us, "
                     f"{m['GBps']:.0f} GB/s = {100 * m['frac_read_bw']:.0f}% of read bandwidth")
    return lines
