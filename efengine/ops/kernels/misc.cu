// Embedding lookup, dequantization for the prefill GEMMs, the greedy step of the resident decode
// loop, and the bench's fills and read-bandwidth probe. Pasted after common.cuh.

// out[t, :] = row ids[t] of W [V, D] (any stored type), dequantized as quant.py does
extern "C" __global__ void embed_kernel(const int* ids, int wt, const u8* q, const u16* s, const u16* m,
                                        int D, int Kp, int group, float* out) {
    grid_dep();
    const int t = blockIdx.x;                  // blocks (t, y) share a row: one value a thread
    const i64 id = ids[t];
    for (int k = blockIdx.y * blockDim.x + threadIdx.x; k < D; k += gridDim.y * blockDim.x)
        out[(i64)t * D + k] = deq_elem(wt, q, s, m, id, k, D, Kp, group);
}

// W [N, K] (any stored type) -> fp16 [N, K]; one block a row. q4 / q8 with K and group multiples
// of 8 take 8 values a thread (one 32-bit load of q4 codes, one 16-byte store).
extern "C" __global__ void __launch_bounds__(256)
dequant_f16(int wt, const u8* q, const u16* s, const u16* m, int K, int Kp, int group, u16* out) {
    grid_dep();
    const i64 row = blockIdx.x;
    u16* orow = out + row * K;
    const bool vec = (wt == WT_Q4 || wt == WT_Q8) && (K & 7) == 0 && (group & 7) == 0;
    if (!vec) {
        for (int k = threadIdx.x; k < K; k += blockDim.x) orow[k] = f2h(deq_elem(wt, q, s, m, row, k, K, Kp, group));
        return;
    }
    const int G = Kp / group;
    for (int c = threadIdx.x; c < (K >> 3); c += blockDim.x) {
        const int g = (c << 3) / group;
        const float sc = h2f(s[row * G + g]);
        float f[8];
        if (wt == WT_Q4) {
            const float mn = h2f(m[row * G + g]);
            const u32 w = ((const u32*)(q + row * (Kp >> 1)))[c];
#pragma unroll
            for (int j = 0; j < 8; ++j) f[j] = __fadd_rn(__fmul_rn((float)((w >> (4 * j)) & 15u), sc), mn);
        } else {
            const uint2 w = ((const uint2*)(q + row * Kp))[c];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const u32 word = j < 4 ? w.x : w.y;
                f[j] = __fmul_rn((float)(signed char)((word >> (8 * (j & 3))) & 0xFFu), sc);
            }
        }
        uint4 o;
        o.x = (u32)f2h(f[0]) | ((u32)f2h(f[1]) << 16);
        o.y = (u32)f2h(f[2]) | ((u32)f2h(f[3]) << 16);
        o.z = (u32)f2h(f[4]) | ((u32)f2h(f[5]) << 16);
        o.w = (u32)f2h(f[6]) | ((u32)f2h(f[7]) << 16);
        ((uint4*)orow)[c] = o;
    }
}

// One greedy step of the resident decode loop: tok[0] = argmax(logits [V]) (lowest id on ties),
// hist[pos] = that token (when hist), then pos[0] += 1, so a captured step can be replayed with
// no host work in between.
extern "C" __global__ void __launch_bounds__(1024)
argmax_advance(const float* logits, int V, int* tok, int* pos, int* hist) {
    grid_dep();
    __shared__ float bv[32];
    __shared__ int bi[32];
    float best = -INFINITY;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const float x = logits[i];
        if (x > best) { best = x; idx = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (lane == 0) { bv[w] = best; bi[w] = idx; }
    __syncthreads();
    if (w == 0) {
        const int nw = blockDim.x >> 5;
        best = lane < nw ? bv[lane] : -INFINITY;
        idx = lane < nw ? bi[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
            if (ov > best || (ov == best && oi < idx)) { best = ov; idx = oi; }
        }
        if (lane == 0) {
            const int next = idx == 0x7fffffff ? 0 : idx;
            tok[0] = next;
            if (hist) hist[pos[0]] = next;
            pos[0] += 1;
        }
    }
}

__device__ __forceinline__ u32 mix32(u32 x) {
    x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
    return x;
}

// synthetic weights for the bench: random words, and uniform fp16 / f32 values in [lo, hi)
extern "C" __global__ void fill_random_u32(u32* p, i64 n, u32 seed) {
    grid_dep();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        p[i] = mix32((u32)i * 0x9E3779B9u + seed * 0x85EBCA6Bu + (u32)(i >> 32));
}
extern "C" __global__ void fill_random_f16(u16* p, i64 n, u32 seed, float lo, float hi) {
    grid_dep();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float u = (mix32((u32)i * 0x9E3779B9u + seed * 0x85EBCA6Bu + (u32)(i >> 32)) >> 8) * (1.0f / 16777216.0f);
        p[i] = f2h(lo + (hi - lo) * u);
    }
}
extern "C" __global__ void fill_random_f32(float* p, i64 n, u32 seed, float lo, float hi) {
    grid_dep();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float u = (mix32((u32)i * 0x9E3779B9u + seed * 0x85EBCA6Bu + (u32)(i >> 32)) >> 8) * (1.0f / 16777216.0f);
        p[i] = lo + (hi - lo) * u;
    }
}

// Read bandwidth probe: every 16-byte word once, four loads in flight a thread.
extern "C" __global__ void read_probe(const uint4* p, i64 n, u32* sink) {
    grid_dep();
    u32 acc = 0;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n; i += 4 * stride) {
        const uint4 a = ld_stream(p + i), b = ld_stream(p + i + stride);
        const uint4 c = ld_stream(p + i + 2 * stride), d = ld_stream(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n; i += stride) { const uint4 a = ld_stream(p + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
    if (acc == 0x9E3779B9u) sink[0] = acc;     // never in practice; keeps the loads alive
}
