// Small dense steps of a prefill (T > a few tokens) for the CuPy backend (gpu_dense_prefill.py).
// Pasted after common.cuh (block_sum, i64). Each replaces several CuPy calls with one launch: a
// 512-token prefill of a model with small experts was bound by the host's calls, not the GPU.
//
// Legend: T rows (tokens), K / N a row's length, A active experts, D hidden.

// RMSNorm, one block a row: out[t, k] = w[k] * (x[t, k] * (1 / sqrt(sum_k x[t, k]^2 / K + eps))),
// NumpyBackend.rms_norm's operation order (only the sum of squares is added up in another order).
// Grid T, block 256.
extern "C" __global__ void __launch_bounds__(256)
dp_rmsnorm(const float* __restrict__ x, int ldx, int K, const float* __restrict__ w, float eps,
           float* __restrict__ out, int ldo) {
    __shared__ float red[32];
    const float* xr = x + (i64)blockIdx.x * ldx;
    float ss = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float v = xr[k];
        ss += v * v;
    }
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)K + eps);
    float* o = out + (i64)blockIdx.x * ldo;
    for (int k = threadIdx.x; k < K; k += blockDim.x) o[k] = __fmul_rn(w[k], __fmul_rn(xr[k], inv));
}

// y[t, n] *= inv[t]: a GEMM's fp32 product of fp16 rows scaled by powers of two, unscaled
// (exact: inv[t] is a power of two). Grid (T, cdiv(N, 1024)), block 256, 4 columns a thread.
extern "C" __global__ void __launch_bounds__(256)
dp_unscale(float* __restrict__ y, int ldy, int N, const float* __restrict__ inv) {
    const float s = inv[blockIdx.x];
    float* row = y + (i64)blockIdx.x * ldy;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int n = blockIdx.y * 1024 + i * 256 + threadIdx.x;
        if (n < N) row[n] *= s;
    }
}

// out[t, d] = sum over a of y[t, a, d] * w[t, a], ranks in order, each product rounded and then
// added (NumpyBackend.moe_combine: y0 w0 + y1 w1 + ..., no fused multiply-add, so the same bits).
// Grid (T, cdiv(D, 1024)), block 256, 4 columns a thread.
extern "C" __global__ void __launch_bounds__(256)
dp_moe_combine(const float* __restrict__ y, const float* __restrict__ w, int A, int D, float* __restrict__ out) {
    const int t = blockIdx.x;
    const float* yt = y + (i64)t * A * D;
    const float* wt = w + (i64)t * A;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int d = blockIdx.y * 1024 + i * 256 + threadIdx.x;
        if (d >= D) continue;
        float acc = __fmul_rn(yt[d], wt[0]);
        for (int a = 1; a < A; ++a) acc = __fadd_rn(acc, __fmul_rn(yt[(i64)a * D + d], wt[a]));
        out[(i64)t * D + d] = acc;
    }
}
