"""Dense ops of a prefill step (T > a few tokens) for the CuPy backend, in few host calls.

Why: a 512-token prefill of a full-size Qwen1.5-MoE on an H100 spent 1.8 ms a layer queuing CuPy
calls (~60 launches, 10-35 us of Python each) for 1.1 ms of GPU work, so the GPU waited for the
host. Here the GEMMs go to cuBLAS directly (no cupy.matmul dispatch, fp32 output, so no fp16
product to widen), one preparation of an input serves every matrix that reads it, and the small
steps (RMSNorm, unscale, the routed experts' weighted sum) are one launch each.

Legend: T tokens, K inputs, K8 = K rounded up to 8, N outputs, A active experts, D hidden.

Rows16 (rows16(x)): x [T, K] f32 prepared once for every fp16 GEMM that reads it: x16 [T, K8]
  fp16 rows scaled by powers of two so that |max| lies in [8, 16) (gpu_ops.to_f16_rows, zero
  padded: no fp16 overflow whatever the activations' range), inv [T] the inverse scales.
  CupyBackend.mm_input makes one for q, k and v, or for the router, the shared expert's gate, up
  and sigmoid gate and the routed experts (gpu_prefill.moe_prefill_device) together.
gemm(rows, w16, N, ldw) -> y [T, N] f32 = (x16 @ W.T) * inv[:, None] for fp16 weights W [N, K] at
  device address w16: cuBLAS, fp16 operands, fp32 accumulation and output, then one unscale
  launch (exact: inv is a power of two).
rms_norm(x, w, eps), moe_combine(y, w): one launch each, NumpyBackend's operation order.
gemm_ex / gemm_strided: thin cuBLAS calls on device addresses (column-major, as cuBLAS sees them)
  for these GEMMs and gpu_attn_prefill's batched ones on strided views.
Every function has its numpy twin in NumpyBackend (tests/test_gpu_dense_prefill.py compares).
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import gpu_kernels
from .gpu_kernels import cdiv, cupy, f32, i32

MODULE = "dense_prefill"
gpu_kernels.MODULES.setdefault(MODULE, ("common.cuh", "dense_prefill.cu"))

try:                                        # importable without CuPy, as gpu_kernels
    from cupy_backends.cuda.libs import cublas
except ImportError:
    cublas = None

# CUDA / cuBLAS enum values (ABI constants of cudaDataType, cublasComputeType_t, ...)
R_32F, R_16F = 0, 2
COMPUTE_32F = 68                            # fp32 accumulation; no TF32, no fp16 reductions
GEMM_DEFAULT = -1
OP_N, OP_T = 0, 1
POINTER_HOST = 0
_ONE = np.ones(1, dtype=np.float32)         # alpha / beta in host memory (kept alive here)
_ZERO = np.zeros(1, dtype=np.float32)
_P_ONE, _P_ZERO = _ONE.ctypes.data, _ZERO.ctypes.data


def _launch(module: str, name: str, grid: tuple, block: tuple, args: tuple) -> None:
    """A small kernel (no dynamic shared memory) launched straight through CuPy: gpu_kernels.launch's
    checks and conversions cost a few us of host time a call, and a prefill layer makes ~25 of these."""
    gpu_kernels.kernel(module, name)(grid, block, args)


def _handle() -> int:
    h = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(h, cupy.cuda.get_current_stream().ptr)
    cublas.setPointerMode(h, POINTER_HOST)
    return h


def gemm_ex(ta: int, tb: int, m: int, n: int, k: int, A: int, atype: int, lda: int, B: int, btype: int,
            ldb: int, C: int, ctype: int, ldc: int) -> None:
    """C [m, n] = op(A) op(B), column-major, on device addresses; fp32 accumulation."""
    cublas.gemmEx(_handle(), ta, tb, m, n, k, _P_ONE, A, atype, lda, B, btype, ldb,
                  _P_ZERO, C, ctype, ldc, COMPUTE_32F, GEMM_DEFAULT)


def gemm_strided(ta: int, tb: int, m: int, n: int, k: int, A: int, lda: int, sa: int, B: int, ldb: int, sb: int,
                 C: int, ldc: int, sc: int, batch: int) -> None:
    """fp32 C_i [m, n] = op(A_i) op(B_i) for i < batch, X_i = X + i * sX elements, column-major.
    (cuBLAS's sgemm where this CuPy lacks the Ex call: the same fp32 product; CuPy leaves the
    handle's math mode at the default, no TF32.)"""
    ex = getattr(cublas, "gemmStridedBatchedEx", None)
    if ex is None:
        cublas.sgemmStridedBatched(_handle(), ta, tb, m, n, k, _P_ONE, A, lda, sa, B, ldb, sb,
                                   _P_ZERO, C, ldc, sc, batch)
        return
    ex(_handle(), ta, tb, m, n, k, _P_ONE, A, R_32F, lda, sa, B, R_32F, ldb, sb,
       _P_ZERO, C, R_32F, ldc, sc, batch, COMPUTE_32F, GEMM_DEFAULT)


class Rows16:
    """x [T, K] f32 with its fp16 rows x16 [T, K8] and inverse row scales inv [T] (module doc)."""
    __slots__ = ("x", "x16", "inv")

    def __init__(self, x, x16, inv):
        self.x, self.x16, self.inv = x, x16, inv

    @property
    def shape(self) -> tuple:
        return self.x.shape


def rows16(x) -> Rows16:
    """Rows16 of x [T, K] float32 (a contiguous copy first where x is not)."""
    x = cupy.ascontiguousarray(x, dtype=cupy.float32)
    if x.ndim != 2:
        raise ConfigError(f"rows16: x must be [T, K], got shape {x.shape}")
    T, K = x.shape
    K8 = cdiv(K, 8) * 8
    xp = x
    if K8 != K:
        xp = cupy.zeros((T, K8), dtype=cupy.float32)
        xp[:, :K] = x
    x16 = cupy.empty((T, K8), dtype=cupy.float16)
    inv = cupy.empty(T, dtype=cupy.float32)
    _launch("gemv", "rows_to_f16", (T,), (256,), (xp, i32(K8), x16, inv))
    return Rows16(x, x16, inv)


def gemm(rows: Rows16, w16: int, N: int, ldw: int, out=None):
    """y [T, N] f32 = (rows.x16 @ W.T) * rows.inv[:, None] for fp16 weights W [N, K] at device address
    w16, rows ldw >= K halves apart (a GpuWeight of type f16: W.ptr("q"), ldw = K). out: a float32
    [T, N] array with contiguous rows to write into (default: a new one)."""
    T, K = rows.x.shape
    if ldw < K or N < 0:
        raise ConfigError(f"gemm: weight rows of {ldw} halves for K = {K}")
    y = cupy.empty((T, N), dtype=cupy.float32) if out is None else out
    if y.shape != (T, N) or y.dtype != cupy.float32 or y.strides[1] != 4:
        raise ConfigError(f"gemm: out must be float32 [{T}, {N}] with contiguous rows")
    ldy = y.strides[0] // 4
    if T and N:
        # row-major y [T, N] is column-major [N, T]: y^T = W (column-major [K, N], transposed) x16^T
        gemm_ex(OP_T, OP_N, N, T, K, w16, R_16F, ldw, rows.x16.data.ptr, R_16F, rows.x16.shape[1],
                y.data.ptr, R_32F, ldy)
        _launch(MODULE, "dp_unscale", (T, cdiv(N, 1024)), (256,), (y, i32(ldy), i32(N), rows.inv))
    return y


def rms_norm(x, w, eps: float):
    """RMSNorm of the rows of x [..., K] float32 with weights w [K] (NumpyBackend.rms_norm)."""
    K = x.shape[-1]
    x2 = cupy.ascontiguousarray(x, dtype=cupy.float32).reshape(-1, K)
    w = cupy.ascontiguousarray(w, dtype=cupy.float32)
    if w.shape != (K,):
        raise ConfigError(f"rms_norm: weights {w.shape} for rows of {K}")
    out = cupy.empty_like(x2)
    if x2.shape[0]:
        _launch(MODULE, "dp_rmsnorm", (x2.shape[0],), (256,), (x2, i32(K), i32(K), w, f32(eps), out, i32(K)))
    return out.reshape(x.shape)


def moe_combine(y, w):
    """out [T, D] = sum over a of y[:, a] * w[:, a, None] in rank order; y [T, A, D], w [T, A] float32."""
    y = cupy.ascontiguousarray(y, dtype=cupy.float32)
    w = cupy.ascontiguousarray(w, dtype=cupy.float32)
    T, A, D = y.shape
    if w.shape != (T, A) or A < 1:
        raise ConfigError(f"moe_combine: y {y.shape} and weights {w.shape} do not fit")
    out = cupy.empty((T, D), dtype=cupy.float32)
    if T and D:
        _launch(MODULE, "dp_moe_combine", (T, cdiv(D, 1024)), (256,), (y, w, i32(A), i32(D), out))
    return out
