// Mixture-of-experts kernels for decode and small batches: gate+up+SiLU fused, then down, over
// (token, rank) pairs whose experts sit in a slot pool (or one dense expert: shared experts, dense
// FFNs). Built on stream.cuh's row tasks; pasted after common.cuh, dot.cuh and stream.cuh.
// Quantized experts come in two prep formats: fp16 activations (moe_*_q4 / _q8) and int8
// activations (moe_*_q4_i8 / _q8_i8, dp4a; common.cuh).

__device__ __forceinline__ void fence_acq_rel_cta() { asm volatile("fence.acq_rel.cta;" ::: "memory"); }

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

// gate+up fused with SiLU * mul. Task = H rows i0 .. i0 + H - 1 of h for one pair (2H weight rows:
// gate i0.., then up i0..). h[p, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t).
// When hxh is given, the warp that finishes the last rows of a chunk of 32 writes the chunk's
// xprep (format hact) for the down projection. Which warp is last is counted in one of two ways:
//  - in the block (sh given, 32 / H warps a block, 32 | I): a block's tasks of one round (task /
//    warps of the grid) are then exactly one chunk of one pair, so its warps leave their h values
//    in shared memory and count themselves there (round r: sh->h[r], sh->cnt[r]); block-scope fence
//    and a shared atomic. Its device-scope twin below cost 9% of the kernel (H100, Mixtral experts:
//    53.5 us, 48.8 us with no prep at all);
//  - else in global memory: atomic counter cnt[p, chunk] (reset by the last warp, for graph
//    replays) after a device-scope fence, and the last warp reads the chunk back from hout.
#define GU_ROUNDS 32            // rounds counted in the block; later ones (long batches) go global
struct GuShared { float h[GU_ROUNDS][32]; int cnt[GU_ROUNDS]; };

template <int H>
struct GateUpF {
    static constexpr bool EARLY = false;         // ids come from the router: grid_dep() first (run_tasks)
    const int* ids; const int* table; int E; int* err; const u8* pool; i64 stride;
    u64 gq, gs, gm, uq, us, um;
    int wt, I, K, Kp, gshift, A, ngroups;
    const float* x32; int ldx; const u16* xh; const float* xs; const float* xc; int KX;
    float* hout; int ldh; u16* hxh; float* hxs; float* hxc; int HKX; int* cnt; int hact;
    GuShared* sh;

