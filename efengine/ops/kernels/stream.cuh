// A warp's stream of row tasks with the next weights in flight (pasted after dot.cuh).
//
// A launch is a list of tasks; a task is RW weight rows dotted with the prepared x of T tokens.
// Warps of a persistent grid take tasks w, w + nwarps, ...; each task's K is cut into groups of
// U chunks per lane (32 * U chunks a warp). The loads of the next (task, group) are issued
// before the current one is decoded and summed, so every warp keeps loads outstanding from its
// first task to its last: no bubble at task boundaries, however short K is.
//
// The functor F supplies:   rows(task, Rows&)    row pointers and x pointers of a task
//                           done(task, acc)      the finished per-lane sums (F reduces them)

template <int RW>
struct Rows {
    const u8* q[RW];
    const u16* s[RW];
    const u16* m[RW];
    const float* x32;       // float weights: T rows of ldx floats
    const u16* xh;          // quantized weights: T rows of KX prepared values
    const float* xs;
    const float* xc;
    bool ok;                // false: the task's weights are missing (F writes zeros)
};

template <int WT> struct WTraits {
    static constexpr bool Q = WT == WT_Q4 || WT == WT_Q8;
    static constexpr int CB = WT == WT_Q4 ? 16 : (WT == WT_F16 || WT == WT_BF16) ? 16 : 32;  // bytes a lane-chunk
    static constexpr int NL = CB / 16;                                                    // 16-byte loads
};

template <int WT, int RW, int U>
__device__ __forceinline__ void stream_load(uint4 (&w)[U][RW][WTraits<WT>::NL], const Rows<RW>& r, int g, int nc) {
    constexpr int CB = WTraits<WT>::CB, NL = WTraits<WT>::NL;
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = lane + 32 * (U * g + u);
        if (c < nc) {
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
                for (int j = 0; j < NL; ++j) w[u][i][j] = ld_stream(r.q[i] + (i64)c * CB + 16 * j);
        }
    }
}

template <int WT, int T, int RW, int U>
__device__ __forceinline__ void stream_compute(const uint4 (&w)[U][RW][WTraits<WT>::NL], const Rows<RW>& r, int g,
                                               int nc, int gshift, int ldx, int KX, float (&acc)[RW][T]) {
    constexpr int NL = WTraits<WT>::NL;
    const int lane = threadIdx.x & 31;
    const int ncx = KX >> 5;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = lane + 32 * (U * g + u);
        if (c >= nc) continue;
        if (WTraits<WT>::Q) {
            // x of the chunk is loaded once per token and used by all RW rows
            const int gi = c >> gshift;
            float sc[RW], mc[RW];
#pragma unroll
            for (int i = 0; i < RW; ++i) {
                sc[i] = h2f(__ldg(r.s[i] + gi));
                mc[i] = WT == WT_Q4 ? h2f(__ldg(r.m[i] + gi)) + 8.0f * sc[i] : 0.0f;
            }
            if (T == 1) {
                uint4 xv[4];
                load_xchunk(r.xh, c, ncx, xv);
                const float xsum = WT == WT_Q4 ? __ldg(r.xs + c) : 0.0f, xinv = __ldg(r.xc + c);
#pragma unroll
                for (int i = 0; i < RW; ++i) {
                    u32 p[16];
                    if (WT == WT_Q4) q4_decode(w[u][i][0], p);
                    else q8_decode(w[u][i][0], w[u][i][NL - 1], p);
                    const float d = dot16(p, xv);
                    acc[i][0] += (WT == WT_Q4 ? sc[i] * d + mc[i] * xsum : sc[i] * d) * xinv;
                }
            } else {
                u32 p[RW][16];
#pragma unroll
                for (int i = 0; i < RW; ++i) {
                    if (WT == WT_Q4) q4_decode(w[u][i][0], p[i]);
                    else q8_decode(w[u][i][0], w[u][i][NL - 1], p[i]);
                }
#pragma unroll
                for (int t = 0; t < T; ++t) {
                    uint4 xv[4];
                    load_xchunk(r.xh + (i64)t * KX, c, ncx, xv);
                    const float xsum = WT == WT_Q4 ? __ldg(r.xs + t * ncx + c) : 0.0f;
                    const float xinv = __ldg(r.xc + t * ncx + c);
#pragma unroll
                    for (int i = 0; i < RW; ++i) {
                        const float d = dot16(p[i], xv);
                        acc[i][t] += (WT == WT_Q4 ? sc[i] * d + mc[i] * xsum : sc[i] * d) * xinv;
                    }
                }
            }
        } else {
            float f[RW][8];
#pragma unroll
            for (int i = 0; i < RW; ++i) unpack8(WT, w[u][i][0], w[u][i][NL - 1], f[i]);
#pragma unroll
            for (int t = 0; t < T; ++t) {
                const float4 xa = __ldg((const float4*)(r.x32 + (i64)t * ldx + 8 * c));
                const float4 xb = __ldg((const float4*)(r.x32 + (i64)t * ldx + 8 * c + 4));
#pragma unroll
                for (int i = 0; i < RW; ++i) acc[i][t] = add8(acc[i][t], f[i], xa, xb);
            }
        }
    }
}

