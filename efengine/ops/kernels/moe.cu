// Mixture-of-experts kernels for decode and small batches: gate+up+SiLU fused, then down, over
// (token, rank) pairs whose experts sit in a slot pool (or one dense expert: shared experts, dense
// FFNs). Built on stream.cuh's row tasks; pasted after common.cuh, dot.cuh and stream.cuh.
// Quantized experts come in two prep formats: fp16 activations (moe_*_q4 / _q8) and int8
// activations (moe_*_q4_i8 / _q8_i8, dp4a; common.cuh).

// Pair p is (token t = p / A, rank a = p % A). Its expert e = ids[p] lives in slot table[e] of
// the pool: the expert's blob starts at pool + slot * stride, and a part's q / s / m at the
// given byte offsets inside the blob. Nothing about routing goes through the host. With
// ids == null the "expert" is dense: pool = its base (or 0 with absolute offsets), pair p is
// token p (shared experts, or one expert's tokens in expert_ffn: then A = 1).
// A slot < 0 or an id outside 0..E-1 sets *err and yields zeros.
__device__ __forceinline__ bool expert_base(const int* ids, const int* table, int E, int* err, int p,
                                            const u8* pool, i64 stride, const u8** base) {
    *base = pool;
    if (ids == nullptr) return true;
    const int e = __ldg(ids + p);
    const int slot = (e >= 0 && e < E) ? __ldg(table + e) : -1;
    if (slot < 0) {
        if (err && (threadIdx.x & 31) == 0) atomicOr(err, 1);
        return false;
    }
    *base = pool + (i64)slot * stride;
    return true;
}

// gate+up fused with SiLU * mul. Task = 2 rows i0, i0 + 1 of h for one pair (4 weight rows:
// gate i0, gate i0+1, up i0, up i0+1). h[p, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t).
// When hxh is given, the warp that finishes the last rows of a chunk of 32 (atomic counter
// cnt[p, chunk], reset by that warp) writes the chunk's xprep (format hact) for the down projection.
struct GateUpF {
    static constexpr bool EARLY = false;         // ids come from the router: grid_dep() first (run_tasks)
    const int* ids; const int* table; int E; int* err; const u8* pool; i64 stride;
    u64 gq, gs, gm, uq, us, um;
    int wt, I, K, Kp, gshift, A, ngroups;
    const float* x32; int ldx; const u16* xh; const float* xs; const float* xc; int KX;
    float* hout; int ldh; u16* hxh; float* hxs; float* hxc; int HKX; int* cnt; int hact;

    struct Task { const u8* base; int i0, t; bool ok; };
    __device__ __forceinline__ void task(int task, Task& k) const {
        const int p = task / ngroups;
        k.i0 = (task % ngroups) * 2;
        k.t = p / A;
        k.ok = expert_base(ids, table, E, err, p, pool, stride, &k.base);
    }
    __device__ __forceinline__ void rows(const Task& k, Rows<4>& r) const {
        const i64 rb = row_bytes(wt, K, Kp), sb = scale_row_bytes(wt, Kp, gshift);
        r.q = k.base + k.i0 * rb;
        r.s = k.base + k.i0 * sb;
        r.run<2>(0, k.i0, I, rb, sb, (i64)gq, (i64)gs, (i64)gm);
        r.run<2>(2, k.i0, I, rb, sb, (i64)uq, (i64)us, (i64)um);
        r.x32 = x32 + (i64)k.t * ldx;
        r.xh = xh + (i64)k.t * KX;
        r.xs = xs + (i64)k.t * (KX >> 5);
        r.xc = xc + (i64)k.t * (KX >> 5);
    }
    __device__ __forceinline__ void done(int task, const Task& k, float (&acc)[4][1]) const {
        const int p = task / ngroups, i0 = (task % ngroups) * 2, lane = threadIdx.x & 31;
        const float g0 = warp_sum(acc[0][0]), g1 = warp_sum(acc[1][0]);
        const float u0 = warp_sum(acc[2][0]), u1 = warp_sum(acc[3][0]);
        if (lane == 0) {
            hout[(i64)p * ldh + i0] = k.ok ? silu_mul1(g0, u0) : 0.0f;
            if (i0 + 1 < I) hout[(i64)p * ldh + i0 + 1] = k.ok ? silu_mul1(g1, u1) : 0.0f;
        }
        if (hxh == nullptr) return;
        const int ch = i0 >> 5, nch = (I + 31) >> 5;
        const int in_chunk = min(32, I - 32 * ch), tasks_in_chunk = (in_chunk + 1) / 2;
        fence_acq_rel();
        int prev = 0;
        if (lane == 0) prev = atomicAdd(cnt + (i64)p * nch + ch, 1);
        prev = __shfl_sync(0xffffffffu, prev, 0);
        if (prev != tasks_in_chunk - 1) return;
        if (lane == 0) cnt[(i64)p * nch + ch] = 0;
        fence_acq_rel();
        const float v = lane < in_chunk ? __ldcg(hout + (i64)p * ldh + 32 * ch + lane) : 0.0f;
        prep_chunk_act(hact, v, hxh + (i64)p * HKX, ch, HKX >> 5, hxs + (i64)p * (HKX >> 5) + ch,
                       hxc + (i64)p * (HKX >> 5) + ch);
    }
};

