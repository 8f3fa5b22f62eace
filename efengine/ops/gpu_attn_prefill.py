"""Causal attention of a prefill step through strided batched fp32 GEMMs (cuBLAS, called directly
on the k / v views: no copies of the cache) and one fused mask + softmax kernel (kernels/attn_prefill.cu).

Legend: T tokens of the step, H query heads, G kv heads, R = H / G query heads a kv head (GQA),
dq / dv query-key / value head dims, S keys (cached positions 0 .. S-1; the model passes
S = pos0 + T), Tb tokens of a query block [t0, t1), M = R * Tb score rows a kv head in a block,
Sb = min(S, pos0 + t1) keys the block's queries can see.

attention_prefill(q [T, H, dq], k [S, G, dq], v [S, G, dv], pos0, scale) -> out [T, H, dv] float32,
the same causal softmax attention as NumpyBackend.attention (query t at absolute position
pos0 + t sees keys 0 .. pos0 + t; query head h reads kv head h // R). For each block of Tb query
tokens (Tb keeps H * Tb * S fp32 scores under score_bytes), with Q_g the [M, dq] query rows of kv
head g, row tl * R + r = query t0 + tl of head g * R + r:
  1. scores [G, M, Sb]: scores[g] = Q_g @ k[:Sb, g].T, one GEMM batched over g (k read in place).
     R = 1 (MHA, MLA): Q_g is q[t0:t1, g] in place; R > 1: Q_g is a copy qb [G, Tb, R, dq] (the
     R heads of a token are adjacent in q, but a token's rows are H heads apart, so no single
     leading dimension spans them);
  2. attn_softmax_*: in place, row-wise: x = s * scale, keys after the row's position masked
     (exactly 0), max, exp, sum, divide: one launch;
  3. O_g = scores[g] @ v[:Sb, g] (v in place), written straight into out[t0:t1] for R = 1, else
     into ob [G, Tb, R, dv] and copied into out.
Keys past pos0 + t1 are cut from a block (Sb): no later block's query needs fewer keys, so with
several blocks the causal triangle's empty corner is partly skipped.

Numerics: fp32 operands, fp32 accumulation (CUBLAS_COMPUTE_32F: no TF32), the numpy reference's
operation order (scale after the dot product, max subtracted, division by the sum); only
summation orders differ.

Cost (H100, T = 512, pos0 = 0, GPU time a layer): Mixtral's heads (R = 4) 174 us when k and v
were regrouped by copies too (the two GEMMs 57 + 51 us, softmax 24 us, copies ~36 us); Qwen1.5-
MoE's (R = 1) 113 -> 80 us without any copy. The host spends ~50 us in each cuBLAS call there;
`python -m efengine.ops.gpu_attn_prefill` (on a GPU) times this path against the fused decode
kernel (JSON lines).

Why not always: for short steps (decode) the fused kernel of gpu_ops.attention reads k and v once
and launches once, while this path launches three or more kernels a block and needs a score
buffer; see MIN_T.
"""
from __future__ import annotations

from ..errors import ConfigError
from . import gpu_dense_prefill as dense
from . import gpu_kernels
from .gpu_kernels import cdiv, cupy, f32, i32, i64, launch

MODULE = "attn_prefill"
gpu_kernels.MODULES.setdefault(MODULE, ("common.cuh", "attn_prefill.cu"))

# Steps of at least MIN_T tokens take this path (CupyBackend.attention). Measured on an H100 (GPU
# time a call, us, this path / gpu_ops.attention): Mixtral's heads (H 32, G 8, d 128) at pos0 = 0:
# T 64: 27 / 19, T 96: 33 / 31, T 128: 39 / 40, T 256: 67 / 120, T 512: 174 / 321; after a cached
# prefix the fused kernel's cost grows with T * S and this path wins earlier (T 64, pos0 960: 81 /
# 147); MLA without GQA (H = G = 16, dq 192, dv 128) at T 64, pos0 0: 29 / 52. So 64: a first
# chunk of 64..~110 tokens with GQA loses <= 9 us a layer, every other long step gains.
MIN_T = 64
SCORE_BYTES = 256 * 1024 * 1024     # bound on a block's fp32 score buffer [G, M, Sb]
WARPS = 8                           # rows a block of the softmax kernel (APF_WARPS in the .cu)
PER = (8, 16, 32, 64)               # register-resident variants: rows of up to 32 * PER keys


