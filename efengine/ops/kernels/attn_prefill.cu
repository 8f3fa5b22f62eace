// Causal mask + softmax of a prefill step's attention scores, in place (gpu_attn_prefill.py).
// Pasted after common.cuh (warp_max, warp_sum, i64).
//
// s [G, M, S] float32 holds raw scores q . k of one block of query rows: row i of group g is the
// pair (tl, r) = (i / R, i % R), query token t0 + tl at absolute position qpos0 + tl (qpos0 =
// pos0 + t0), which sees keys 0 .. qpos0 + tl (and never more than S). Each row becomes, as
// NumpyBackend.attention computes it: x = s * scale; m = max of the visible x; p = exp(x - m) /
// sum of the visible exp(x - m); masked keys get exactly 0 (they are neither read nor summed).
// Key 0 is always visible, so m is finite when the scores are, and the sum is at least 1.
//
// One warp a row, lane j takes keys j, j + 32, ... . PER > 0: the row's values stay in registers
// (S <= 32 * PER): one read and one write of global memory. PER = 0: any S, three passes (max, sum,
// write), the later ones mostly served by L1 / L2.
#define APF_WARPS 8    // rows (warps) a block: 256 threads

template <int PER>
__device__ __forceinline__ void softmax_row(float* __restrict__ p, int nvis, int S, float scale) {
    const int lane = threadIdx.x & 31;
    if constexpr (PER > 0) {
        float x[PER > 0 ? PER : 1];
#pragma unroll
        for (int c = 0; c < PER; ++c) x[c] = lane + 32 * c < nvis ? p[lane + 32 * c] * scale : -INFINITY;
        warp_softmax(x);                               // masked keys come out exactly 0
#pragma unroll
        for (int c = 0; c < PER; ++c)
            if (lane + 32 * c < S) p[lane + 32 * c] = x[c];
        return;
    }
    float m = -INFINITY;
    for (int j = lane; j < nvis; j += 32) m = fmaxf(m, p[j] * scale);
    m = warp_max(m);
    float l = 0.0f;
    for (int j = lane; j < nvis; j += 32) l += expf(p[j] * scale - m);
    l = warp_sum(l);
    for (int j = lane; j < S; j += 32) p[j] = j < nvis ? expf(p[j] * scale - m) / l : 0.0f;
}

// rows = G * M rows of S scores each; grid cdiv(rows, APF_WARPS), block 32 * APF_WARPS.
template <int PER>
__device__ __forceinline__ void softmax_rows(float* s, i64 rows, int M, int S, int R, int qpos0, float scale) {
    const i64 row = (i64)blockIdx.x * APF_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;                               // warp-uniform; no block barrier below
    const int tl = (int)(row % M) / R;
    const int nvis = min(S, qpos0 + tl + 1);
    softmax_row<PER>(s + row * S, nvis, S, scale);
}

#define APF_ARGS float* s, i64 rows, int M, int S, int R, int qpos0, float scale
#define APF_INST(NAME, PER) \
    extern "C" __global__ void __launch_bounds__(32 * APF_WARPS) NAME(APF_ARGS) { \
        softmax_rows<PER>(s, rows, M, S, R, qpos0, scale); }
APF_INST(attn_softmax_p8, 8)        // S <= 256
APF_INST(attn_softmax_p16, 16)      // S <= 512
APF_INST(attn_softmax_p32, 32)      // S <= 1024
APF_INST(attn_softmax_p64, 64)      // S <= 2048
APF_INST(attn_softmax_any, 0)       // any S