// y[p, :] = rw[p] * (down_e . h[p]) (rw == null: weight 1); one output row a pair.
template <int RW>
struct DownF {
    static constexpr bool EARLY = false;
    const int* ids; const int* table; int E; int* err; const u8* pool; i64 stride;
    u64 dq, ds, dm;
    int wt, D, K, Kp, gshift, ngroups;
    const float* h32; int ldh; const u16* hxh; const float* hxs; const float* hxc; int HKX;
    const float* rw; float* y; int ldy;

    struct Task { const u8* base; int row0, p; bool ok; };
    __device__ __forceinline__ void task(int task, Task& k) const {
        k.p = task / ngroups;
        k.row0 = (task % ngroups) * RW;
        k.ok = expert_base(ids, table, E, err, k.p, pool, stride, &k.base);
    }
    __device__ __forceinline__ void rows(const Task& k, Rows<RW>& r) const {
        const i64 rb = row_bytes(wt, K, Kp), sb = scale_row_bytes(wt, Kp, gshift);
        r.q = k.base + k.row0 * rb;
        r.s = k.base + k.row0 * sb;
        r.template run<RW>(0, k.row0, D, rb, sb, (i64)dq, (i64)ds, (i64)dm);
        r.x32 = h32 + (i64)k.p * ldh;
        r.xh = hxh + (i64)k.p * HKX;
        r.xs = hxs + (i64)k.p * (HKX >> 5);
        r.xc = hxc + (i64)k.p * (HKX >> 5);
    }
    __device__ __forceinline__ void done(int task, const Task& k, float (&acc)[RW][1]) const {
        const int p = task / ngroups, row0 = (task % ngroups) * RW;
        const float w = rw ? __ldg(rw + p) : 1.0f;
#pragma unroll
        for (int i = 0; i < RW; ++i) {
            const float v = warp_sum(acc[i][0]);
            if ((threadIdx.x & 31) == 0 && row0 + i < D)
                y[(i64)p * ldy + row0 + i] = k.ok ? (rw ? v * w : v) : 0.0f;
        }
    }
};

// ACT: the prep format of x (gate+up) and h (down) for quantized experts; UG / UD: chunk slots a
// lane takes a group; MBG / MBD: blocks an SM, as MB of the GEMVs. hact (gate+up): the format of the
// h prep it writes (that of the down projection's kernel, which may differ from gate+up's type).
#define MOE_INST(WTN, WT, ACT, UG, UD, MBG, MBD) \
    extern "C" __global__ void __launch_bounds__(256, MBG) moe_gateup_##WTN( \
        int ntasks, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 gq, u64 gs, \
        u64 gm, u64 uq, u64 us, u64 um, int I, int K, int Kp, int gshift, int A, const float* x32, int ldx, \
        const u16* xh, const float* xs, const float* xc, int KX, float* hout, int ldh, u16* hxh, float* hxs, \
        float* hxc, int HKX, int* cnt, int hact) { grid_dep(); \
        GateUpF f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.gq = gq; f.gs = gs; f.gm = gm; f.uq = uq; f.us = us; f.um = um; \
        f.wt = WT; f.I = I; f.K = K; f.Kp = Kp; f.gshift = gshift; f.A = A; f.ngroups = (I + 1) / 2; \
        f.x32 = x32; f.ldx = ldx; f.xh = xh; f.xs = xs; f.xc = xc; f.KX = KX; \
        f.hout = hout; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; f.HKX = HKX; f.cnt = cnt; f.hact = hact; \
        run_tasks<WT, 1, 4, UG, ACT>(f, ntasks, K, Kp, gshift, ldx, KX); } \
    extern "C" __global__ void __launch_bounds__(256, MBD) moe_down_##WTN( \
        int ntasks, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 dq, u64 ds, \
        u64 dm, int D, int K, int Kp, int gshift, const float* h32, int ldh, const u16* hxh, const float* hxs, \
        const float* hxc, int HKX, const float* rw, float* y, int ldy) { grid_dep(); \
        DownF<2> f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.dq = dq; f.ds = ds; f.dm = dm; f.wt = WT; f.D = D; f.K = K; f.Kp = Kp; f.gshift = gshift; \
        f.ngroups = (D + 1) / 2; f.h32 = h32; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; f.HKX = HKX; \
        f.rw = rw; f.y = y; f.ldy = ldy; \
        run_tasks<WT, 1, 2, UD, ACT>(f, ntasks, K, Kp, gshift, ldh, HKX); }
MOE_INST(f32, WT_F32, ACT_F16, 1, 1, 4, 0)
MOE_INST(f16, WT_F16, ACT_F16, 1, 2, 4, 0)
MOE_INST(bf16, WT_BF16, ACT_F16, 1, 2, 0, 0)
MOE_INST(q4, WT_Q4, ACT_F16, 1, 2, 3, 3)
MOE_INST(q8, WT_Q8, ACT_F16, 1, 1, 3, 4)
MOE_INST(q4_i8, WT_Q4, ACT_I8, 1, 2, 4, 4)
MOE_INST(q8_i8, WT_Q8, ACT_I8, 1, 1, 3, 5)
