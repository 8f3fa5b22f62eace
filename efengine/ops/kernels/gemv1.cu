// One-token (decode) matrix-vector products on quantized weights with the activations held in
// registers ("x-resident") and the weights streamed through a shared-memory ring by cp.async.
// Pasted after common.cuh, dot.cuh, stream.cuh and gemv.cu.
//
// Why: a GEMV reads each weight byte once, so its speed is the bytes in flight per SM (Little's
// law: ~3 TB/s x ~1.5 us of loaded latency / 132 SMs, about 40 KB). The row stream of stream.cuh
// holds its loads in registers (102 a thread -> 16 warps, ~32 KB in flight: ~45-50% of the read
// bandwidth on q4) and re-reads the token's prepared x from L1 for every pair of rows. Here
//   block = KS warps; warp w owns the K-slice of chunks [w * 32 * X1_CPL, (w + 1) * 32 * X1_CPL),
//           lane l the X1_CPL consecutive chunks c0 = (w * 32 + l) * X1_CPL ..; a lane keeps the
//           prepared x of its chunks in registers for as long as the x row (token / pair) holds
//   task  = 2 * spt output values of one x row: spt steps of 2 weight rows each. Every warp dots
//           its slice of the step's 2 rows, lane 0 of each warp leaves the two slice sums in
//           shared memory; after the task's last step the block adds the KS slices in a fixed
//           order (no atomics: the same bits on every run) and the functor writes the values.
//   ring  = X1_STAGES steps a warp in shared memory: the codes, scales and mins of step i + 3
//           are copied (cp.async, no registers held) while step i is decoded, across task
//           boundaries too; a lane reads back the 16-byte pieces it copied itself, the scales
//           and mins (copied 4 bytes at a time by the first lanes) after a __syncwarp.
//   grid  = persistent; block b takes the contiguous tasks [b * n / grid, (b + 1) * n / grid), so
//           the x row changes rarely.
// Scale rows must hold an even number of groups (checked by the launcher), so 4-byte copies of
// scale pairs stay aligned. Chunks, codes, x planes and chunk arithmetic are those of dot.cuh.
//
// The functor F supplies
//   Ctx                               what a task needs to find its rows (a few registers)
//   begin(task, Ctx&)                 fill it; Ctx.key = the x row (token or pair), Ctx.ok
//   row(const Ctx&, step, i, q, s, m) the pointers of weight row i (0, 1) of a step
//   x(key, xh, xs, xc)                the prepared activations of an x row
//   done(task, const Ctx&, red)       red[v], v < 2 * spt: the task's finished values (warp 0)

#define X1_CPL 2                  // chunks a lane (64 values)
#define X1_MAX_KS 8               // warps a block: K up to 8 * 32 * X1_CPL * 32 = 16384
#ifndef X1_STAGES
#define X1_STAGES 4               // ring depth: 3 steps in flight while one is decoded
#endif
#define X1_SM_BYTES 128           // scales (or mins) of one row of a warp's slice, at most

template <int WT>
struct X1Stage {                  // one step of one warp in shared memory
    static constexpr int CB = WT == WT_Q4 ? 16 : 32, NL = CB / 16;
    static constexpr int CODE_BYTES = 2 * X1_CPL * NL * 512;    // [row][chunk j][piece][lane] 16 B
    static constexpr int BYTES = CODE_BYTES + 2 * 2 * X1_SM_BYTES;
};

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

