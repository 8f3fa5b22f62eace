// Matrix-vector products for decode and small batches (T <= 8), reading weights straight from
// their stored layout, plus the kernels that feed them (rows_prep) and the MoE and router
// kernels built on the same row dot products (dot.cuh). Pasted after common.cuh and dot.cuh.

// h[r, k] after the residual update: hin + ((ybuf[r,0,k] + ... + ybuf[r,A-1,k]) + g * add2[r,k])
// (rank order, as NumpyBackend.moe_combine then `out + shared`; ybuf rows are already weighted)
__device__ __forceinline__ float updated(const float* hr, int k, int K, int r, const float* ybuf, int A,
                                         const float* add2, bool gated, float gsc) {
    float v = hr[k];
    if (ybuf == nullptr && add2 == nullptr) return v;
    float acc = 0.0f;
    if (ybuf) {
        const float* yb = ybuf + (i64)r * A * K + k;
        acc = yb[0];
        for (int a = 1; a < A; ++a) acc = acc + yb[(i64)a * K];
    }
    if (add2) {
        const float s2 = gated ? gsc * add2[(i64)r * K + k] : add2[(i64)r * K + k];
        acc = ybuf ? acc + s2 : s2;
    }
    return v + acc;
}

// Grid (R rows, chunk blocks): warp w of block b owns chunk c = 8 b + w (values 32c .. 32c+31).
//  1. residual update (ybuf / add2): hout[r] = updated hin[r] (hin and hout must differ: other
//     blocks still read hin)
//  2. RMSNorm (nw): x32[r] = nw * (h * (1 / sqrt(mean(h^2) + eps))); every block sums the whole
//     row itself (it is small and in L2), so no grid-wide synchronization is needed
//  3. xprep (xh) of the normed (or plain) row: xh [R, KX], xs / xc [R, KX/32]
#define RP_N 32      // row values a rows_prep thread holds (K <= 32 * blockDim; longer rows loop)
extern "C" __global__ void __launch_bounds__(256)
rows_prep(const float* hin, float* hout, int ldh, int K, const float* ybuf, int A, const float* add2,
          const float* add2_gate, const float* nw, float eps, float* x32, u16* xh, float* xs, float* xc, int KX) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    const float* hr = hin + (i64)r * ldh;
    const bool gated = add2_gate != nullptr;
    const float gsc = gated ? sigmoid1(add2_gate[r]) : 1.0f;
    float inv = 1.0f;
    const int c = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    const int k = (c << 5) + lane;              // = blockIdx.y * blockDim.x + threadIdx.x
    float own = 0.0f;
    const bool held = nw && K <= RP_N * (int)blockDim.x;
    if (held) {
        // the thread's values k = tid + i * blockDim (the order of the loop below), each operand a
        // batch of independent loads: A + 2 memory latencies, not one a value
        const int nb = blockDim.x;
        float hv[RP_N];
#pragma unroll
        for (int i = 0; i < RP_N; ++i) {
            const int kk = threadIdx.x + i * nb;
            hv[i] = kk < K ? hr[kk] : 0.0f;
        }
        if (ybuf || add2) {
            float acc[RP_N];
#pragma unroll
            for (int i = 0; i < RP_N; ++i) acc[i] = 0.0f;
            for (int a = 0; ybuf && a < A; ++a) {
                const float* yb = ybuf + ((i64)r * A + a) * K;
#pragma unroll
                for (int i = 0; i < RP_N; ++i) {
                    const int kk = threadIdx.x + i * nb;
                    const float y = kk < K ? yb[kk] : 0.0f;
                    acc[i] = a == 0 ? y : acc[i] + y;
                }
            }
            if (add2) {
#pragma unroll
                for (int i = 0; i < RP_N; ++i) {
                    const int kk = threadIdx.x + i * nb;
                    const float a2 = kk < K ? add2[(i64)r * K + kk] : 0.0f;
                    const float s2 = gated ? gsc * a2 : a2;
                    acc[i] = ybuf ? acc[i] + s2 : s2;
                }
            }
#pragma unroll
            for (int i = 0; i < RP_N; ++i) hv[i] = hv[i] + acc[i];
        }
        float ss = 0.0f;
#pragma unroll
        for (int i = 0; i < RP_N; ++i) {
            if (threadIdx.x + i * nb < K) ss += hv[i] * hv[i];
            if (i == (int)blockIdx.y) own = hv[i];
        }
        ss = block_sum(ss, red);
        inv = 1.0f / sqrtf(ss / (float)K + eps);
    } else if (nw) {
        float ss = 0.0f;
#pragma unroll 4
        for (int kk = threadIdx.x; kk < K; kk += blockDim.x) {
            const float v = updated(hr, kk, K, r, ybuf, A, add2, gated, gsc);
            ss += v * v;
        }
        ss = block_sum(ss, red);
        inv = 1.0f / sqrtf(ss / (float)K + eps);
    }
    float v = 0.0f;
    if (k < K) {
        v = held ? own : updated(hr, k, K, r, ybuf, A, add2, gated, gsc);
        if (ybuf || add2) hout[(i64)r * ldh + k] = v;
        if (nw) {
            v = nw[k] * (v * inv);
            x32[(i64)r * K + k] = v;
        }
    }
    if (xh != nullptr && (c << 5) < KX) {
        const int ncx = KX >> 5;
        prep_chunk(v, xh + (i64)r * KX, c, ncx, xs + (i64)r * ncx + c, xc + (i64)r * ncx + c);
    }
}

