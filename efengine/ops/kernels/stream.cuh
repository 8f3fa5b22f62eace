// A warp's stream of row tasks with the next group's loads in flight (pasted after dot.cuh).
//
// A launch is a list of tasks; a task is RW weight rows dotted with the prepared x of T tokens.
// Warps of a persistent grid take tasks w, w + nwarps, ...; each task's K is cut into groups of
// U chunks per lane (32 * U chunks a warp). A group's loads (weights and, for quantized rows,
// the scale and min of each chunk's group: all from DRAM) go to one buffer; once its sums are
// done the loads of the next (task, group) are issued into it, so the sums only wait for x
// (L1-resident). The next task is looked up (the expert's slot) before the sums, so no task
// boundary waits for those loads either, however short K is.
//
// Registers set the speed: a warp waits about one memory latency a group, and the number of warps
// an SM holds is what hides it. So there is one buffer, not two: a second one, in flight during
// the sums, held 16 to 64 more registers and bought little, the sums then waiting for their scales
// from DRAM anyway (they now come with the weights). And a task is kept as F::Task, a few 32-bit
// values and at most one pointer, from which the 3 * RW row pointers are rebuilt at each use (a
// few adds a group): held for the current and the next task they took ~60 registers
// (moe_gateup_q4 had 118 registers: 2 blocks of 256 an SM; now 72: 3).
//
// ACT: the prep format quantized rows read (ACT_F16 fp16 pairs, ACT_I8 int8 codes, common.cuh).
//
// The functor F supplies:   Task                   what a task keeps from start to done()
//                           task(task, Task&)      fill it (may read memory: the expert's slot)
//                           rows(Task, Rows&)      its row and x pointers
//                           done(task, Task, acc)  the finished per-lane sums (F reduces them)

// Where a task's rows are: row i's weights at q + dq[i], its scales at s + ds[i] and mins at
// s + dm[i] (bytes). Offsets from one pointer, so a group's loads cost a 64-bit add each; the
// offsets are mostly kernel arguments (another matrix of the same blob) or 0.
template <int RW>
struct Rows {
    const u8* q;
    const u8* s;
    i64 dq[RW], ds[RW], dm[RW];
    const float* x32;       // float weights: T rows of ldx floats
    const u16* xh;          // quantized weights: T rows of KX prepared values
    const float* xs;
    const float* xc;

    // rows at .. at + n - 1 are rows row0 .. of a matrix of N rows whose row row0 is at q + oq
    // (scales s + os, mins s + om), rb / sb bytes a row; rows from N on repeat the last one
    // (callers skip their writes). Adds only: this runs every group.
    template <int n>
    __device__ __forceinline__ void run(int at, int row0, int N, i64 rb, i64 sb, i64 oq, i64 os, i64 om) {
#pragma unroll
        for (int r = 0; r < n; ++r) {
            const bool next = row0 + r < N;
            dq[at + r] = r == 0 ? oq : dq[at + r - 1] + (next ? rb : 0);
            ds[at + r] = r == 0 ? os : ds[at + r - 1] + (next ? sb : 0);
            dm[at + r] = r == 0 ? om : dm[at + r - 1] + (next ? sb : 0);
        }
    }
};

template <int WT> struct WTraits {
    static constexpr bool Q = WT == WT_Q4 || WT == WT_Q8;
    static constexpr int CB = WT == WT_Q4 ? 16 : (WT == WT_F16 || WT == WT_BF16) ? 16 : 32;  // bytes a lane-chunk
    static constexpr int NL = CB / 16;                                                    // 16-byte loads
};

// What a group's loads bring a lane, for each chunk slot u and row i: the weights and, quantized,
// the raw fp16 scale and min of the chunk's group (the sums convert them exactly as before).
template <int WT, int RW, int U>
struct Group {
    uint4 w[U][RW][WTraits<WT>::NL];
    u16 s[U][RW];
    u16 m[U][RW];           // q4 only
};

// this lane's chunk of slot u in group g
template <int U>
__device__ __forceinline__ int lane_chunk(int g, int u) { return (threadIdx.x & 31) + 32 * (U * g + u); }