// issue the copies of one step (2 rows) into a stage: codes of this lane's chunks, and the
// scale / min pairs of the warp's slice (lane k < npairs copies pair k of s, then of m)
template <int WT, class F>
__device__ __forceinline__ void x1_issue(u8* st, const F& f, const typename F::Ctx& ctx, int step, int c0,
                                         int nc, int g0, int G, int gshift) {
    constexpr int CB = X1Stage<WT>::CB, NL = X1Stage<WT>::NL;
    const int lane = threadIdx.x & 31;
    const int npairs = ((32 * X1_CPL) >> gshift) >> 1;          // scale pairs of a slice row
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const u8* q; const u16* s; const u16* m;
        f.row(ctx, step, i, q, s, m);
#pragma unroll
        for (int j = 0; j < X1_CPL; ++j) {
            if (c0 + j < nc) {
#pragma unroll
                for (int l = 0; l < NL; ++l)
                    cp_async16(st + (((i * X1_CPL + j) * NL + l) << 9) + 16 * lane, q + (i64)(c0 + j) * CB + 16 * l);
            }
        }
        u8* sm = st + X1Stage<WT>::CODE_BYTES + i * 2 * X1_SM_BYTES;
        if (lane < npairs && g0 + 2 * lane < G) {
            cp_async4(sm + 4 * lane, s + g0 + 2 * lane);
            if (WT == WT_Q4) cp_async4(sm + X1_SM_BYTES + 4 * lane, m + g0 + 2 * lane);
        }
    }
}

// this lane's share of row i's dot product, from a stage, with the x in registers
template <int WT>
__device__ __forceinline__ float x1_dot(const u8* st, int i, const uint4 (&x)[X1_CPL][4], const float (&xs)[X1_CPL],
                                        const float (&xc)[X1_CPL], int c0, int nc, int g0, int gshift) {
    constexpr int NL = X1Stage<WT>::NL;
    const int lane = threadIdx.x & 31;
    const u16* sm = (const u16*)(st + X1Stage<WT>::CODE_BYTES + i * 2 * X1_SM_BYTES);
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < X1_CPL; ++j) {
        if (c0 + j < nc) {
            uint4 w[NL];
#pragma unroll
            for (int l = 0; l < NL; ++l) w[l] = *(const uint4*)(st + (((i * X1_CPL + j) * NL + l) << 9) + 16 * lane);
            u32 p[16];
            if (WT == WT_Q4) q4_decode(w[0], p);
            else q8_decode(w[0], w[NL - 1], p);
            const float d = dot16(p, x[j]);
            const int g = ((c0 + j) >> gshift) - g0;
            const float sc = h2f(sm[g]);
            const float part = WT == WT_Q4 ? sc * d + (h2f(sm[X1_SM_BYTES / 2 + g]) + 8.0f * sc) * xs[j] : sc * d;
            acc += part * xc[j];
        }
    }
    return acc;
}

