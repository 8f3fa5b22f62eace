"""Prefill of the routed experts of one layer: two grouped tensor-core GEMM launches for all of its
experts (kernels/moe_gemm.cu) instead of a Python loop of dequantize + cuBLAS per expert.

Legend: T tokens, A active experts per token, P = T*A (token, rank) pairs, D hidden, I expert
width, BM pairs a tile, K / Kp a matrix's inputs / inputs padded to whole groups.

moe_prefill(x [T, D] f32, ids [T, A] host int, handles {e: ExpertHandle}) -> y [P, D] f32 where
row t*A + a is expert ids[t, a] applied to x[t] (unweighted: Model._moe combines in rank order).
  1. pairs grouped by expert: on the host (stable argsort; one small upload of the tables), or, in
     moe_prefill_device (ids on the device, every expert of the layer resident), by one small
     kernel (mg_plan), so a resident prefill never waits for the host between layers;
  2. x -> fp16 rows scaled by powers of two (gpu_dense_prefill.rows16; a caller may pass them
     made already), gathered by the kernel;
  3. mg_gateup: h [P, I] = silu(gate x) * up x in sorted pair order (float32);
  4. h -> fp16 rows (to_f16_rows again: h's range is not known before it exists);
  5. mg_down: y[slot of pair p] = down h[p]; every element written once, no atomics.
Weights stay in their stored type (q4 / q8 with any FAST_GROUPS group, f16, bf16) and are widened
in shared memory. grouped_ok() says when the kernels apply; the backend loops otherwise.

`python -m efengine.ops.gpu_prefill --check --bench` (on a GPU) checks the kernels against numpy
and times the Mixtral-8x7B layer shape against cupy.matmul fp16 in the same run (JSON).
"""
from __future__ import annotations

import numpy as np

from .. import quant
from ..errors import ConfigError
from . import gpu_kernels
from .gpu_dense_prefill import Rows16, rows16
from .gpu_kernels import cdiv, cupy, i32, launch, ptr
from .gpu_weights import ExpertHandle, ExpertLayout, PartPlace

MODULE = "moe_gemm"
gpu_kernels.MODULES.setdefault(MODULE, ("common.cuh", "moe_gemm.cu"))
BM, BN, LDS = 64, 128, 72                      # BM: rows of the default tile; MG_BN, MG_LDS in moe_gemm.cu
BM_BIG = 128                                   # the _m128 kernels' tiles (8 warps, 2 threads a row)
BM_HUGE = 256                                  # the _m256 kernels' tiles (16 warps, one block an SM)
# tile rows -> (kernel name suffix, threads a block); every variant computes each row the same way
TILES = {BM: ("", 128), BM_BIG: ("_m128", 256), BM_HUGE: ("_m256", 512)}


def smem(bm: int) -> int:
    """Two stages of A [bm, LDS] and B [BN, LDS] fp16."""
    return 2 * (bm + BN) * LDS * 2


def tile_rows(pairs: int, experts: int) -> int:
    """128-row tiles once experts average 96+ pairs (a widened weight tile then serves twice the
    rows), else 64 (fewer idle warps on small experts). Rows are computed independently of their
    tile, so the choice never changes a bit of the result."""
    return BM_BIG if pairs >= 96 * max(experts, 1) else BM
KINDS = ("q4", "q8", "f16", "bf16")


