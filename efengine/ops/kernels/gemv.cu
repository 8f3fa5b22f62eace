// Matrix-vector products for decode and small batches (T <= 8), reading weights straight from
// their stored layout, plus the kernels that feed them (rows_prep) and the MoE and router
// kernels built on the same row dot products (dot.cuh). Pasted after common.cuh and dot.cuh.

#define PREP_TARGET_EXP 4   // a chunk's largest |x| is scaled into [2^(E-1), 2^E) = [8, 16)

// One warp: the xprep of one chunk of 32 values; lane j holds value j of the chunk.
__device__ __forceinline__ void prep_chunk(float v, u16* xh_chunk, float* xs_c, float* xc_c) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(v));
    int e = 0;
    frexpf(amax, &e);                                    // amax = f * 2^e, f in [0.5, 1)
    const bool ok = amax > 0.0f && amax <= 3.0e38f;      // zero, inf and NaN chunks keep scale 1
    const float scale = ok ? ldexpf(1.0f, PREP_TARGET_EXP - e) : 1.0f;
    const u16 hv = f2h(v * scale);
    const float sum = warp_sum(h2f(hv));
    const int i = lane & 7;
    const int pos = (lane & ~7) | (i < 4 ? 2 * i : 2 * (i - 4) + 1);   // x0 x4 x1 x5 x2 x6 x3 x7
    xh_chunk[pos] = hv;
    if (lane == 0) {
        *xs_c = sum;
        *xc_c = ok ? ldexpf(1.0f, e - PREP_TARGET_EXP) : 1.0f;
    }
}

// One block per row r of h [R, ldh] (K values used), in order:
//  1. residual update (when ybuf or add2): h += ((ybuf[r,0] + ... + ybuf[r,A-1]) + sigmoid(g[r]) * add2[r])
//     (rank order, as NumpyBackend.moe_combine then `out + shared`; ybuf rows are already weighted)
//  2. RMSNorm (when nw): x32[r] = nw * (h * (1 / sqrt(mean(h^2) + eps)))
//  3. xprep (when xh) of x32[r] (normed) or h[r] (not normed): xh [R, KX], xs / xc [R, KX/32]
extern "C" __global__ void __launch_bounds__(256)
rows_prep(float* h, int ldh, int K, const float* ybuf, int A, const float* add2, const float* add2_gate,
          const float* nw, float eps, float* x32, u16* xh, float* xs, float* xc, int KX) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    float* hr = h + (i64)r * ldh;
    const bool upd = ybuf != nullptr || add2 != nullptr;
    if (upd || nw != nullptr) {
        const float gsc = add2_gate ? sigmoid1(add2_gate[r]) : 1.0f;
        float ss = 0.0f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            float v = hr[k];
            if (upd) {
                float acc = 0.0f;
                if (ybuf) {
                    const float* yb = ybuf + (i64)r * A * K + k;
                    acc = yb[0];
                    for (int a = 1; a < A; ++a) acc = acc + yb[(i64)a * K];
                }
                if (add2) {
                    const float s2 = add2_gate ? gsc * add2[(i64)r * K + k] : add2[(i64)r * K + k];
                    acc = ybuf ? acc + s2 : s2;
                }
                v = v + acc;
                hr[k] = v;
            }
            ss += v * v;
        }
        if (nw) {
            ss = block_sum(ss, red);
            const float inv = 1.0f / sqrtf(ss / (float)K + eps);
            float* xr = x32 + (i64)r * K;
            for (int k = threadIdx.x; k < K; k += blockDim.x) xr[k] = nw[k] * (hr[k] * inv);
        }
    }
    if (xh == nullptr) return;
    __syncthreads();      // the prep reads values other threads of this block wrote
    const float* src = nw ? x32 + (i64)r * K : hr;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int ncx = KX >> 5;
    for (int c = warp; c < ncx; c += nwarps) {
        const int k = (c << 5) + lane;
        const float v = k < K ? src[k] : 0.0f;
        prep_chunk(v, xh + (i64)r * KX + (c << 5), xs + (i64)r * ncx + c, xc + (i64)r * ncx + c);
    }
}