// x [R, K] f32 -> fp16 rows scaled by a power of two (largest |x| in [8, 16)), inv[r] = 1/scale:
// the operands of the prefill GEMMs (no fp16 overflow whatever the activations' range)
extern "C" __global__ void __launch_bounds__(256)
rows_to_f16(const float* x, int K, u16* out, float* inv) {
    __shared__ float red[32];
    const int r = blockIdx.x;
    const float* xr = x + (i64)r * K;
    float amax = 0.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(xr[k]));
    amax = warp_max(amax);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = amax;
    __syncthreads();
    amax = (threadIdx.x & 31) < (blockDim.x >> 5) ? red[threadIdx.x & 31] : 0.0f;
    amax = warp_max(amax);
    int e = 0;
    frexpf(amax, &e);
    const bool ok = amax > 0.0f && amax <= 3.0e38f;
    const float scale = ok ? ldexpf(1.0f, PREP_TARGET_EXP - e) : 1.0f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) out[(i64)r * K + k] = f2h(xr[k] * scale);
    if (threadIdx.x == 0) inv[r] = ok ? ldexpf(1.0f, e - PREP_TARGET_EXP) : 1.0f;
}

// ---- dense GEMV: y[t, n] (+)= W[n, :] . x[t, :] (+ bias[n]) for several matrices at once -------
// desc: 8 u64 per matrix: q, s, m, y, bias (0 = none), N, ldy, flags (1 = add into y). All
// matrices of one launch share the weight type, K, Kp and group. Tasks: RW rows of a matrix,
// matrix after matrix (ntasks = sum of ceil(N / RW)); persistent grid (stream.cuh).
template <int RW, int T>
struct GemvF {
    const u64* desc;
    int nmat, wt, K, Kp, gshift, KX;
    const float* x32;
    const u16* xh;
    const float* xs;
    const float* xc;

    __device__ __forceinline__ const u64* locate(int task, int* row0) const {
        int m = 0, t = task;
        for (; m < nmat - 1; ++m) {
            const int n = ((int)__ldg(desc + 8 * m + 5) + RW - 1) / RW;
            if (t < n) break;
            t -= n;
        }
        *row0 = t * RW;
        return desc + 8 * m;
    }
    // row0's pointers and the rows from it to the matrix's end
    struct Task { const u8* q; const u8* s; const u8* m; int left; bool ok; };
    __device__ __forceinline__ void task(int task, Task& k) const {
        int row0;
        const u64* d = locate(task, &row0);
        k.q = (const u8*)__ldg(d) + row0 * row_bytes(wt, K, Kp);
        k.s = (const u8*)__ldg(d + 1) + row0 * scale_row_bytes(wt, Kp, gshift);
        k.m = (const u8*)__ldg(d + 2) + row0 * scale_row_bytes(wt, Kp, gshift);
        k.left = (int)__ldg(d + 5) - row0;
        k.ok = true;
    }
    __device__ __forceinline__ void rows(const Task& k, Rows<RW>& r) const {
        r.q = k.q;
        r.s = k.s;
        r.template run<RW>(0, 0, k.left, row_bytes(wt, K, Kp), scale_row_bytes(wt, Kp, gshift), 0, 0,
                           (i64)((u64)k.m - (u64)k.s));
        r.x32 = x32; r.xh = xh; r.xs = xs; r.xc = xc;
    }
    __device__ __forceinline__ void done(int task, const Task&, float (&acc)[RW][T]) const {
        int row0;
        const u64* d = locate(task, &row0);
        float* y = (float*)__ldg(d + 3);
        const float* bias = (const float*)__ldg(d + 4);
        const int N = (int)__ldg(d + 5), ldy = (int)__ldg(d + 6);
        const bool add = (__ldg(d + 7) & 1ull) != 0ull;
#pragma unroll
        for (int i = 0; i < RW; ++i) {
#pragma unroll
            for (int t = 0; t < T; ++t) {
                float v = warp_sum(acc[i][t]);
                const int row = row0 + i;
                if ((threadIdx.x & 31) == 0 && row < N) {
                    if (bias) v = v + bias[row];
                    float* o = y + (i64)t * ldy + row;
                    *o = add ? *o + v : v;
                }
            }
        }
    }
};