def plan(ids: np.ndarray, bm: int = BM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [T, A] -> (order [P] int32: pair slots t*A + a sorted by expert, stably;
    experts [n] the distinct ids; tiles [n_tiles, 4] int32: (expert index, first sorted pair,
    rows <= bm, 0)). Experts without pairs get no tile."""
    flat = np.asarray(ids).reshape(-1)
    order = np.argsort(flat, kind="stable").astype(np.int32)
    experts, starts, counts = np.unique(flat[order], return_index=True, return_counts=True)
    tiles = [(i, s + m0, min(bm, c - m0), 0)
             for i, (s, c) in enumerate(zip(starts.tolist(), counts.tolist())) for m0 in range(0, c, bm)]
    return order, experts, np.array(tiles, dtype=np.int32).reshape(-1, 4)


def _part_ok(p: PartPlace) -> bool:
    if p.qtype not in KINDS:
        return False
    if p.qtype in quant.QUANT_TYPES:     # 16-byte chunks of one group; group a power of two
        return p.group >= 32 and p.group & (p.group - 1) == 0
    return p.shape[1] % 8 == 0           # float rows in 16-byte chunks


def grouped_ok(handles: dict) -> bool:
    """Whether moe_prefill's kernels take these experts (one layout, supported types, aligned)."""
    hs = list(handles.values())
    if not hs or not all(isinstance(h, ExpertHandle) for h in hs):
        return False
    lay = hs[0].layout
    if any(h.layout is not lay and h.layout.parts != lay.parts for h in hs):
        return False
    return all(_part_ok(p) for p in lay.parts.values()) and all(h.base % 16 == 0 for h in hs)


def _gsh(p: PartPlace) -> int:
    return p.group.bit_length() - 1 if p.qtype in quant.QUANT_TYPES else 0


def _rows16(x):
    """x [T, K] f32 (or its Rows16) -> (fp16 rows [T, K8] with K8 = K rounded up to 8, zero padded;
    1/scale [T]), gpu_dense_prefill.rows16."""
    r = x if isinstance(x, Rows16) else rows16(x)
    return r.x16, r.inv


def _wtab(handles: dict, experts, parts: tuple) -> np.ndarray:
    """u64 [n, 3 * len(parts)]: q, s, m addresses of each part of each expert (unused ones = base)."""
    rows = []
    for e in experts.tolist():
        h = handles[e]
        rows.append([h.base + getattr(h.layout.parts[p], f) for p in parts for f in ("q", "s", "m")])
    return np.array(rows, dtype=np.uint64)


def moe_prefill(x, ids: np.ndarray, handles: dict, marks: list | None = None, bm: int | None = None):
    """y [T*A, D] f32: row t*A + a = expert ids[t, a] on x[t]. x [T, D] f32 device; ids host.
    marks: a list to which CUDA events are appended after the tables, gate/up and down stages;
    bm: rows a tile (a key of TILES; default tile_rows)."""
    ids = np.asarray(ids)
    T, D = x.shape
    A = ids.shape[1]
    if ids.shape[0] != T:
        raise ConfigError(f"moe_prefill: ids has {ids.shape[0]} rows for {T} tokens")
    order, experts, tiles = plan(ids)
    lost = [int(e) for e in experts if int(e) not in handles]
    if lost:
        raise ConfigError(f"moe_prefill: no handle for experts {lost}")
    sel = {int(e): handles[int(e)] for e in experts}
    lay = _layout(sel, D)
    P = T * A
    bm = tile_rows(P, len(experts)) if bm is None else bm
    if bm != BM:
        order, experts, tiles = plan(ids, bm)
    tabs = cupy.asarray(np.concatenate([order // A, order, tiles.reshape(-1)]).astype(np.int32))
    wgu, wdn = weight_tables(sel)
    _mark(marks)
    return _gemms(x, tabs[:P], tabs[P:2 * P], tabs[2 * P:], tiles.shape[0], bm, wgu, wdn, lay, marks)


def moe_prefill_device(x, ids, handles: dict, tables: tuple | None = None, marks: list | None = None,
                       bm: int | None = None, checked: ExpertLayout | None = None):
    """moe_prefill with the routing on the device: ids [T, A] int32 device array, handles = every
    expert of the layer {0..E-1: ExpertHandle} (all resident), so nothing is read back to the host
    and the host can queue the following work at once. x [T, D] f32 or its Rows16 (gpu_dense_prefill).
    tables = weight_tables(handles) and checked = checked_layout(handles, D), made once by a caller
    that reuses them (checked skips the per-call checks of handles). Same products as moe_prefill,
    row by row."""
    T, D = x.shape
    A = ids.shape[1]
    E = len(handles)
    if ids.shape[0] != T:
        raise ConfigError(f"moe_prefill_device: ids {ids.shape} for {T} tokens")
    lay = checked if checked is not None else checked_layout(handles, D)
    P = T * A
    bm = tile_rows(P, E) if bm is None else bm
    n_max = cdiv(P, bm) + E                    # each expert adds at most one partial tile
    tabs = cupy.empty(2 * P + 4 * n_max, dtype=cupy.int32)
    ids = cupy.ascontiguousarray(cupy.asarray(ids, dtype=cupy.int32))
    launch(MODULE, "mg_plan", (1,), (1024,), (ids, i32(P), i32(A), i32(E), i32(bm), tabs[:P], tabs[P:2 * P],
                                              tabs[2 * P:], i32(n_max)), shared=8 * E)
    wgu, wdn = tables if tables is not None else weight_tables({e: handles[e] for e in range(E)})
    _mark(marks)
    return _gemms(x, tabs[:P], tabs[P:2 * P], tabs[2 * P:], n_max, bm, wgu, wdn, lay, marks)


def checked_layout(handles: dict, D: int) -> ExpertLayout:
    """The layout of handles = every expert of a layer {0..E-1: ExpertHandle}, after checking that
    moe_prefill_device's kernels take them on rows of D (ConfigError otherwise)."""
    if sorted(handles) != list(range(len(handles))):
        raise ConfigError("moe_prefill_device: handles must be experts 0..E-1")
    return _layout(handles, D)


def _layout(handles: dict, D: int) -> ExpertLayout:
    if not grouped_ok(handles):
        raise ConfigError("moe_prefill: these experts' layout is not one the grouped kernels take")
    lay: ExpertLayout = next(iter(handles.values())).layout
    g, d = lay.parts["gate"], lay.parts["down"]
    if g.shape[1] != D or d.shape != (D, g.shape[0]):
        raise ConfigError(f"moe_prefill: x has {D} columns, experts are gate {g.shape}, down {d.shape}")
    return lay


def weight_tables(handles: dict) -> tuple:
    """Device u64 tables of the experts' part addresses, in the order of handles' keys (the
    expert index of a tile): gate+up [n, 6] and down [n, 3] (q, s, m each)."""
    experts = np.array(list(handles), dtype=np.int64)
    wt = cupy.asarray(np.concatenate([_wtab(handles, experts, ("gate", "up")).reshape(-1),
                                      _wtab(handles, experts, ("down",)).reshape(-1)]))
    return wt[:6 * len(experts)], wt[6 * len(experts):]


def _gemms(x, arow, slots, tl, n_tiles: int, bm: int, wgu, wdn, lay: ExpertLayout, marks):
    """The two grouped launches over tiles tl [n_tiles, 4] of bm rows -> y [P, D] in (token, rank) slots."""
    sfx, threads = TILES[bm]
    g, d = lay.parts["gate"], lay.parts["down"]
    I, D, P = g.shape[0], g.shape[1], slots.shape[0]
    x16, xinv = _rows16(x)
    ldh = cdiv(I, 8) * 8
    h = cupy.empty((P, ldh), dtype=cupy.float32)
    launch(MODULE, f"mg_gateup_{g.qtype}{sfx}", (n_tiles, cdiv(ldh, BN // 2)), (threads,),
           (tl, wgu, x16, i32(x16.shape[1]), i32(x16.shape[1]), arow, xinv, i32(I), i32(D), i32(g.Kp),
            i32(_gsh(g)), h, i32(ldh), ptr(None)), shared=smem(bm))
    _mark(marks)
    h16, hinv = _rows16(h)
    y = cupy.empty((P, D), dtype=cupy.float32)
    launch(MODULE, f"mg_down_{d.qtype}{sfx}", (n_tiles, cdiv(D, BN)), (threads,),
           (tl, wdn, h16, i32(ldh), i32(ldh), ptr(None), hinv, i32(D), i32(I), i32(d.Kp), i32(_gsh(d)),
            y, i32(D), slots), shared=smem(bm))
    _mark(marks)
    return y


def _mark(marks: list | None) -> None:
    if marks is not None:
        ev = cupy.cuda.Event()
        ev.record()
        marks.append(ev)


# ---- numpy twin, check and bench (run on a GPU: python -m efengine.ops.gpu_prefill) ----------

def reference(x: np.ndarray, ids: np.ndarray, weights: dict) -> np.ndarray:
    """Numpy twin of moe_prefill: y [T*A, D] float64, weights {e: {gate, up, down} float32}."""
    from .gpu_ref import expert_ffn_ref
    T, A = ids.shape
    y = np.zeros((T * A, x.shape[1]))
    for e in np.unique(ids).tolist():
        slots = np.flatnonzero(ids.reshape(-1) == e)
        y[slots] = expert_ffn_ref(x[slots // A], weights[e])
    return y


def random_experts(rng, E: int, D: int, I: int, qtype: str, group: int, dtype=None):
    """E random experts as host blobs (.ef layout) -> (ExpertLayout, host blobs [E, nbytes], weights)."""
    from ..format import expert_layout
    from .gpu_ref import blob_weights
    qd = dtype or qtype
    specs = {"gate": (qtype, (I, D), group), "up": (qtype, (I, D), group), "down": (qd, (D, I), group)}
    places, nbytes = expert_layout(specs)
    blobs = np.zeros((E, nbytes), dtype=np.uint8)
    for e in range(E):
        for p, t in places.items():
            w = rng.standard_normal(t.shape).astype(np.float32) / np.sqrt(t.shape[1])
            blobs[e, t.offset:t.offset + t.nbytes] = quant.quantize(w, t.type, t.group)
    return ExpertLayout(places, nbytes), blobs, [blob_weights(b, places) for b in blobs]


def check_case(rng, T: int, A: int, E: int, D: int, I: int, qtype: str, group: int = 64,
               down: str | None = None) -> dict:
    """moe_prefill vs reference on random experts; expert E-1 gets no token, E-2 exactly one."""
    if E < 3 or A > E - 2:
        raise ConfigError("check_case needs E >= 3 and A <= E - 2")
    lay, blobs, weights = random_experts(rng, E, D, I, qtype, group, down)
    ids = np.stack([rng.permutation(E - 2)[:A] for _ in range(T)]).astype(np.int32)
    ids[0, 0] = E - 2
    x = rng.standard_normal((T, D)).astype(np.float32)
    x[-1] *= 1e3                           # rows far apart in scale: per-row fp16 scaling
    dev = cupy.asarray(blobs)
    handles = {e: ExpertHandle(int(dev[e].data.ptr), lay, dev) for e in range(E)}
    ok = grouped_ok(handles)
    got = cupy.asnumpy(moe_prefill(cupy.asarray(x), ids, handles)) if ok else None
    ref = reference(x, ids, weights)
    out = {"qtype": qtype, "down": down or qtype, "T": T, "A": A, "E": E, "D": D, "I": I, "group": group,
           "grouped": ok}
    if got is not None:      # the device-made plan: the same products, bit for bit
        dev_y = moe_prefill_device(cupy.asarray(x), cupy.asarray(ids), handles)
        out["device_plan_equal"] = bool(np.array_equal(cupy.asnumpy(dev_y), got))
        out["tile_rows_equal"] = all(                                 # 64 vs 128 / 256-row tiles
            np.array_equal(cupy.asnumpy(moe_prefill(cupy.asarray(x), ids, handles, bm=b)), got)
            for b in (BM_BIG, BM_HUGE))
        err = np.abs(got - ref)
        out["rel_rms"] = quant.rel_rms(ref, got)
        out["max_rel"] = float(err.max() / np.abs(ref).max())
        out["finite"] = bool(np.isfinite(got).all())
    return out


def _timed(fn, reps: int = 10) -> float:
    import statistics
    fn()
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    out = []
    for _ in range(reps):
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        out.append(cupy.cuda.get_elapsed_time(e0, e1) / 1e3)
    return statistics.median(out)


def bench(T: int = 512, A: int = 2, E: int = 8, D: int = 4096, I: int = 14336, qtype: str = "q4",
          group: int = 64, seed: int = 0) -> dict:
    """Time moe_prefill on one layer of random experts (stored bytes made on the device) against
    cupy.matmul fp16 8192^3 in the same run."""
    from ..format import expert_layout
    from .gpu_synth import fill_tensor
    specs = {p: (qtype, s, group) for p, s in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I)))}
    places, nbytes = expert_layout(specs)
    lay = ExpertLayout(places, nbytes)
    blobs = cupy.empty((E, nbytes), dtype=cupy.uint8)
    for e in range(E):
        for i, (p, t) in enumerate(places.items()):
            fill_tensor(int(blobs[e].data.ptr) + t.offset, t.type, t.shape, t.group, seed + 7 * e + i,
                        1.0 / np.sqrt(t.shape[1]))
    handles = {e: ExpertHandle(int(blobs[e].data.ptr), lay, blobs) for e in range(E)}
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(E)[:A] for _ in range(T)]).astype(np.int32)
    x = cupy.asarray(rng.standard_normal((T, D)).astype(np.float32))
    t = _timed(lambda: moe_prefill(x, ids, handles))
    ids_d, tables = cupy.asarray(ids), weight_tables(handles)
    t_dev = _timed(lambda: moe_prefill_device(x, ids_d, handles, tables))
    by_rows = {bm: 1e3 * _timed(lambda: moe_prefill_device(x, ids_d, handles, tables, bm=bm)) for bm in TILES}
    marks: list = []
    e0 = cupy.cuda.Event()
    e0.record()
    moe_prefill(x, ids, handles, marks)
    marks[-1].synchronize()
    stage = [cupy.cuda.get_elapsed_time(a, b) for a, b in zip([e0] + marks[:-1], marks)]
    m = 8192
    a16 = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    b16 = cupy.random.standard_normal((m, m), dtype=cupy.float32).astype(cupy.float16)
    tm = _timed(lambda: cupy.matmul(a16, b16))
    flops = 2.0 * T * A * 3 * D * I
    counts = np.bincount(ids.reshape(-1), minlength=E)
    rate = 2 * m ** 3 / tm
    return {"T": T, "A": A, "E": E, "D": D, "I": I, "qtype": qtype, "group": group,
            "pairs_per_expert": counts.tolist(), "tiles": int(plan(ids)[2].shape[0]), "layer_ms": 1e3 * t,
            "layer_ms_device_plan": 1e3 * t_dev, "layer_ms_device_plan_by_tile_rows": by_rows,
            "tile_rows": tile_rows(T * A, E),
            "stage_ms": dict(zip(("tables", "x16+gateup", "h16+down"), stage)), "TFLOPs": flops / t / 1e12,
            "TFLOPs_device_plan": flops / t_dev / 1e12,
            "matmul_f16_TFLOPs": rate / 1e12, "frac_matmul": flops / t / rate, "weight_GBps": E * nbytes / t / 1e9,
            "device": cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()}


SHAPES = {"mixtral-8x7b": dict(A=2, E=8, D=4096, I=14336), "qwen1.5-moe-a2.7b": dict(A=4, E=60, D=2048, I=1408)}
CHECKS = [  # (T, A, E, D, I, qtype, group, down)
    (150, 2, 6, 264, 200, "q4", 64, None), (1, 2, 4, 96, 64, "q4", 32, None), (70, 2, 6, 100, 136, "q4", 32, "q8"),
    (90, 3, 7, 256, 328, "q8", 128, None), (40, 2, 5, 64, 72, "f16", 64, None), (40, 2, 5, 64, 72, "bf16", 64, None),
    (77, 2, 6, 520, 1000, "q4", 256, "f16")]


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with numpy on random inputs")
    ap.add_argument("--bench", action="store_true", help="time the Mixtral-8x7B layer shape")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mixtral-8x7b")
    ap.add_argument("--qtype", default="q4", help="expert weight type (q4, q8, f16, bf16)")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=512)
    a = ap.parse_args(argv)
    res: dict = {}
    if a.check:
        rng = np.random.default_rng()
        res["check"] = [check_case(rng, *c) for c in CHECKS]
        res["max_rel_rms"] = max(c.get("rel_rms", 0.0) for c in res["check"])
        res["check_ok"] = all(c["grouped"] and c["finite"] and c["rel_rms"] < 1e-2 and c["device_plan_equal"]
                              and c["tile_rows_equal"] for c in res["check"])
    if a.bench:
        res["bench"] = bench(T=a.tokens, qtype=a.qtype, group=a.group, **SHAPES[a.shape])
    print(json.dumps(res, indent=1))
    return 0 if res.get("check_ok", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
