// Matrix-vector products for decode and small batches (T <= 8), reading weights straight from
// their stored layout, plus the kernels that feed them (rows_prep) and the router kernels built on
// the same row dot products (dot.cuh); the MoE kernels are in moe.cu. Pasted after common.cuh,
// dot.cuh and stream.cuh. Kernels of quantized weights come in two prep formats: fp16 activations
// (NAME) and int8 activations (NAME_i8, dp4a; common.cuh).

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
//  3. xprep (xh) of the normed (or plain) row: xh [R, KX], xs / xc [R, KX/32], in format act
#define RP_N 32      // row values a rows_prep thread holds (K <= 32 * blockDim; longer rows loop)
extern "C" __global__ void __launch_bounds__(256)
rows_prep(const float* hin, float* hout, int ldh, int K, const float* ybuf, int A, const float* add2,
          const float* add2_gate, const float* nw, float eps, float* x32, u16* xh, float* xs, float* xc, int KX,
          int act) {
    grid_dep();
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
        prep_chunk_act(act, v, xh + (i64)r * KX, c, ncx, xs + (i64)r * ncx + c, xc + (i64)r * ncx + c);
    }
}

// x [R, K] f32 -> fp16 rows scaled by a power of two (largest |x| in [8, 16)), inv[r] = 1/scale:
// the operands of the prefill GEMMs (no fp16 overflow whatever the activations' range)
extern "C" __global__ void __launch_bounds__(256)
rows_to_f16(const float* x, int K, u16* out, float* inv) {
    grid_dep();
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
    static constexpr bool EARLY = true;          // descriptors are written before a graph's capture
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
#define GEMV_INST(NAME, WT, ACT, T, RW, U, MB) \
    extern "C" __global__ void __launch_bounds__(256, MB) NAME(GEMV_ARGS) { \
        GemvF<RW, T> f; \
        f.desc = desc; f.nmat = nmat; f.wt = WT; f.K = K; f.Kp = Kp; f.gshift = gshift; f.KX = KX; \
        f.x32 = x32; f.xh = xh; f.xs = xs; f.xc = xc; \
        run_tasks<WT, T, RW, U, ACT>(f, ntasks, K, Kp, gshift, ldx, KX); }
#define GEMV_ALL_T(WTN, WT, U1, MB1, MB2) \
    GEMV_INST(gemv_##WTN##_t1, WT, ACT_F16, 1, 2, U1, MB1) GEMV_INST(gemv_##WTN##_t2, WT, ACT_F16, 2, 2, 1, MB2) \
    GEMV_INST(gemv_##WTN##_t4, WT, ACT_F16, 4, 2, 1, 0) GEMV_INST(gemv_##WTN##_t8, WT, ACT_F16, 8, 1, 1, 0)
GEMV_ALL_T(f32, WT_F32, 1, 0, 0)
GEMV_ALL_T(f16, WT_F16, 2, 0, 5)
GEMV_ALL_T(bf16, WT_BF16, 2, 0, 0)
GEMV_ALL_T(q4, WT_Q4, 2, 4, 0)
GEMV_ALL_T(q8, WT_Q8, 2, 3, 2)
// int8 activations: U chunks a lane a group and min blocks an SM per T (1, 2, 4, 8)
#define GEMV_ALL_T_I8(WTN, WT, U1, MB1, MB2, MB4, MB8) \
    GEMV_INST(gemv_##WTN##_t1_i8, WT, ACT_I8, 1, 2, U1, MB1) GEMV_INST(gemv_##WTN##_t2_i8, WT, ACT_I8, 2, 2, 1, MB2) \
    GEMV_INST(gemv_##WTN##_t4_i8, WT, ACT_I8, 4, 2, 1, MB4) GEMV_INST(gemv_##WTN##_t8_i8, WT, ACT_I8, 8, 1, 1, MB8)
GEMV_ALL_T_I8(q4, WT_Q4, 2, 4, 0, 0, 0)
// q8 one chunk a lane a group (H100, graphs: 4096x4096 8.1 -> 7.4 us, 6144x4096 13.3 -> 11.3, lm_head
// 32000x4096 50.4 -> 44.2); q4 keeps 2 (14336x4096 11.2 vs 11.4)
GEMV_ALL_T_I8(q8, WT_Q8, 1, 4, 4, 0, 0)

// ---- routing -------------------------------------------------------------------------------
#define ROUTE_PER_LANE 16      // up to 512 experts
#define ROUTE_MAX_A 32

// One warp routes one token (the numpy reference's route, step for step): softmax over E,
// optional DeepSeek group mask, top-A by probability (ties: lower id), weights (ones |
// renormalized | raw) times scaling. ids / wts get A values in rank order. PL experts a lane
// (E <= 32 PL): the scans are serial chains of PL steps, so few experts take a short variant.
template <int PL>
__device__ void route_warp_pl(const float* logits, int E, int A, int method, int n_group, int topk_group,
                              int norm, int ones, float scaling, int* ids, float* wts) {
    const int lane = threadIdx.x & 31;
    float p[PL];
#pragma unroll
    for (int i = 0; i < PL; ++i) p[i] = lane + 32 * i < E ? logits[lane + 32 * i] : -INFINITY;
    warp_softmax(p);
    if (method == 1) {                       // group_limited_greedy; n_group <= 32
        const int gs = E / n_group;
        float mine = -INFINITY;              // lane g holds group g's best probability
        for (int g = 0; g < n_group; ++g) {
            float gm = -INFINITY;
#pragma unroll
            for (int i = 0; i < PL; ++i) {
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
        for (int i = 0; i < PL; ++i) {
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
        for (int i = 0; i < PL; ++i) {
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
        for (int i = 0; i < PL; ++i)
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
__device__ __forceinline__ void route_warp(const float* logits, int E, int A, int method, int n_group,
                                           int topk_group, int norm, int ones, float scaling, int* ids, float* wts) {
    if (E <= 32) route_warp_pl<1>(logits, E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts);
    else if (E <= 64) route_warp_pl<2>(logits, E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts);
    else if (E <= 128) route_warp_pl<4>(logits, E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts);
    else route_warp_pl<ROUTE_PER_LANE>(logits, E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts);
}

// logits [T, E] -> ids, wts [T, A]; one warp a token
extern "C" __global__ void route_kernel(const float* logits, int T, int E, int A, int method, int n_group,
                                        int topk_group, int norm, int ones, float scaling, int* ids, float* wts) {
    grid_dep();
    const int t = blockIdx.x;
    route_warp(logits + (i64)t * E, E, A, method, n_group, topk_group, norm, ones, scaling, ids + t * A, wts + t * A);
}

// The router of an MoE layer for token t = blockIdx.x: E logits (+ the optional one-row
// shared-expert gate `xq`), then one warp routes. logits_out [T, E] and extra_out [T] may be null.
// A token is a cluster of RT_NB blocks of 8 warps (blockIdx.y): one SM pulling a whole router
// (Mixtral: 128 KB of f32) waits several memory latencies, RT_NB SMs one. A row is split into S
// slices of K when there are fewer rows than the token's warps; each warp's slice sum goes to block
// 0's shared memory, which adds a row's slices in slice order (a fixed order: deterministic) and
// routes. Before sm_90 (no clusters) block 0 of a token does all of it alone.
#define RT_NB 8
#define RT_WARPS 8
#define RT_PART 1024           // slice sums: rows * S <= max(rows, RT_NB * RT_WARPS)
template <int WT>
__device__ __forceinline__ i64 router_unit_bytes(int K) {
    return WT == WT_Q4 ? 16 : WT == WT_Q8 ? 32 : ((K & 7) == 0 ? 8 : 1) * (WT == WT_F32 ? 4 : 2);
}
template <int WT, int ACT>
__device__ __forceinline__ void router_body(const u8* q, const u16* s, const u16* m, const u8* xq, const u16* xs_,
                                            const u16* xm, int K, int Kp, int gshift,
                                            const float* x32, int ldx, const u16* xh, const float* xs,
                                            const float* xc, int KX, float* logits_out, float* extra_out,
                                            int E, int A, int method, int n_group, int topk_group, int norm,
                                            int ones, float scaling, int* ids, float* wts) {
    __shared__ float lg[ROUTE_PER_LANE * 32 + 1];
    __shared__ float part[RT_PART];
#if HAVE_CLUSTERS
    cluster_arrive_relaxed();
    const int nb = RT_NB, b = blockIdx.y;
#else
    if (blockIdx.y != 0) return;
    const int nb = 1, b = 0;
#endif
    const int t = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int ncx = KX >> 5, nwt = nb * RT_WARPS, gw = b * RT_WARPS + warp;
    const int rows = E + (xq ? 1 : 0);
    const int S = rows >= nwt ? 1 : min(32, nwt / rows);
    const int nu = row_units(WT, K, Kp);
    // the weights do not depend on the previous kernel: start pulling them into L2 before waiting
    for (int task = gw; task < rows * S; task += nwt) {
        const int row = task / S, sl = task % S;
        const u8* qr[1]; const u16* sr[1]; const u16* mr[1];
        if (row < E) row_ptrs<1>(WT, q, s, m, row, E, K, Kp, gshift, qr, sr, mr);
        else row_ptrs<1>(WT, xq, xs_, xm, 0, 1, K, Kp, gshift, qr, sr, mr);
        const i64 u0 = (i64)nu * sl / S, u1 = (i64)nu * (sl + 1) / S, ub = router_unit_bytes<WT>(K);
        prefetch_l2(qr[0] + u0 * ub, (u1 - u0) * ub);
    }
    grid_dep();
#if HAVE_CLUSTERS
    cluster_wait();                              // every block of the cluster runs: block 0's part is valid
#endif
    for (int task = gw; task < rows * S; task += nwt) {
        const int row = task / S, sl = task % S;
        const u8* qr[1]; const u16* sr[1]; const u16* mr[1];
        if (row < E) row_ptrs<1>(WT, q, s, m, row, E, K, Kp, gshift, qr, sr, mr);
        else row_ptrs<1>(WT, xq, xs_, xm, 0, 1, K, Kp, gshift, qr, sr, mr);
        float acc[1][1] = {{0.0f}};
        dot_rows<WT, 1, 1, 2, ACT>(qr, sr, mr, K, Kp, gshift, x32 + (i64)t * ldx, ldx, xh + (i64)t * KX,
                              xs + (i64)t * ncx, xc + (i64)t * ncx, KX, acc,
                              (int)((i64)nu * sl / S), (int)((i64)nu * (sl + 1) / S));
        const float v = warp_sum(acc[0][0]);
#if HAVE_CLUSTERS
        if (lane == 0) st_cluster(part + task, 0, v);
#else
        if (lane == 0) part[task] = v;
#endif
    }
#if HAVE_CLUSTERS
    cluster_sync();
#else
    __syncthreads();
#endif
    if (b != 0 || warp != 0) return;             // warp 0 of block 0 adds the slices and routes
    for (int row = lane; row < rows; row += 32) {
        float v = part[row * S];
        for (int sl = 1; sl < S; ++sl) v = v + part[row * S + sl];
        lg[row] = v;
        if (row < E) {
            if (logits_out) logits_out[(i64)t * E + row] = v;
        } else if (extra_out) {
            extra_out[t] = v;
        }
    }
    __syncwarp();
    route_warp(lg, E, A, method, n_group, topk_group, norm, ones, scaling, ids + t * A, wts + t * A);
}

// grid (T, RT_NB), RT_WARPS warps a block; clusters of one token's blocks (sm_90+)
#define ROUTER_INST(WTN, WT, ACT) \
    extern "C" __global__ void __launch_bounds__(RT_WARPS * 32, 1) CLUSTER_DIMS(1, RT_NB, 1) router_##WTN( \
        const u8* q, const u16* s, const u16* m, const u8* xq, const u16* xs_, const u16* xm, int K, int Kp, \
        int gshift, const float* x32, int ldx, const u16* xh, const float* xs, const float* xc, int KX, \
        float* logits_out, float* extra_out, int E, int A, int method, int n_group, int topk_group, int norm, \
        int ones, float scaling, int* ids, float* wts) { \
        router_body<WT, ACT>(q, s, m, xq, xs_, xm, K, Kp, gshift, x32, ldx, xh, xs, xc, KX, logits_out, extra_out, \
                        E, A, method, n_group, topk_group, norm, ones, scaling, ids, wts); }
ROUTER_INST(f32, WT_F32, ACT_F16)
ROUTER_INST(f16, WT_F16, ACT_F16)
ROUTER_INST(bf16, WT_BF16, ACT_F16)
ROUTER_INST(q4, WT_Q4, ACT_F16)
ROUTER_INST(q8, WT_Q8, ACT_F16)
ROUTER_INST(q4_i8, WT_Q4, ACT_I8)
ROUTER_INST(q8_i8, WT_Q8, ACT_I8)