// float rows whose K is not a multiple of 8 (tiny test models): one element at a time, no pipeline
template <int WT, int T, int RW>
__device__ __forceinline__ void scalar_rows(const Rows<RW>& r, int K, int ldx, float (&acc)[RW][T]) {
    const int lane = threadIdx.x & 31;
    for (int k = lane; k < K; k += 32) {
#pragma unroll
        for (int i = 0; i < RW; ++i) {
            float wv;
            if (WT == WT_F32) wv = ((const float*)r.q[i])[k];
            else if (WT == WT_F16) wv = h2f(((const u16*)r.q[i])[k]);
            else wv = bf2f(((const u16*)r.q[i])[k]);
#pragma unroll
            for (int t = 0; t < T; ++t) acc[i][t] += wv * r.x32[(i64)t * ldx + k];
        }
    }
}

template <int WT, int T, int RW, int U, class F>
__device__ __forceinline__ void run_tasks(F& f, int ntasks, int K, int Kp, int gshift, int ldx, int KX) {
    constexpr int NL = WTraits<WT>::NL;
    const int nwarps = gridDim.x * (blockDim.x >> 5);
    int task = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (task >= ntasks) return;
    float acc[RW][T];
#pragma unroll
    for (int i = 0; i < RW; ++i)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[i][t] = 0.0f;
    Rows<RW> cur, nxt;
    f.rows(task, cur);
    if (!WTraits<WT>::Q && (K & 7)) {
        for (; task < ntasks; task += nwarps) {
            f.rows(task, cur);
            if (cur.ok) scalar_rows<WT, T, RW>(cur, K, ldx, acc);
            f.done(task, cur, acc);
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
                for (int t = 0; t < T; ++t) acc[i][t] = 0.0f;
        }
        return;
    }
    const int nc = WTraits<WT>::Q ? (Kp >> 5) : (K >> 3);
    const int ngrp = (nc + 32 * U - 1) / (32 * U);
    uint4 a[U][RW][NL], b[U][RW][NL];
    stream_load<WT, RW, U>(a, cur, 0, nc);
    int g = 0;
    while (true) {
        int nt = task, ng = g + 1;
        if (ng == ngrp) { nt = task + nwarps; ng = 0; }
        const bool more = nt < ntasks;
        if (more) {
            if (nt != task) f.rows(nt, nxt);
            else nxt = cur;
            stream_load<WT, RW, U>(b, nxt, ng, nc);
        }
        stream_compute<WT, T, RW, U>(a, cur, g, nc, gshift, ldx, KX, acc);
        if (ng == 0) {
            f.done(task, cur, acc);
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
                for (int t = 0; t < T; ++t) acc[i][t] = 0.0f;
        }
        if (!more) break;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int i = 0; i < RW; ++i)
#pragma unroll
                for (int j = 0; j < NL; ++j) a[u][i][j] = b[u][i][j];
        cur = nxt;
        task = nt;
        g = ng;
    }
}
