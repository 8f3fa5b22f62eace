"""Causal attention of a prefill step through batched fp32 GEMMs (cuBLAS through cupy.matmul) and
one fused mask + softmax kernel (kernels/attn_prefill.cu).

Legend: T tokens of the step, H query heads, G kv heads, R = H / G query heads a kv head (GQA),
dq / dv query-key / value head dims, S keys (cached positions 0 .. S-1; the model passes
S = pos0 + T), Tb tokens of a query block [t0, t1), M = R * Tb score rows a group in a block,
Sb = min(S, pos0 + t1) keys the block's queries can see.

attention_prefill(q [T, H, dq], k [S, G, dq], v [S, G, dv], pos0, scale) -> out [T, H, dv] float32,
the same causal softmax attention as NumpyBackend.attention (query t at absolute position
pos0 + t sees keys 0 .. pos0 + t; query head h reads kv head h // R). Once a call:
  kT [G, dq, S], vg [G, S, dv]: k and v regrouped by kv head (two small copies);
then for each block of Tb query tokens (Tb keeps G * M * S fp32 scores under score_bytes):
  1. qb [G, M, dq]: row tl * R + r of group g = q[t0 + tl, g * R + r] (a copy; the R heads of a
     group share k and v, so one GEMM a group covers all R * Tb of its query rows);
  2. scores [G, M, Sb] = qb @ kT[:, :, :Sb]   (cuBLAS sgemm, batched over G);
  3. attn_softmax_*: in place, row-wise: x = s * scale, keys after the row's position masked
     (exactly 0), max, exp, sum, divide: one launch;
  4. ob [G, M, dv] = p @ vg[:, :Sb], scattered into out[t0:t1] viewed as [Tb, G, R, dv].
Keys past pos0 + t1 are cut from a block (step 2's Sb): no later block's query needs fewer keys, so
with several blocks the causal triangle's empty corner is partly skipped.

Numerics: fp32 operands, fp32 accumulation, the numpy reference's operation order (scale after
the dot product, max subtracted, division by the sum); only summation orders differ. CuPy's batched
matmul runs cuBLAS with fp32 compute (TF32 only if asked for, e.g. CUPY_TF32=1 on some CuPy
versions; the tests' bound would then fail).

Cost (H100, Mixtral's heads, T = 512, pos0 = 0; GPU time): 174 us a call: the two GEMMs 57 + 51
us (~40 TFLOP/s of fp32 FMA), softmax 24 us (64 MiB in and out, ~2.7 TB/s), the q / k / v / out
regrouping copies ~36 us. The host spends ~200-300 us of CuPy calls on it (that machine's CPU),
hidden while the GPU has earlier work queued; `python -m efengine.ops.gpu_attn_prefill` (on a
GPU) times both paths back to back (JSON lines).

Why not always: for short steps (decode) the fused kernel of gpu_ops.attention reads k and v once
and launches once, while this path makes copies, three launches a block and a score buffer; see
MIN_T.
"""
from __future__ import annotations

from ..errors import ConfigError
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

    q [T, H, dq], k [S, G, dq], v [S, G, dv]: float32 device arrays (any strides). pos0: host int.
    score_bytes bounds the fp32 score buffer of one query block. Returns out [T, H, dv] float32.
    """
    pos0 = int(pos0)
    _check(q, k, v, pos0)
    T, H, dq = q.shape
    S, G, dv = v.shape
    R = H // G
    out = cupy.empty((T, H, dv), dtype=cupy.float32)
    if T == 0:
        return out
    kT = cupy.ascontiguousarray(k.transpose(1, 2, 0))           # [G, dq, S]
    vg = cupy.ascontiguousarray(v.transpose(1, 0, 2))           # [G, S, dv]
    plan = blocks(T, H, S, pos0, score_bytes)
    tb = plan[0][1]
    buf = cupy.empty(G * R * tb * plan[-1][2], dtype=cupy.float32)   # the largest block's scores
    out4 = out.reshape(T, G, R, dv)
    for t0, t1, sb in plan:
        n = t1 - t0
        qb = cupy.ascontiguousarray(q[t0:t1].reshape(n, G, R, dq).transpose(1, 0, 2, 3)).reshape(G, R * n, dq)
        scores = buf[:G * R * n * sb].reshape(G, R * n, sb)
        cupy.matmul(qb, kT if sb == S else kT[:, :, :sb], out=scores)
        masked_softmax_(scores, R, pos0 + t0, scale)
        ob = cupy.matmul(scores, vg if sb == S else vg[:, :sb])         # [G, R*n, dv]
        out4[t0:t1] = ob.reshape(G, n, R, dv).transpose(1, 0, 2, 3)
    return out


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