template <int WT, class F>
__device__ __forceinline__ void x1_run(const F& f, int ntasks, int spt, int nc, int gshift, int KX) {
    extern __shared__ __align__(16) u8 x1_ring[];        // [KS warps][X1_STAGES][stage bytes]
    __shared__ float part[X1_MAX_KS][64];
    __shared__ float red[64];
    const int KS = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int c0 = (w * 32 + lane) * X1_CPL, ncx = KX >> 5;
    const int g0 = (w * 32 * X1_CPL) >> gshift;          // first group of the warp's slice (even)
    const int G = (nc << 5) >> (gshift + 5);             // groups a row
    const int t0 = (int)((i64)ntasks * blockIdx.x / gridDim.x);
    const int t1 = (int)((i64)ntasks * (blockIdx.x + 1) / gridDim.x);
    if (t0 >= t1) return;                                 // uniform over the block
    u8* ring = x1_ring + (i64)w * X1_STAGES * X1Stage<WT>::BYTES;
    // issue side: (itask, istep) runs X1_STAGES - 1 steps ahead of the compute side
    typename F::Ctx ictx, cur;
    int itask = t0, istep = 0;
    f.begin(itask, ictx);
#pragma unroll
    for (int k = 0; k < X1_STAGES - 1; ++k) {
        if (itask < t1) {
            x1_issue<WT>(ring + k * X1Stage<WT>::BYTES, f, ictx, istep, c0, nc, g0, G, gshift);
            if (++istep == spt) { istep = 0; if (++itask < t1) f.begin(itask, ictx); }
        }
        cp_async_commit();
    }
    uint4 x[X1_CPL][4];
    float xs[X1_CPL], xc[X1_CPL];
    int key = -1, task = t0, step = 0, stage = 0;
    f.begin(task, cur);
    while (true) {
        if (itask < t1) {                                 // the step X1_STAGES - 1 ahead
            x1_issue<WT>(ring + ((stage + X1_STAGES - 1) % X1_STAGES) * X1Stage<WT>::BYTES, f, ictx, istep, c0,
                         nc, g0, G, gshift);
            if (++istep == spt) { istep = 0; if (++itask < t1) f.begin(itask, ictx); }
        }
        cp_async_commit();
        if (cur.key != key) {                             // a new x row: its chunks into registers
            key = cur.key;
            const u16* xh; const float* xsum; const float* xinv;
            f.x(key, xh, xsum, xinv);
#pragma unroll
            for (int j = 0; j < X1_CPL; ++j) {
                const int c = c0 + j;
                if (c < nc) {
                    load_xchunk(xh, c, ncx, x[j]);
                    xs[j] = WT == WT_Q4 ? __ldg(xsum + c) : 0.0f;
                    xc[j] = __ldg(xinv + c);
                }
            }
        }
        cp_async_wait<X1_STAGES - 1>();                   // this step's group has landed
        __syncwarp();
        const u8* st = ring + stage * X1Stage<WT>::BYTES;
        const float v0 = warp_sum(x1_dot<WT>(st, 0, x, xs, xc, c0, nc, g0, gshift));
        const float v1 = warp_sum(x1_dot<WT>(st, 1, x, xs, xc, c0, nc, g0, gshift));
        __syncwarp();                                     // the stage may be refilled next trip
        if (lane == 0) { part[w][2 * step] = v0; part[w][2 * step + 1] = v1; }
        stage = (stage + 1) % X1_STAGES;
        if (++step == spt) {                              // the task's last step
            __syncthreads();
            for (int v = threadIdx.x; v < 2 * spt; v += blockDim.x) {
                float sum = part[0][v];
                for (int k = 1; k < KS; ++k) sum = sum + part[k][v];
                red[v] = sum;
            }
            __syncthreads();
            if (w == 0) f.done(task, cur, red);
            step = 0;
            if (++task >= t1) break;
            f.begin(task, cur);
        }
    }
    cp_async_wait<0>();
}

// ---- dense: y[n] (+)= W[n, :] . x (+ bias[n]) for the matrices of a gemv_desc ------------------
// A task is 2 * spt consecutive rows of one matrix; step s holds rows 2 s and 2 s + 1.
struct X1Dense {
    struct Ctx { const u64* d; int row0, N, key; bool ok; };
    const u64* desc; int nmat, spt, Kp, gshift, wt;
    const u16* xh; const float* xs; const float* xc;

    __device__ __forceinline__ void begin(int task, Ctx& c) const {
        int m = 0, t = task;
        for (; m < nmat - 1; ++m) {
            const int n = ((int)__ldg(desc + 8 * m + 5) + 2 * spt - 1) / (2 * spt);
            if (t < n) break;
            t -= n;
        }
        c.d = desc + 8 * m;
        c.row0 = t * 2 * spt;
        c.N = (int)__ldg(c.d + 5);
        c.key = 0;
        c.ok = true;
    }
    __device__ __forceinline__ void row(const Ctx& c, int step, int i, const u8*& q, const u16*& s,
                                        const u16*& m) const {
        const int r = min(c.row0 + 2 * step + i, c.N - 1);
        const int G = Kp >> (gshift + 5);
        q = (const u8*)__ldg(c.d) + (i64)r * row_bytes(wt, Kp, Kp);
        s = (const u16*)__ldg(c.d + 1) + (i64)r * G;
        m = (const u16*)__ldg(c.d + 2) + (i64)r * G;
    }
    __device__ __forceinline__ void x(int, const u16*& h, const float*& sum, const float*& inv) const {
        h = xh; sum = xs; inv = xc;
    }
    __device__ __forceinline__ void done(int, const Ctx& c, const float* red) const {
        float* y = (float*)__ldg(c.d + 3);
        const float* bias = (const float*)__ldg(c.d + 4);
        const bool add = (__ldg(c.d + 7) & 1ull) != 0ull;
        for (int v = threadIdx.x & 31; v < 2 * spt; v += 32) {
            const int r = c.row0 + v;
            if (r < c.N) {
                float o = red[v];
                if (bias) o = o + bias[r];
                y[r] = add ? y[r] + o : o;
            }
        }
    }
};