// ---- dense GEMV: y[t, n] (+)= W[n, :] . x[t, :] (+ bias[n]) for several matrices at once -------
// desc: 8 u64 per matrix (blockIdx.y): q, s, m, y, bias (0 = none), N, ldy, flags (1 = add into y).
// All matrices of one launch share the weight type, K, Kp and group. 8 warps a block, RW rows a warp.
template <int WT, int T, int RW, int U>
__device__ __forceinline__ void gemv_body(const u64* __restrict__ desc, int K, int Kp, int gshift,
                                          const float* x32, int ldx, const u16* xh, const float* xs,
                                          const float* xc, int KX) {
    const u64* d = desc + 8 * blockIdx.y;
    const int N = (int)d[5];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * RW;
    if (row0 >= N) return;
    const u8* qr[RW]; const u16* sr[RW]; const u16* mr[RW];
    row_ptrs<RW>(WT, (const u8*)d[0], (const u16*)d[1], (const u16*)d[2], row0, N, K, Kp, gshift, qr, sr, mr);
    float acc[RW][T];
#pragma unroll
    for (int r = 0; r < RW; ++r)
#pragma unroll
        for (int t = 0; t < T; ++t) acc[r][t] = 0.0f;
    dot_rows<WT, T, RW, U>(qr, sr, mr, K, Kp, gshift, x32, ldx, xh, xs, xc, KX, acc);
    float* y = (float*)d[3];
    const float* bias = (const float*)d[4];
    const int ldy = (int)d[6];
    const bool add = (d[7] & 1ull) != 0ull;
#pragma unroll
    for (int r = 0; r < RW; ++r) {
#pragma unroll
        for (int t = 0; t < T; ++t) {
            float v = warp_sum(acc[r][t]);
            const int row = row0 + r;
            if (lane == 0 && row < N) {
                if (bias) v = v + bias[row];
                float* o = y + (i64)t * ldy + row;
                *o = add ? *o + v : v;
            }
        }
    }
}

#define GEMV_ARGS const u64* desc, int K, int Kp, int gshift, const float* x32, int ldx, const u16* xh, \
                  const float* xs, const float* xc, int KX
#define GEMV_INST(NAME, WT, T, RW, U) \
    extern "C" __global__ void __launch_bounds__(256) NAME(GEMV_ARGS) { \
        gemv_body<WT, T, RW, U>(desc, K, Kp, gshift, x32, ldx, xh, xs, xc, KX); }
#define GEMV_ALL_T(WTN, WT) \
    GEMV_INST(gemv_##WTN##_t1, WT, 1, 2, 4) GEMV_INST(gemv_##WTN##_t2, WT, 2, 2, 2) \
    GEMV_INST(gemv_##WTN##_t4, WT, 4, 2, 1) GEMV_INST(gemv_##WTN##_t8, WT, 8, 1, 1)
GEMV_ALL_T(f32, WT_F32)
GEMV_ALL_T(f16, WT_F16)
GEMV_ALL_T(bf16, WT_BF16)
GEMV_ALL_T(q4, WT_Q4)
GEMV_ALL_T(q8, WT_Q8)

// ---- routing -------------------------------------------------------------------------------
#define ROUTE_PER_LANE 16      // up to 512 experts
#define ROUTE_MAX_A 32

// One warp routes one token (the numpy reference's route, step for step): softmax over E,
// optional DeepSeek group mask, top-A by probability (ties: lower id), weights (ones |
// renormalized | raw) times scaling. ids / wts get A values in rank order.
__device__ void route_warp(const float* logits, int E, int A, int method, int n_group, int topk_group,
                           int norm, int ones, float scaling, int* ids, float* wts) {
    const int lane = threadIdx.x & 31;
    float p[ROUTE_PER_LANE];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        p[i] = e < E ? logits[e] : -INFINITY;
        mx = fmaxf(mx, p[i]);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i) {
        const int e = lane + 32 * i;
        p[i] = e < E ? expf(p[i] - mx) : 0.0f;
        sum += p[i];
    }
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < ROUTE_PER_LANE; ++i) p[i] = p[i] / sum;
    if (method == 1) {                       // group_limited_greedy; n_group <= 32
        const int gs = E / n_group;
        float mine = -INFINITY;              // lane g holds group g's best probability
        for (int g = 0; g < n_group; ++g) {
            float gm = -INFINITY;
#pragma unroll
            for (int i = 0; i < ROUTE_PER_LANE; ++i) {
                const int e = lane + 32 * i;
                if (e < E && e / gs == g) gm = fmaxf(gm, p[i]);
            }
            gm = warp_max(gm);
            if (lane == g) mine = gm;
        }
        unsigned keep = 0u;
        for (int s = 0; s < topk_group; ++s) {
            float bv = (keep >> lane) & 1u ? -INFINITY : mine;
            int bi = lane < n_group ? lane : 0x7fffffff;
            if (lane >= n_group) bv = -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
                const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
                if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
            }
            keep |= 1u << bi;
        }
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i) {
            const int e = lane + 32 * i;
            if (e < E && !((keep >> (e / gs)) & 1u)) p[i] = 0.0f;
        }
    }
    int my_id = 0;
    float my_w = 0.0f;
    for (int a = 0; a < A; ++a) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i) {
            const int e = lane + 32 * i;
            if (e < E && p[i] > bv) { bv = p[i]; bi = e; }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
#pragma unroll
        for (int i = 0; i < ROUTE_PER_LANE; ++i)
            if (lane + 32 * i == bi) p[i] = -INFINITY;
        if (lane == a) { my_id = bi; my_w = bv; }
    }
    float w = my_w;
    if (ones) {
        w = 1.0f;
    } else if (norm) {
        // numpy's sum of a short row: sequential below 8 values, 8 partial sums and a tree from 8 on
        float s = 0.0f;
        if (A < 8) {
            for (int a = 0; a < A; ++a) s = s + __shfl_sync(0xffffffffu, my_w, a);
        } else {
            float r8[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) r8[j] = __shfl_sync(0xffffffffu, my_w, j);
            const int full = A - A % 8;
            for (int a0 = 8; a0 < full; a0 += 8)
#pragma unroll
                for (int j = 0; j < 8; ++j) r8[j] = r8[j] + __shfl_sync(0xffffffffu, my_w, a0 + j);
            s = ((r8[0] + r8[1]) + (r8[2] + r8[3])) + ((r8[4] + r8[5]) + (r8[6] + r8[7]));
            for (int a = full; a < A; ++a) s = s + __shfl_sync(0xffffffffu, my_w, a);
        }
        w = w / s;
    }
    if (scaling != 1.0f) w = w * scaling;
    if (lane < A) { ids[lane] = my_id; wts[lane] = w; }
}