#define GEMV_ARGS const u64* desc, int nmat, int ntasks, int K, int Kp, int gshift, const float* x32, int ldx, \
                  const u16* xh, const float* xs, const float* xc, int KX
// MB: blocks of 256 an SM a kernel must fit (__launch_bounds__; 0: ptxas picks). Named where ptxas'
// own pick spilled or missed a block by a few registers; all checked spill-free (nvcc_check.sh).
#define GEMV_INST(NAME, WT, T, RW, U, MB) \
    extern "C" __global__ void __launch_bounds__(256, MB) NAME(GEMV_ARGS) { \
        GemvF<RW, T> f; \
        f.desc = desc; f.nmat = nmat; f.wt = WT; f.K = K; f.Kp = Kp; f.gshift = gshift; f.KX = KX; \
        f.x32 = x32; f.xh = xh; f.xs = xs; f.xc = xc; \
        run_tasks<WT, T, RW, U>(f, ntasks, K, Kp, gshift, ldx, KX); }
#define GEMV_ALL_T(WTN, WT, U1, MB1, MB2) \
    GEMV_INST(gemv_##WTN##_t1, WT, 1, 2, U1, MB1) GEMV_INST(gemv_##WTN##_t2, WT, 2, 2, 1, MB2) \
    GEMV_INST(gemv_##WTN##_t4, WT, 4, 2, 1, 0) GEMV_INST(gemv_##WTN##_t8, WT, 8, 1, 1, 0)
GEMV_ALL_T(f32, WT_F32, 1, 0, 0)
GEMV_ALL_T(f16, WT_F16, 2, 0, 5)
GEMV_ALL_T(bf16, WT_BF16, 2, 0, 0)
GEMV_ALL_T(q4, WT_Q4, 2, 4, 0)
GEMV_ALL_T(q8, WT_Q8, 2, 3, 2)

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
// One block of 32 warps; a row is split into S slices of K when there are fewer rows than warps,
// so many loads are in flight even for 8 experts; slices are summed in a fixed order.
template <int WT>
__device__ __forceinline__ void router_body(const u8* q, const u16* s, const u16* m, const u8* xq, const u16* xs_,
                                            const u16* xm, int K, int Kp, int gshift,
                                            const float* x32, int ldx, const u16* xh, const float* xs,
                                            const float* xc, int KX, float* logits_out, float* extra_out,
                                            int E, int A, int method, int n_group, int topk_group, int norm,
                                            int ones, float scaling, int* ids, float* wts) {
    __shared__ float lg[ROUTE_PER_LANE * 32 + 1];
    __shared__ float part[1024];
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
    const int ncx = KX >> 5;
    const int rows = E + (xq ? 1 : 0);
    const int S = rows >= nwarps ? 1 : nwarps / rows;
    const int nu = row_units(WT, K, Kp);
    for (int task = warp; task < rows * S; task += nwarps) {
        const int row = task / S, sl = task % S;
        const u8* qr[1]; const u16* sr[1]; const u16* mr[1];
        if (row < E) row_ptrs<1>(WT, q, s, m, row, E, K, Kp, gshift, qr, sr, mr);
        else row_ptrs<1>(WT, xq, xs_, xm, 0, 1, K, Kp, gshift, qr, sr, mr);
        float acc[1][1] = {{0.0f}};
        dot_rows<WT, 1, 1, 2>(qr, sr, mr, K, Kp, gshift, x32 + (i64)t * ldx, ldx, xh + (i64)t * KX,
                              xs + (i64)t * ncx, xc + (i64)t * ncx, KX, acc,
                              (int)((i64)nu * sl / S), (int)((i64)nu * (sl + 1) / S));
        const float v = warp_sum(acc[0][0]);
        if (lane == 0) part[task] = v;
    }
    __syncthreads();
    for (int row = threadIdx.x; row < rows; row += blockDim.x) {
        float v = part[row * S];
        for (int sl = 1; sl < S; ++sl) v = v + part[row * S + sl];
        lg[row] = v;
        if (row < E) {
            if (logits_out) logits_out[(i64)t * E + row] = v;
        } else if (extra_out) {
            extra_out[t] = v;
        }
    }
    __syncthreads();
    if (warp == 0)
        route_warp(lg, E, A, method, n_group, topk_group, norm, ones, scaling, ids + t * A, wts + t * A);
}

#define ROUTER_INST(WTN, WT) \
    extern "C" __global__ void __launch_bounds__(1024) router_##WTN( \
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
// cnt[p, chunk], reset by that warp) writes the chunk's xprep for the down projection.
struct GateUpF {
    const int* ids; const int* table; int E; int* err; const u8* pool; i64 stride;
    u64 gq, gs, gm, uq, us, um;
    int wt, I, K, Kp, gshift, A, ngroups;
    const float* x32; int ldx; const u16* xh; const float* xs; const float* xc; int KX;
    float* hout; int ldh; u16* hxh; float* hxs; float* hxc; int HKX; int* cnt;

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
        prep_chunk(v, hxh + (i64)p * HKX, ch, HKX >> 5, hxs + (i64)p * (HKX >> 5) + ch, hxc + (i64)p * (HKX >> 5) + ch);
    }
};

// y[p, :] = rw[p] * (down_e . h[p]) (rw == null: weight 1); one output row a pair.
template <int RW>
struct DownF {
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

// UG / UD: chunk slots a lane takes a group; MBG / MBD: blocks an SM, as MB of the GEMVs
#define MOE_INST(WTN, WT, UG, UD, MBG, MBD) \
    extern "C" __global__ void __launch_bounds__(256, MBG) moe_gateup_##WTN( \
        int ntasks, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 gq, u64 gs, \
        u64 gm, u64 uq, u64 us, u64 um, int I, int K, int Kp, int gshift, int A, const float* x32, int ldx, \
        const u16* xh, const float* xs, const float* xc, int KX, float* hout, int ldh, u16* hxh, float* hxs, \
        float* hxc, int HKX, int* cnt) { \
        GateUpF f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.gq = gq; f.gs = gs; f.gm = gm; f.uq = uq; f.us = us; f.um = um; \
        f.wt = WT; f.I = I; f.K = K; f.Kp = Kp; f.gshift = gshift; f.A = A; f.ngroups = (I + 1) / 2; \
        f.x32 = x32; f.ldx = ldx; f.xh = xh; f.xs = xs; f.xc = xc; f.KX = KX; \
        f.hout = hout; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; f.HKX = HKX; f.cnt = cnt; \
        run_tasks<WT, 1, 4, UG>(f, ntasks, K, Kp, gshift, ldx, KX); } \
    extern "C" __global__ void __launch_bounds__(256, MBD) moe_down_##WTN( \
        int ntasks, const int* ids, const int* table, int E, int* err, const u8* pool, i64 stride, u64 dq, u64 ds, \
        u64 dm, int D, int K, int Kp, int gshift, const float* h32, int ldh, const u16* hxh, const float* hxs, \
        const float* hxc, int HKX, const float* rw, float* y, int ldy) { \
        DownF<2> f; \
        f.ids = ids; f.table = table; f.E = E; f.err = err; f.pool = pool; f.stride = stride; \
        f.dq = dq; f.ds = ds; f.dm = dm; f.wt = WT; f.D = D; f.K = K; f.Kp = Kp; f.gshift = gshift; \
        f.ngroups = (D + 1) / 2; f.h32 = h32; f.ldh = ldh; f.hxh = hxh; f.hxs = hxs; f.hxc = hxc; f.HKX = HKX; \
        f.rw = rw; f.y = y; f.ldy = ldy; \
        run_tasks<WT, 1, 2, UD>(f, ntasks, K, Kp, gshift, ldh, HKX); }
MOE_INST(f32, WT_F32, 1, 1, 4, 0)
MOE_INST(f16, WT_F16, 1, 2, 0, 0)
MOE_INST(bf16, WT_BF16, 1, 2, 0, 0)
MOE_INST(q4, WT_Q4, 1, 2, 3, 3)
MOE_INST(q8, WT_Q8, 1, 1, 3, 4)