extern "C" __global__ void __launch_bounds__(32 * X1_MAX_KS)
gemv1_q4(const u64* desc, int nmat, int ntasks, int spt, int Kp, int gshift, const u16* xh, const float* xs,
         const float* xc, int KX) {
    X1Dense f{desc, nmat, spt, Kp, gshift, WT_Q4, xh, xs, xc};
    x1_run<WT_Q4>(f, ntasks, spt, Kp >> 5, gshift, KX);
}
extern "C" __global__ void __launch_bounds__(32 * X1_MAX_KS)
gemv1_q8(const u64* desc, int nmat, int ntasks, int spt, int Kp, int gshift, const u16* xh, const float* xs,
         const float* xc, int KX) {
    X1Dense f{desc, nmat, spt, Kp, gshift, WT_Q8, xh, xs, xc};
    x1_run<WT_Q8>(f, ntasks, spt, Kp >> 5, gshift, KX);
}

// ---- MoE: the pairs p = (token p / A, rank p % A) of a step, experts found through the slot table
// (expert_base in gemv.cu). Part offsets (q / s / m inside a blob) are kernel arguments.
struct X1Expert {
    const int* ids; const int* table; int E; int* err; const u8* pool; i64 stride;
    int Kp, gshift, wt, A;
    const u16* xh; const float* xs; const float* xc; int KX;

    __device__ __forceinline__ const u8* base(int p, bool& ok) const {
        const u8* b;
        ok = expert_base(ids, table, E, err, p, pool, stride, &b);
        return b;
    }
    __device__ __forceinline__ void rowp(const u8* b, u64 oq, u64 os, u64 om, int r, const u8*& q,
                                         const u16*& s, const u16*& m) const {
        const int G = Kp >> (gshift + 5);
        q = b + oq + (i64)r * row_bytes(wt, Kp, Kp);
        s = (const u16*)(b + os) + (i64)r * G;
        m = (const u16*)(b + om) + (i64)r * G;
    }
    __device__ __forceinline__ void xrow(int key, const u16*& h, const float*& sum, const float*& inv) const {
        const int ncx = KX >> 5;
        h = xh + (i64)key * KX; sum = xs + (i64)key * ncx; inv = xc + (i64)key * ncx;
    }
};

// gate + up fused with SiLU * mul: a task is 32 rows i0 .. i0 + 31 of h for one pair (spt = 32:
// step s holds gate row i0 + s and up row i0 + s), so a task is exactly one chunk of the down
// projection's input and writes its xprep itself (no cross-block counters).
struct X1GateUp {
    struct Ctx { const u8* b; int p, i0, key; bool ok; };
    X1Expert e;
    u64 gq, gs, gm, uq, us, um;
    int I, ngroups;
    float* hout; int ldh; u16* hxh; float* hxs; float* hxc; int HKX;