// the loads of group g of rows r (nothing for chunks past the rows' end)
template <int WT, int RW, int U>
__device__ __forceinline__ void stream_load(Group<WT, RW, U>& b, const Rows<RW>& r, int g, int nc, int gshift) {
    constexpr int CB = WTraits<WT>::CB, NL = WTraits<WT>::NL;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = lane_chunk<U>(g, u);
        if (c < nc) {
            // an empty asm keeps qc and sc as they are: without it the compiler rebuilds each row's
            // address from three terms, two more adds a row
            const u8* qc = r.q + (i64)c * CB;
            asm("" : "+l"(qc));
            const u8* sc = WTraits<WT>::Q ? r.s + 2 * (i64)(c >> gshift) : r.s;
            if (WTraits<WT>::Q) asm("" : "+l"(sc));
#pragma unroll
            for (int i = 0; i < RW; ++i) {
#pragma unroll
                for (int j = 0; j < NL; ++j) b.w[u][i][j] = ld_stream(qc + r.dq[i] + 16 * j);
                if (WTraits<WT>::Q) b.s[u][i] = __ldg((const u16*)(sc + r.ds[i]));
                if (WT == WT_Q4) b.m[u][i] = __ldg((const u16*)(sc + r.dm[i]));
            }
        }
    }
}

// acc += the int8-activation sums (ACT_I8) of chunk c of slot u: for each token, the chunk's codes
// and (d, code sum) are loaded once and used by all RW rows; the integer sums are exact
template <int WT, int T, int RW, int U>
__device__ __forceinline__ void stream_compute_i8(const Group<WT, RW, U>& b, const Rows<RW>& r, int u, int c,
                                                  int KX, float (&acc)[RW][T]) {
    constexpr int NL = WTraits<WT>::NL;
    const int ncx = KX >> 5;
    float sc[RW], mc[RW];
#pragma unroll
    for (int i = 0; i < RW; ++i) {
        sc[i] = h2f(b.s[u][i]);
        mc[i] = WT == WT_Q4 ? h2f(b.m[u][i]) : 0.0f;
    }
#pragma unroll
    for (int t = 0; t < T; ++t) {
        u32 xv[8], xn[8];
        load_xchunk_i8(r.xh + (i64)t * KX, c, ncx, xv);
        if (WT == WT_Q8) x_korder(xv, xn);
        const float xsum = WT == WT_Q4 ? __ldg(r.xs + t * ncx + c) : 0.0f, xd = __ldg(r.xc + t * ncx + c);
#pragma unroll
        for (int i = 0; i < RW; ++i) {
            const int dot = chunk_dot_i8<WT>(b.w[u][i][0], b.w[u][i][NL - 1], xv, xn);
            acc[i][t] += xd * (WT == WT_Q4 ? sc[i] * (float)dot + mc[i] * xsum : sc[i] * (float)dot);
        }
    }
}