// logits [T, E] -> ids, wts [T, A]; one warp a token
extern "C" __global__ void route_kernel(const float* logits, int T, int E, int A, int method, int n_group,
                                        int topk_group, int norm, int ones, float scaling, int* ids, float* wts) {
    const int t = blockIdx.x;
    route_warp(logits + (i64)t * E, E, A, method, n_group, topk_group, norm, ones, scaling, ids + t * A, wts + t * A);
}

// The router of an MoE layer for token t = blockIdx.x: E logits (+ the optional one-row
// shared-expert gate `xq`), then warp 0 routes. logits_out [T, E] and extra_out [T] may be null.
template <int WT>
__device__ __forceinline__ void router_body(const u8* q, const u16* s, const u16* m, const u8* xq, const u16* xs_,
                                            const u16* xm, int K, int Kp, int gshift,
                                            const float* x32, int ldx, const u16* xh, const float* xs,
                                            const float* xc, int KX, float* logits_out, float* extra_out,
                                            int E, int A, int method, int n_group, int topk_group, int norm,
                                            int ones, float scaling, int* ids, float* wts) {
    __shared__ float lg[ROUTE_PER_LANE * 32];
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int ncx = KX >> 5;
    const int rows = E + (xq ? 1 : 0);
    for (int row = warp; row < rows; row += nwarps) {
        const u8* qr[1]; const u16* sr[1]; const u16* mr[1];
        if (row < E) row_ptrs<1>(WT, q, s, m, row, E, K, Kp, gshift, qr, sr, mr);
        else row_ptrs<1>(WT, xq, xs_, xm, 0, 1, K, Kp, gshift, qr, sr, mr);
        float acc[1][1] = {{0.0f}};
        dot_rows<WT, 1, 1, 4>(qr, sr, mr, K, Kp, gshift, x32 + (i64)t * ldx, ldx, xh + (i64)t * KX,
                              xs + (i64)t * ncx, xc + (i64)t * ncx, KX, acc);
        const float v = warp_sum(acc[0][0]);
        if (lane == 0) {
            if (row < E) {
                lg[row] = v;
                if (logits_out) logits_out[(i64)t * E + row] = v;
            } else if (extra_out) {
                extra_out[t] = v;
            }
        }
    }
    __syncthreads();
    if (warp == 0)
        route_warp(lg, E, A, method, n_group, topk_group, norm, ones, scaling, ids + t * A, wts + t * A);
}