    __device__ __forceinline__ void begin(int task, Ctx& c) const {
        c.p = task / ngroups;
        c.i0 = (task % ngroups) * 32;
        c.key = c.p / e.A;
        c.b = e.base(c.p, c.ok);
        if (!c.ok) c.b = e.pool;                          // read something valid; done() writes zeros
    }
    __device__ __forceinline__ void row(const Ctx& c, int step, int i, const u8*& q, const u16*& s,
                                        const u16*& m) const {
        const int r = min(c.i0 + step, I - 1);
        if (i == 0) e.rowp(c.b, gq, gs, gm, r, q, s, m);
        else e.rowp(c.b, uq, us, um, r, q, s, m);
    }
    __device__ __forceinline__ void x(int key, const u16*& h, const float*& sum, const float*& inv) const {
        e.xrow(key, h, sum, inv);
    }
    __device__ __forceinline__ void done(int, const Ctx& c, const float* red) const {
        const int lane = threadIdx.x & 31, i = c.i0 + lane;
        const float v = (i < I && c.ok) ? silu_mul1(red[2 * lane], red[2 * lane + 1]) : 0.0f;
        if (i < I) hout[(i64)c.p * ldh + i] = v;
        if (hxh != nullptr) {
            const int ncx = HKX >> 5, ch = c.i0 >> 5;
            prep_chunk(v, hxh + (i64)c.p * HKX, ch, ncx, hxs + (i64)c.p * ncx + ch, hxc + (i64)c.p * ncx + ch);
        }
    }
};

// y[p, :] = rw[p] * (down_e . h[p]); a task is 2 * spt rows of one pair's output
struct X1Down {
    struct Ctx { const u8* b; int p, row0, key; bool ok; };
    X1Expert e;
    u64 dq, ds, dm;
    int D, ntpp, spt;
    const float* rw; float* y; int ldy;

    __device__ __forceinline__ void begin(int task, Ctx& c) const {
        c.p = task / ntpp;
        c.row0 = (task % ntpp) * 2 * spt;
        c.key = c.p;
        c.b = e.base(c.p, c.ok);
        if (!c.ok) c.b = e.pool;
    }
    __device__ __forceinline__ void row(const Ctx& c, int step, int i, const u8*& q, const u16*& s,
                                        const u16*& m) const {
        e.rowp(c.b, dq, ds, dm, min(c.row0 + 2 * step + i, D - 1), q, s, m);
    }
    __device__ __forceinline__ void x(int key, const u16*& h, const float*& sum, const float*& inv) const {
        e.xrow(key, h, sum, inv);
    }
    __device__ __forceinline__ void done(int, const Ctx& c, const float* red) const {
        const float wt = rw ? __ldg(rw + c.p) : 1.0f;
        for (int v = threadIdx.x & 31; v < 2 * spt; v += 32) {
            const int r = c.row0 + v;
            if (r < D) y[(i64)c.p * ldy + r] = c.ok ? (rw ? red[v] * wt : red[v]) : 0.0f;
        }
    }
};

#define X1_MOE_INST(WTN, WT) \
    extern "C" __global__ void __launch_bounds__(32 * X1_MAX_KS) moe1_gateup_##WTN( \
        int ntasks, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 gq, u64 gs, \
        u64 gm, u64 uq, u64 us, u64 um, int I, int Kp, int gshift, int A, const u16* xh, const float* xs, \
        const float* xc, int KX, float* hout, int ldh, u16* hxh, float* hxs, float* hxc, int HKX) { \
        X1GateUp f{{ids, table, E, err, pool, stride, Kp, gshift, WT, A, xh, xs, xc, KX}, \
                   gq, gs, gm, uq, us, um, I, (I + 31) / 32, hout, ldh, hxh, hxs, hxc, HKX}; \
        x1_run<WT>(f, ntasks, 32, Kp >> 5, gshift, KX); } \
    extern "C" __global__ void __launch_bounds__(32 * X1_MAX_KS) moe1_down_##WTN( \
        int ntasks, int spt, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, \
        u64 dq, u64 ds, u64 dm, int D, int Kp, int gshift, const u16* hxh, const float* hxs, const float* hxc, \
        int HKX, const float* rw, float* y, int ldy) { \
        X1Down f{{ids, table, E, err, pool, stride, Kp, gshift, WT, 1, hxh, hxs, hxc, HKX}, \
                 dq, ds, dm, D, (D + 2 * spt - 1) / (2 * spt), spt, rw, y, ldy}; \
        x1_run<WT>(f, ntasks, spt, Kp >> 5, gshift, HKX); }
X1_MOE_INST(q4, WT_Q4)
X1_MOE_INST(q8, WT_Q8)