def softmax_kernel(S: int) -> str:
    """Name of the softmax variant for rows of S keys."""
    for per in PER:
        if S <= 32 * per:
            return f"attn_softmax_p{per}"
    return "attn_softmax_any"


def blocks(T: int, H: int, S: int, pos0: int, score_bytes: int = SCORE_BYTES) -> list[tuple[int, int, int]]:
    """Query blocks (t0, t1, Sb): equal runs of Tb tokens (the last one shorter) with
    H * Tb * S * 4 <= score_bytes (at least one token a block), Sb = min(S, pos0 + t1)."""
    tb = max(1, min(T, score_bytes // (4 * H * S)))
    return [(t0, min(T, t0 + tb), min(S, pos0 + min(T, t0 + tb))) for t0 in range(0, T, tb)]


def masked_softmax_(scores, R: int, qpos0: int, scale: float) -> None:
    """In place on scores [G, M, Sb] (float32, contiguous; row i of a group is query (i // R,
    i % R) at absolute position qpos0 + i // R): s -> softmax over keys j <= position of s * scale,
    masked keys 0."""
    G, M, Sb = scores.shape
    if scores.dtype != cupy.float32 or not scores.flags.c_contiguous or M % R:
        raise ConfigError(f"masked_softmax_: scores must be contiguous float32 [G, R*Tb, S], "
                          f"got {scores.dtype} {scores.shape} with R = {R}")
    rows = G * M
    if rows == 0 or Sb == 0:
        return
    launch(MODULE, softmax_kernel(Sb), (cdiv(rows, WARPS),), (32 * WARPS,),
           (scores, i64(rows), i32(M), i32(Sb), i32(R), i32(qpos0), f32(scale)))


def _check(q, k, v, pos0: int) -> None:
    T, H, dq = q.shape
    S, G, dk = k.shape
    if dk != dq or v.ndim != 3 or v.shape[:2] != (S, G) or G == 0 or H % G:
        raise ConfigError(f"attention_prefill: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                          "(q [T, H, dq], k [S, G, dq], v [S, G, dv], H a multiple of G)")
    if S == 0 or pos0 < 0:
        raise ConfigError(f"attention_prefill: needs at least one key and pos0 >= 0 (S {S}, pos0 {pos0})")
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if a.dtype != cupy.float32:
            raise ConfigError(f"attention_prefill: {name} must be float32, got {a.dtype}")


def attention_prefill(q, k, v, pos0: int, scale: float, *, score_bytes: int = SCORE_BYTES):
    """Causal GQA / MLA attention of T query tokens at positions pos0 .. pos0+T-1 over S keys.

    q [T, H, dq], k [S, G, dq], v [S, G, dv]: float32 device arrays (k and v are read in place
    where their last axis is contiguous; q too when R = 1). pos0: host int. score_bytes bounds the
    fp32 score buffer of one query block. Returns out [T, H, dv] float32.
    """
    pos0 = int(pos0)
    _check(q, k, v, pos0)
    T, H, dq = q.shape
    S, G, dv = v.shape
    R = H // G
    out = cupy.empty((T, H, dv), dtype=cupy.float32)
    if T == 0:
        return out
    q, k, v = (a if _gemm_view_ok(a) else cupy.ascontiguousarray(a) for a in (q, k, v))
    plan = blocks(T, H, S, pos0, score_bytes)
    buf = cupy.empty(H * plan[0][1] * plan[-1][2], dtype=cupy.float32)    # the largest block's scores
    for t0, t1, sb in plan:
        n = t1 - t0
        scores = buf[:H * n * sb].reshape(G, R * n, sb)
        if R == 1:          # head h is kv head h: q and out are matrices in place, rows H heads apart
            _scores((q.data.ptr + 4 * t0 * _el(q, 0), _el(q, 0), _el(q, 1)), k, scores)
            masked_softmax_(scores, 1, pos0 + t0, scale)
            _mix(scores, v, (out.data.ptr + 4 * t0 * H * dv, H * dv, dv))
            continue
        # the R heads of a kv head as R * n rows (tl * R + r) of one matrix: regrouped by a copy
        qb = cupy.ascontiguousarray(q[t0:t1].reshape(n, G, R, dq).transpose(1, 0, 2, 3))   # [G, n, R, dq]
        _scores((qb.data.ptr, dq, R * n * dq), k, scores)
        masked_softmax_(scores, R, pos0 + t0, scale)
        ob = cupy.empty((G, n, R, dv), dtype=cupy.float32)
        _mix(scores, v, (ob.data.ptr, dv, R * n * dv))
        out.reshape(T, G, R, dv)[t0:t1] = ob.transpose(1, 0, 2, 3)
    return out


def _gemm_view_ok(a) -> bool:
    """Whether cuBLAS can read a [rows, heads, d] float32 view in place: each head's rows a matrix
    with contiguous rows of d at a leading dimension >= d (a broadcast or reversed view is copied)."""
    return a.strides[2] == 4 and a.strides[1] >= 0 and a.strides[0] >= 4 * a.shape[2]


def _el(a, axis: int) -> int:
    return a.strides[axis] // 4


def _scores(qm: tuple, k, scores) -> None:
    """scores[g] [M, Sb] = Q_g @ k[:Sb, g].T for the G kv heads, one strided batched GEMM; qm =
    (address, leading dimension, batch stride) in floats of the query rows Q_g [M, dq]. cuBLAS is
    column-major: scores[g] is [Sb, M] = k_g (a [dq, Sb] view, transposed) Q_g (a [dq, M] view)."""
    G, M, sb = scores.shape
    dq = k.shape[2]
    dense.gemm_strided(dense.OP_T, dense.OP_N, sb, M, dq, k.data.ptr, _el(k, 0), _el(k, 1),
                       qm[0], qm[1], qm[2], scores.data.ptr, sb, M * sb, G)


def _mix(p, v, om: tuple) -> None:
    """O_g [M, dv] = p[g] @ v[:Sb, g] for the G kv heads, om = (address, leading dimension, batch
    stride) in floats of O_g: column-major O_g [dv, M] = v_g (a [dv, Sb] view) p_g (a [Sb, M] view)."""
    G, M, sb = p.shape
    dv = v.shape[2]
    dense.gemm_strided(dense.OP_N, dense.OP_N, dv, M, sb, v.data.ptr, _el(v, 0), _el(v, 1),
                       p.data.ptr, sb, M * sb, om[0], om[1], om[2], G)


def _time(f, reps: int) -> tuple[float, float]:
    """(GPU us, wall us) a call of f: GPU time with the queue filled beforehand (the host enqueues
    every call while a ~20 ms fp32 GEMM runs), wall time back to back (the host's cost too)."""
    import time
    f()
    busy = cupy.ones((8192, 8192), dtype=cupy.float32)
    cupy.cuda.Device().synchronize()
    t0, t1 = cupy.cuda.Event(), cupy.cuda.Event()
    cupy.matmul(busy, busy)
    t0.record()
    for _ in range(reps):
        f()
    t1.record()
    t1.synchronize()
    w0 = time.perf_counter()
    for _ in range(reps):
        f()
    cupy.cuda.Device().synchronize()
    return 1e3 * cupy.cuda.get_elapsed_time(t0, t1) / reps, 1e6 * (time.perf_counter() - w0) / reps


def bench(Ts=(16, 32, 48, 64, 96, 128, 256, 512, 1024, 2048), H: int = 32, G: int = 8, d: int = 128,
          pos0: int = 0, reps: int = 20) -> list[dict]:
    """attention_prefill against gpu_ops.attention (the fused decode kernel) for T tokens after pos0
    cached ones (Mixtral-8x7B's heads by default): us a call (GPU, wall) and their max abs
    difference relative to max |out|."""
    from . import gpu_ops
    rows = []
    rng = cupy.random.default_rng(0)
    for T in Ts:
        S = pos0 + T
        q, k, v = (rng.standard_normal(s, dtype=cupy.float32) for s in ((T, H, d), (S, G, d), (S, G, d)))
        row = {"T": T, "pos0": pos0}
        outs = []
        for name, f in (("gemm", attention_prefill), ("fused", gpu_ops.attention)):
            outs.append(f(q, k, v, pos0, d ** -0.5))
            gpu, wall = _time(lambda: f(q, k, v, pos0, d ** -0.5), reps)
            row[f"{name}_gpu_us"], row[f"{name}_wall_us"] = round(gpu, 1), round(wall, 1)
        row["max_diff"] = float(cupy.abs(outs[0] - outs[1]).max() / cupy.abs(outs[1]).max())
        rows.append(row)
    return rows


if __name__ == "__main__":      # python -m efengine.ops.gpu_attn_prefill (on a GPU): JSON lines
    import json
    for r in bench() + bench(Ts=(32, 64, 128, 512), pos0=960):
        print(json.dumps(r))