    struct Task { const u8* base; int i0, t; bool ok; };
    __device__ __forceinline__ void task(int task, Task& k) const {
        const int p = task / ngroups;
        k.i0 = (task % ngroups) * H;
        k.t = p / A;
        k.ok = expert_base(ids, table, E, err, p, pool, stride, &k.base);
    }
    __device__ __forceinline__ void rows(const Task& k, Rows<2 * H>& r) const {
        const i64 rb = row_bytes(wt, K, Kp), sb = scale_row_bytes(wt, Kp, gshift);
        r.q = k.base + k.i0 * rb;
        r.s = k.base + k.i0 * sb;
        r.template run<H>(0, k.i0, I, rb, sb, (i64)gq, (i64)gs, (i64)gm);
        r.template run<H>(H, k.i0, I, rb, sb, (i64)uq, (i64)us, (i64)um);
        r.x32 = x32 + (i64)k.t * ldx;
        r.xh = xh + (i64)k.t * KX;
        r.xs = xs + (i64)k.t * (KX >> 5);
        r.xc = xc + (i64)k.t * (KX >> 5);
    }
    __device__ __forceinline__ void done(int task, const Task& k, float (&acc)[2 * H][1]) const {
        const int p = task / ngroups, i0 = (task % ngroups) * H, lane = threadIdx.x & 31;
        float mine = 0.0f;                       // lane j < H: row i0 + j (for the shared-memory count)
#pragma unroll
        for (int j = 0; j < H; ++j) {
            const float g = warp_sum(acc[j][0]), u = warp_sum(acc[H + j][0]);
            const float hv = k.ok ? silu_mul1(g, u) : 0.0f;
            if (lane == j) mine = hv;
            if (lane == 0 && i0 + j < I) hout[(i64)p * ldh + i0 + j] = hv;
        }
        if (hxh == nullptr) return;
#ifdef MOE_NOPREP
        return;                                  // timing experiments only: h's prep is left stale
#endif
        const int ch = i0 >> 5, nch = (I + 31) >> 5, warps = blockDim.x >> 5;
        const int round = task / (gridDim.x * warps);
        if (sh != nullptr && warps * H == 32 && (I & 31) == 0 && round < GU_ROUNDS) {
            if (lane < H) sh->h[round][(i0 & 31) + lane] = mine;
            fence_acq_rel_cta();
            int prev = 0;
            if (lane == 0) prev = atomicAdd(&sh->cnt[round], 1);
            if (__shfl_sync(0xffffffffu, prev, 0) != warps - 1) return;
            fence_acq_rel_cta();
            const float v = ((volatile float*)sh->h[round])[lane];
            prep_chunk_act(hact, v, hxh + (i64)p * HKX, ch, HKX >> 5, hxs + (i64)p * (HKX >> 5) + ch,
                           hxc + (i64)p * (HKX >> 5) + ch);
            return;
        }
        const int in_chunk = min(32, I - 32 * ch), tasks_in_chunk = (in_chunk + H - 1) / H;
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

// ACT: the prep format of x (gate+up) and h (down) for quantized experts; H: rows of h a gate+up
// task, RWD: rows of y a down task (both divide 32); UG / UD: chunk slots a lane takes a group;
// TG: threads of a gate+up block (with TG = 1024 / H, i.e. 32 / H warps, the block counts h's
// chunks itself: GateUpF); MBG / MBD: blocks an SM, as MB of the GEMVs. hact (gate+up): the format
// of the h prep it writes (that of the down projection's kernel, which may differ from gate+up's
// type). P: (token, rank) pairs; a launch's tasks are P times a pair's.
#define MOE_INST(WTN, WT, ACT, H, UG, TG, MBG, RWD, UD, MBD) \
    extern "C" __global__ void __launch_bounds__(TG, MBG) moe_gateup_##WTN( \
        int P, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 gq, u64 gs, \
        u64 gm, u64 uq, u64 us, u64 um, int I, int K, int Kp, int gshift, int A, const float* x32, int ldx, \
        const u16* xh, const float* xs, const float* xc, int KX, float* hout, int ldh, u16* hxh, float* hxs, \
        float* hxc, int HKX, int* cnt, int hact) { grid_dep(); \
        __shared__ GuShared sh; \
        for (int i = threadIdx.x; i < GU_ROUNDS; i += blockDim.x) sh.cnt[i] = 0; \
        __syncthreads(); \
        GateUpF<H> f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.gq = gq; f.gs = gs; f.gm = gm; f.uq = uq; f.us = us; f.um = um; \
        f.wt = WT; f.I = I; f.K = K; f.Kp = Kp; f.gshift = gshift; f.A = A; f.ngroups = (I + H - 1) / H; \
        f.x32 = x32; f.ldx = ldx; f.xh = xh; f.xs = xs; f.xc = xc; f.KX = KX; \
        f.hout = hout; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; f.HKX = HKX; f.cnt = cnt; f.hact = hact; \
        f.sh = &sh; \
        run_tasks<WT, 1, 2 * H, UG, ACT>(f, P * f.ngroups, K, Kp, gshift, ldx, KX); } \
    extern "C" __global__ void __launch_bounds__(256, MBD) moe_down_##WTN( \
        int P, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 dq, u64 ds, \
        u64 dm, int D, int K, int Kp, int gshift, const float* h32, int ldh, const u16* hxh, const float* hxs, \
        const float* hxc, int HKX, const float* rw, float* y, int ldy) { grid_dep(); \
        DownF<RWD> f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.dq = dq; f.ds = ds; f.dm = dm; f.wt = WT; f.D = D; f.K = K; f.Kp = Kp; f.gshift = gshift; \
        f.ngroups = (D + RWD - 1) / RWD; f.h32 = h32; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; \
        f.HKX = HKX; f.rw = rw; f.y = y; f.ldy = ldy; \
        run_tasks<WT, 1, RWD, UD, ACT>(f, P * f.ngroups, K, Kp, gshift, ldh, HKX); }
// the int8-activation q4 kernels' shape, overridable (-D) for tuning runs
#ifndef MOE_Q4I8
#define MOE_Q4I8 2, 1, 512, 2, 4, 1, 4
#endif
#define MOE_INST_(...) MOE_INST(__VA_ARGS__)     // expands MOE_Q4I8 into its arguments
MOE_INST(f32, WT_F32, ACT_F16, 2, 1, 256, 4, 2, 1, 0)
MOE_INST(f16, WT_F16, ACT_F16, 2, 1, 256, 4, 2, 2, 0)
MOE_INST(bf16, WT_BF16, ACT_F16, 2, 1, 256, 0, 2, 2, 0)
MOE_INST(q4, WT_Q4, ACT_F16, 2, 1, 256, 3, 2, 2, 3)
MOE_INST(q8, WT_Q8, ACT_F16, 2, 1, 256, 3, 2, 1, 4)
MOE_INST_(q4_i8, WT_Q4, ACT_I8, MOE_Q4I8)
MOE_INST(q8_i8, WT_Q8, ACT_I8, 2, 1, 256, 3, 2, 1, 5)