#define ROUTER_INST(WTN, WT) \
    extern "C" __global__ void __launch_bounds__(256) router_##WTN( \
        const u8* q, const u16* s, const u16* m, const u8* xq, const u16* xs_, const u16* xm, int K, int Kp, \
        int gshift, const float* x32, int ldx, const u16* xh, const float* xs, const float* xc, int KX, \
        float* logits_out, float* extra_out, int E, int A, int method, int n_group, int topk_group, int norm, \
        int ones, float scaling, int* ids, float* wts) { \
        router_body<WT>(q, s, m, xq, xs_, xm, K, Kp, gshift, x32, ldx, xh, xs, xc, KX, logits_out, extra_out, \
                        E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts); }
ROUTER_INST(f32, WT_F32)
ROUTER_INST(f16, WT_F16)
ROUTER_INST(bf16, WT_BF16)
ROUTER_INST(q4, WT_Q4)
ROUTER_INST(q8, WT_Q8)

// ---- mixture of experts ----------------------------------------------------------------------
// Pair p = blockIdx.y is (token t = p / A, rank a = p % A). Its expert e = ids[p] lives in
// slot table[e] of the pool: the expert's blob starts at pool + slot * stride, and a part's
// q / s / m at the given byte offsets inside the blob. Nothing about routing goes through the
// host. With ids == null the "expert" is dense: pool = 0 and the offsets are absolute
// addresses (shared experts, or one expert's tokens in expert_ffn: then A = 1).
// A slot < 0 or an id outside 0..E-1 sets *err and yields zeros.
__device__ __forceinline__ bool expert_base(const int* ids, const int* table, int E, int* err, int p,
                                            const u8* pool, i64 stride, const u8** base) {
    if (ids == nullptr) { *base = pool; return true; }
    const int e = ids[p];
    const int slot = (e >= 0 && e < E) ? table[e] : -1;
    if (slot < 0) {
        if (err && threadIdx.x == 0) atomicOr(err, 1);
        return false;
    }
    *base = pool + (i64)slot * stride;
    return true;
}

// h[p, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t), plus h's xprep (chunks of 32 rows = one
// block of 16 warps x 2 rows). hxh / hxs / hxc may be null (float down weights read h itself).
template <int WT>
__device__ __forceinline__ void moe_gateup_body(const int* ids, const int* table, int E, int* err,
                                                const u8* pool, i64 stride, u64 gq, u64 gs, u64 gm,
                                                u64 uq, u64 us, u64 um, int I, int K, int Kp, int gshift, int A,
                                                const float* x32, int ldx, const u16* xh, const float* xs,
                                                const float* xc, int KX, float* hout, int ldh,
                                                u16* hxh, float* hxs, float* hxc, int HKX) {
    __shared__ float hv[32];
    const int p = blockIdx.y, t = p / A;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i0 = blockIdx.x * 32 + warp * 2;
    const u8* base = nullptr;
    const bool ok = expert_base(ids, table, E, err, p, pool, stride, &base);
    float out[2] = {0.0f, 0.0f};
    if (ok && i0 < I) {
        const u8* qr[4]; const u16* sr[4]; const u16* mr[4];
        const u8* qg[2]; const u16* sg[2]; const u16* mg[2];
        const u8* qu[2]; const u16* su[2]; const u16* mu[2];
        row_ptrs<2>(WT, base + gq, (const u16*)(base + gs), (const u16*)(base + gm), i0, I, K, Kp, gshift, qg, sg, mg);
        row_ptrs<2>(WT, base + uq, (const u16*)(base + us), (const u16*)(base + um), i0, I, K, Kp, gshift, qu, su, mu);
        qr[0] = qg[0]; qr[1] = qg[1]; qr[2] = qu[0]; qr[3] = qu[1];
        sr[0] = sg[0]; sr[1] = sg[1]; sr[2] = su[0]; sr[3] = su[1];
        mr[0] = mg[0]; mr[1] = mg[1]; mr[2] = mu[0]; mr[3] = mu[1];
        float acc[4][1] = {{0.0f}, {0.0f}, {0.0f}, {0.0f}};
        const int ncx = KX >> 5;
        dot_rows<WT, 1, 4, 2>(qr, sr, mr, K, Kp, gshift, x32 + (i64)t * ldx, ldx, xh + (i64)t * KX,
                              xs + (i64)t * ncx, xc + (i64)t * ncx, KX, acc);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const float g = warp_sum(acc[j][0]), u = warp_sum(acc[2 + j][0]);
            if (i0 + j < I) {
                out[j] = silu_mul1(g, u);
                if (lane == 0) hout[(i64)p * ldh + i0 + j] = out[j];
            }
        }
    } else if (i0 < I && lane == 0) {
        hout[(i64)p * ldh + i0] = 0.0f;
        if (i0 + 1 < I) hout[(i64)p * ldh + i0 + 1] = 0.0f;
    }
    if (hxh == nullptr) return;
    if (lane == 0) { hv[warp * 2] = out[0]; hv[warp * 2 + 1] = out[1]; }
    __syncthreads();
    if (warp == 0) {
        const int hc = HKX >> 5;
        prep_chunk(hv[lane], hxh + (i64)p * HKX + blockIdx.x * 32, hxs + (i64)p * hc + blockIdx.x,
                   hxc + (i64)p * hc + blockIdx.x);
    }
}