// acc += the sums of group g from the loads in b; x of rows r (quantized WT: prep format ACT)
template <int WT, int T, int RW, int U, int ACT = ACT_F16>
__device__ __forceinline__ void stream_compute(const Group<WT, RW, U>& b, const Rows<RW>& r, int g, int nc,
                                               int ldx, int KX, float (&acc)[RW][T]) {
    constexpr int NL = WTraits<WT>::NL;
    const int ncx = KX >> 5;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int c = lane_chunk<U>(g, u);
        if (c >= nc) continue;
        if (WTraits<WT>::Q && ACT == ACT_I8) {
            stream_compute_i8<WT, T, RW, U>(b, r, u, c, KX, acc);
        } else if (WTraits<WT>::Q) {
            // x of the chunk is loaded once per token and used by all RW rows
            float sc[RW], mc[RW];
#pragma unroll
            for (int i = 0; i < RW; ++i) {
                sc[i] = h2f(b.s[u][i]);
                mc[i] = WT == WT_Q4 ? h2f(b.m[u][i]) + 8.0f * sc[i] : 0.0f;
            }
            if (T == 1) {
                uint4 xv[4];
                load_xchunk(r.xh, c, ncx, xv);
                const float xsum = WT == WT_Q4 ? __ldg(r.xs + c) : 0.0f, xinv = __ldg(r.xc + c);
#pragma unroll
                for (int i = 0; i < RW; ++i) {
                    u32 p[16];
                    if (WT == WT_Q4) q4_decode(b.w[u][i][0], p);
                    else q8_decode(b.w[u][i][0], b.w[u][i][NL - 1], p);
                    const float d = dot16(p, xv);
                    acc[i][0] += (WT == WT_Q4 ? sc[i] * d + mc[i] * xsum : sc[i] * d) * xinv;
                }
            } else {
                u32 p[RW][16];
#pragma unroll
                for (int i = 0; i < RW; ++i) {
                    if (WT == WT_Q4) q4_decode(b.w[u][i][0], p[i]);
                    else q8_decode(b.w[u][i][0], b.w[u][i][NL - 1], p[i]);
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
            for (int i = 0; i < RW; ++i) unpack8(WT, b.w[u][i][0], b.w[u][i][NL - 1], f[i]);
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
            const u8* q = r.q + r.dq[i];
            if (WT == WT_F32) wv = ((const float*)q)[k];
            else if (WT == WT_F16) wv = h2f(((const u16*)q)[k]);
            else wv = bf2f(((const u16*)q)[k]);
#pragma unroll
            for (int t = 0; t < T; ++t) acc[i][t] += wv * r.x32[(i64)t * ldx + k];
        }
    }
}

template <int RW, int T>
__device__ __forceinline__ void zero_acc(float (&acc)[RW][T]) {
#pragma unroll
    for (int i = 0; i < RW; ++i)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[i][t] = 0.0f;
}

// F::EARLY: what a task reads to find its weight rows is settled before the kernel may start (GemvF:
// a graph's descriptors are written before capture), so a warp's first weight loads go out before
// grid_dep() and overlap the previous kernel's tail. Kernels of other F call grid_dep() first.
template <int WT, int T, int RW, int U, int ACT, class F>
__device__ __forceinline__ void run_tasks(F& f, int ntasks, int K, int Kp, int gshift, int ldx, int KX) {
    const int nwarps = gridDim.x * (blockDim.x >> 5);
    int task = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (task >= ntasks) return;          // touches nothing: need not wait
    float acc[RW][T];
    zero_acc(acc);
    typename F::Task cur, nxt;
    Rows<RW> r;
    if (!WTraits<WT>::Q && (K & 7)) {
        if (F::EARLY) grid_dep();
        for (; task < ntasks; task += nwarps) {
            f.task(task, cur);
            f.rows(cur, r);
            if (cur.ok) scalar_rows<WT, T, RW>(r, K, ldx, acc);
            f.done(task, cur, acc);
            zero_acc(acc);
        }
        return;
    }
    const int nc = WTraits<WT>::Q ? (Kp >> 5) : (K >> 3);
    const int ngrp = (nc + 32 * U - 1) / (32 * U);
    Group<WT, RW, U> buf;
    f.task(task, cur);
    f.rows(cur, r);
    stream_load<WT, RW, U>(buf, r, 0, nc, gshift);
    if (F::EARLY) grid_dep();
    int g = 0;
    while (true) {
        int nt = task, ng = g + 1;
        if (ng == ngrp) { nt = task + nwarps; ng = 0; }
        const bool more = nt < ntasks;
        if (more && nt != task) f.task(nt, nxt);    // its slot lookup overlaps the sums
        else nxt = cur;
        f.rows(cur, r);
        stream_compute<WT, T, RW, U, ACT>(buf, r, g, nc, ldx, KX, acc);
        if (more) {
            f.rows(nxt, r);
            stream_load<WT, RW, U>(buf, r, ng, nc, gshift);
        }
        if (ng == 0) {
            f.done(task, cur, acc);
            zero_acc(acc);
        }
        if (!more) break;
        cur = nxt;
        task = nt;
        g = ng;
    }
}
