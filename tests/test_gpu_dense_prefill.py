"""Dense prefill ops of the CuPy backend (efengine/ops/gpu_dense_prefill.py, kernels/dense_prefill.cu)
against their numpy twins (NumpyBackend), and CupyBackend's use of them (mm_input, linear on
prepared rows, rms_norm, moe_combine).

CPU: the module is registered and importable without CuPy. GPU (marked `gpu`, skipped without CuPy
and a CUDA device): fresh random inputs each run (pytest's rng fixture prints the seed), shapes off
every tile (K not a multiple of 8, N and D not multiples of 1024 or 256), rows of very different
scales. Tolerances: TOL_MM (relative RMS 1e-2) where operands are fp16 (~2^-11 relative each,
fp32 accumulation: ~1e-3 expected); float32 kernels 2e-6 (one rounding per operation, sums in
another order); moe_combine bit for bit (same operation order, no fused multiply-add).
"""
from __future__ import annotations

import numpy as np
import pytest

from efengine import quant
from efengine.ops import gpu_dense_prefill as dp
from efengine.ops import gpu_kernels
from efengine.ops.numpy_backend import NumpyBackend

from gpu_check import cp, gpu, rel

NB = NumpyBackend()
TOL_MM = 1e-2
TOL_F32 = 2e-6


def rows_x(rng, T, K):
    """Rows of very different scales, one of them all zero."""
    x = rng.standard_normal((T, K)).astype(np.float32)
    x *= np.float32(10.0) ** rng.integers(-3, 4, (T, 1)).astype(np.float32)
    x[T // 2] = 0
    return x


def test_module_registered():
    assert gpu_kernels.MODULES[dp.MODULE] == ("common.cuh", "dense_prefill.cu")
    src = gpu_kernels.source(dp.MODULE)
    assert all(k in src for k in ("dp_rmsnorm", "dp_unscale", "dp_moe_combine"))


@gpu
@pytest.mark.parametrize("T,K", [(37, 100), (9, 64), (130, 2048)])
def test_rows16(rng, T, K):
    x = rows_x(rng, T, K)
    r = dp.rows16(cp.asarray(x))
    x16, inv = cp.asnumpy(r.x16), cp.asnumpy(r.inv)
    assert x16.shape == (T, -(-K // 8) * 8) and r.shape == (T, K)
    assert np.all(x16[:, K:] == 0)                                  # zero padding
    back = x16[:, :K].astype(np.float64) * inv[:, None]
    assert rel(x, back) < 1e-3 and np.all(back[T // 2] == 0)
    amax = np.abs(x16.astype(np.float32)).max(axis=1)
    live = np.abs(x).max(axis=1) > 0
    assert np.all((amax[live] >= 8) & (amax[live] <= 16))       # 16: a value rounded up in fp16


@gpu
@pytest.mark.parametrize("T,K,N", [(37, 100, 300), (20, 520, 1100), (512, 256, 2050)])
def test_gemm_f16(rng, T, K, N):
    """y = x @ W.T through fp16 rows and cuBLAS, into a new array and into a strided out; W read
    in place from a wider matrix (rows ldw > K halves apart)."""
    x = rows_x(rng, T, K)
    wide = (rng.standard_normal((N, K + 24)) * 0.05).astype(np.float16)
    w = wide[:, :K].astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    dw = cp.asarray(wide)
    rows = dp.rows16(cp.asarray(x))
    y = cp.asnumpy(dp.gemm(rows, dw.data.ptr, N, K + 24))
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    assert rel(ref, y) < TOL_MM
    assert np.all(y[T // 2] == 0)
    big = cp.full((T, N + 7), np.nan, dtype=cp.float32)
    dp.gemm(rows, dw.data.ptr, N, K + 24, out=big[:, :N])
    # cuBLAS may pick another kernel for another leading dimension (another summation order)
    assert rel(y, cp.asnumpy(big[:, :N])) < 1e-5
    assert np.all(np.isnan(cp.asnumpy(big[:, N:])))                 # nothing written past N


@gpu
@pytest.mark.parametrize("qtype", ["f16", "q8", "q4", "bf16"])
def test_backend_linear_prepared_rows(rng, qtype):
    """CupyBackend.linear on mm_input's rows = linear on x (bit for bit) and near x @ W.T; mm_input
    passes few-token inputs and prepared rows through unchanged."""
    from efengine.ops.cupy_backend import CupyBackend
    from efengine.ops.gpu_weights import GpuWeight
    B = CupyBackend()
    N, K = 200, 264
    wf = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    buf = quant.quantize(wf, qtype, 64)
    wq = quant.dequantize(buf, qtype, (N, K), 64)
    W = GpuWeight(qtype, (N, K), 64, cp.asarray(buf))
    x = cp.asarray(rows_x(rng, 40, K))
    rows = B.mm_input(x)
    assert isinstance(rows, dp.Rows16) and B.mm_input(rows) is rows
    a, b = cp.asnumpy(B.linear(rows, W)), cp.asnumpy(B.linear(x, W))
    np.testing.assert_array_equal(a, b)
    assert rel(cp.asnumpy(x).astype(np.float64) @ wq.T, a) < TOL_MM
    small = cp.asarray(rng.standard_normal((8, K)).astype(np.float32))
    same = B.mm_input(small)                     # 8 tokens: the GEMV kernels read float rows
    assert not isinstance(same, dp.Rows16)
    np.testing.assert_array_equal(cp.asnumpy(same), cp.asnumpy(small))


@gpu
@pytest.mark.parametrize("shape", [(37, 100), (20, 3, 64), (512, 2048), (9, 4096)])
def test_rms_norm(rng, shape):
    x = rows_x(rng, int(np.prod(shape[:-1])), shape[-1]).reshape(shape)
    w = rng.standard_normal(shape[-1]).astype(np.float32)
    got = cp.asnumpy(dp.rms_norm(cp.asarray(x), cp.asarray(w), 1e-6))
    assert got.shape == x.shape
    assert rel(NB.rms_norm(x, w, 1e-6), got) < TOL_F32
    from efengine.ops.cupy_backend import CupyBackend            # the backend's prefill branch
    np.testing.assert_array_equal(cp.asnumpy(CupyBackend().rms_norm(cp.asarray(x), cp.asarray(w), 1e-6)), got)


@gpu
@pytest.mark.parametrize("T,A,D", [(13, 4, 1500), (7, 1, 64), (512, 2, 4096), (3, 6, 2049)])
def test_moe_combine(rng, T, A, D):
    y = rng.standard_normal((T, A, D)).astype(np.float32)
    w = rng.random((T, A)).astype(np.float32)
    got = cp.asnumpy(dp.moe_combine(cp.asarray(y), cp.asarray(w)))
    np.testing.assert_array_equal(got, NB.moe_combine(y, w))