// y[p, :] = rw[p] * (down_e . h[p]) (rw == null: weight 1); one output buffer per pair
template <int WT>
__device__ __forceinline__ void moe_down_body(const int* ids, const int* table, int E, int* err,
                                              const u8* pool, i64 stride, u64 dq, u64 ds, u64 dm,
                                              int D, int K, int Kp, int gshift,
                                              const float* h32, int ldh, const u16* hxh, const float* hxs,
                                              const float* hxc, int HKX, const float* rw, float* y, int ldy) {
    const int p = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * 2;
    if (row0 >= D) return;
    const u8* base = nullptr;
    const bool ok = expert_base(ids, table, E, err, p, pool, stride, &base);
    float acc[2][1] = {{0.0f}, {0.0f}};
    if (ok) {
        const u8* qr[2]; const u16* sr[2]; const u16* mr[2];
        row_ptrs<2>(WT, base + dq, (const u16*)(base + ds), (const u16*)(base + dm), row0, D, K, Kp, gshift, qr, sr, mr);
        const int hc = HKX >> 5;
        dot_rows<WT, 1, 2, 4>(qr, sr, mr, K, Kp, gshift, h32 + (i64)p * ldh, ldh, hxh + (i64)p * HKX,
                              hxs + (i64)p * hc, hxc + (i64)p * hc, HKX, acc);
    }
    const float w = rw ? rw[p] : 1.0f;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float v = warp_sum(acc[r][0]);
        if (lane == 0 && row0 + r < D) y[(i64)p * ldy + row0 + r] = ok ? (rw ? v * w : v) : 0.0f;
    }
}

#define MOE_INST(WTN, WT) \
    extern "C" __global__ void __launch_bounds__(512) moe_gateup_##WTN( \
        const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 gq, u64 gs, u64 gm, \
        u64 uq, u64 us, u64 um, int I, int K, int Kp, int gshift, int A, const float* x32, int ldx, \
        const u16* xh, const float* xs, const float* xc, int KX, float* hout, int ldh, u16* hxh, float* hxs, \
        float* hxc, int HKX) { \
        moe_gateup_body<WT>(ids, table, E, err, pool, stride, gq, gs, gm, uq, us, um, I, K, Kp, gshift, A, x32, \
                            ldx, xh, xs, xc, KX, hout, ldh, hxh, hxs, hxc, HKX); } \
    extern "C" __global__ void __launch_bounds__(256) moe_down_##WTN( \
        const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 dq, u64 ds, u64 dm, \
        int D, int K, int Kp, int gshift, const float* h32, int ldh, const u16* hxh, const float* hxs, \
        const float* hxc, int HKX, const float* rw, float* y, int ldy) { \
        moe_down_body<WT>(ids, table, E, err, pool, stride, dq, ds, dm, D, K, Kp, gshift, h32, ldh, hxh, hxs, \
                          hxc, HKX, rw, y, ldy); }
MOE_INST(f32, WT_F32)
MOE_INST(f16, WT_F16)
MOE_INST(bf16, WT_BF16)
MOE_INST(q4, WT_Q4)
MOE_INST(q8, WT_Q8)
