// Attention over the KV cache (decode and prefill, causal, GQA) and rotary embeddings.
// Pasted after common.cuh. Caches are [P, G, d] float32 (model.KVCache's layout).

#define ATT_KT 32      // keys per shared-memory tile (one per lane)
#define ATT_DV 8       // value dims per lane: dv <= 256

// Query rows of kv group g = blockIdx.y are the pairs (t, r), row = t * R + r, head h = g * R + r;
// a block takes ATT_QW * warps rows (blockIdx.x) and the keys [split * chunk, +chunk) of those
// its rows see (split = blockIdx.z). Online softmax over 32-key tiles. With one split the block
// writes out [T, H, dv]; with more, each block writes its partial (max, sum, acc) to ws_* and the last block
// of a (tile, group) to finish (atomic counter, reset for the next launch) merges them, so any
// number of splits stays one launch. pos0 (position of token 0) is read from device memory so a
// captured graph replays at every position. Query t sees keys 0 .. pos0 + t. ATT_QW query rows
// a warp: 4 share the key tiles (prefill), 1 spreads a decode step's few rows over all warps.
// With oxh (dv a multiple of 32), the warp that writes a row also writes its xprep (format oact,
// common.cuh): out is [T, H*dv] rows, chunk c of token t's row holds out[t, 32c .. 32c+31] (the o
// projection's input).
__device__ __forceinline__ void out_row(float* out, int t, int h, int H, int dv, const float (&o)[ATT_DV],
                                        u16* oxh, float* oxs, float* oxc, int OKX, int oact) {
    const int lane = threadIdx.x & 31;
    const i64 base = ((i64)t * H + h) * dv;
#pragma unroll
    for (int c = 0; c < ATT_DV; ++c)
        if (lane + 32 * c < dv) out[base + lane + 32 * c] = o[c];
    if (oxh == nullptr) return;
    const int ncx = OKX >> 5;
    if (oact == ACT_I8) {                                  // two loops: fewer registers than a branch a chunk
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) {
            if (32 * c < dv) {                             // warp-uniform
                const int ch = (h * dv) / 32 + c;
                prep_chunk_i8(o[c], (u8*)(oxh + (i64)t * OKX), ch, ncx, oxs + (i64)t * ncx + ch,
                              oxc + (i64)t * ncx + ch);
            }
        }
        return;
    }
#pragma unroll
    for (int c = 0; c < ATT_DV; ++c) {
        if (32 * c < dv) {                                 // warp-uniform
            const int ch = (h * dv) / 32 + c;
            prep_chunk(o[c], oxh + (i64)t * OKX, ch, ncx, oxs + (i64)t * ncx + ch, oxc + (i64)t * ncx + ch);
        }
    }
}

// Stage keys kt .. kt+ATT_KT-1 (zeros from kend) of group g into Ks [KT][dq + 1] and Vs [KT][dv].
// Every thread issues a batch of independent loads before its first store: a load-store loop
// per element waits one memory latency per element (a 200-key decode step took 35 us that way).
// Vector form: dq, dv multiples of 4 and 16-byte aligned caches.
#define ATT_LB 8       // 16-byte loads a thread keeps in flight
__device__ __forceinline__ void load_tile_vec(const float* k, const float* v, float* Ks, float* Vs, int kt, int kend,
                                              int G, int g, int dq, int dv) {
    const int q4 = dq >> 2, v4 = dv >> 2, nk = ATT_KT * q4, n = nk + ATT_KT * v4;
    for (int base = threadIdx.x; base < n; base += ATT_LB * blockDim.x) {
        float4 r[ATT_LB];
#pragma unroll
        for (int i = 0; i < ATT_LB; ++i) {
            const int u = base + i * blockDim.x;
            const bool isk = u < nk;
            const int w4 = isk ? q4 : v4, uu = isk ? u : u - nk, j = uu / w4, key = kt + j;
            r[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (u < n && key < kend)
                r[i] = __ldg((const float4*)((isk ? k + ((i64)key * G + g) * dq : v + ((i64)key * G + g) * dv)) + uu % w4);
        }
#pragma unroll
        for (int i = 0; i < ATT_LB; ++i) {
            const int u = base + i * blockDim.x;
            if (u >= n) continue;
            if (u < nk) {
                float* d = Ks + (u / q4) * (dq + 1) + 4 * (u % q4);   // odd row stride: scalar stores
                d[0] = r[i].x; d[1] = r[i].y; d[2] = r[i].z; d[3] = r[i].w;
            } else {
                ((float4*)Vs)[u - nk] = r[i];
            }
        }
    }
}
__device__ __forceinline__ void load_tile(const float* k, const float* v, float* Ks, float* Vs, int kt, int kend,
                                          int G, int g, int dq, int dv) {
    const int nk = ATT_KT * dq, n = nk + ATT_KT * dv;
    for (int base = threadIdx.x; base < n; base += ATT_LB * blockDim.x) {
        float r[ATT_LB];
#pragma unroll
        for (int i = 0; i < ATT_LB; ++i) {
            const int u = base + i * blockDim.x;
            const bool isk = u < nk;
            const int w = isk ? dq : dv, uu = isk ? u : u - nk, key = kt + uu / w;
            r[i] = u < n && key < kend ? (isk ? k[((i64)key * G + g) * dq + uu % w] : v[((i64)key * G + g) * dv + uu % w])
                                       : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < ATT_LB; ++i) {
            const int u = base + i * blockDim.x;
            if (u < nk) Ks[(u / dq) * (dq + 1) + u % dq] = r[i];
            else if (u < n) Vs[u - nk] = r[i];
        }
    }
}

// HD > 0: dq = dv = HD known at compile time (loops unroll, no per-element predicates or integer
// divisions: the generic body spends ~80 instructions a key a warp on them); HD = 0: any dims.
template <int ATT_QW, int HD>
__device__ __forceinline__ void attention_body(const float* q, i64 ldq_t, i64 ldq_h, const float* k, const float* v,
          float* out, int T, int H, int G, int dq, int dv, const int* pos0p, float scale,
          float* ws_m, float* ws_l, float* ws_acc, int* counters, u16* oxh, float* oxs, float* oxc, int OKX,
          int oact) {
    extern __shared__ float sm[];
    __shared__ int is_last;
    if (HD) { dq = HD; dv = HD; }
    const int R = H / G, nw = blockDim.x >> 5, QT = ATT_QW * nw;
    const int g = blockIdx.y, split = blockIdx.z, nsplit = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* Ks = sm;                          // [KT][dq + 1] (odd stride: no bank conflicts)
    float* Vs = Ks + ATT_KT * (dq + 1);      // [KT][dv]
    float* Qs = Vs + ATT_KT * dv;            // [QT][dq]
    const int pos0 = *pos0p;
    const bool vec = ((dq | dv) & 3) == 0 && (((u64)k | (u64)v) & 15) == 0;
    const int nrows = T * R, qi0 = blockIdx.x * QT;
    for (int row = warp; row < QT; row += nw) {
        const int qi = qi0 + row;
        const float* src = q + (i64)(qi / R) * ldq_t + (i64)(g * R + qi % R) * ldq_h;
        float r[ATT_DV];                               // all of a row's loads before its stores
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) r[c] = qi < nrows && lane + 32 * c < dq ? src[lane + 32 * c] : 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) if (lane + 32 * c < dq) Qs[row * dq + lane + 32 * c] = r[c];
    }
    const int qlast = min(qi0 + QT, nrows) - 1;
    const int kmax = pos0 + qlast / R + 1;
    // the visible keys (not the cache's size) are cut into the splits: a short context still
    // spreads over every split's block, one 32-key tile each
    const int chunk = ((kmax + nsplit - 1) / nsplit + ATT_KT - 1) / ATT_KT * ATT_KT;
    const int kbeg = split * chunk, kend = min(kbeg + chunk, kmax);
    float m_[ATT_QW], l_[ATT_QW], acc[ATT_QW][ATT_DV];
#pragma unroll
    for (int a = 0; a < ATT_QW; ++a) {
        m_[a] = -INFINITY; l_[a] = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) acc[a][c] = 0.0f;
    }
    for (int kt = kbeg; kt < kend; kt += ATT_KT) {
        __syncthreads();
        if (vec) load_tile_vec(k, v, Ks, Vs, kt, kend, G, g, dq, dv);
        else load_tile(k, v, Ks, Vs, kt, kend, G, g, dq, dv);
        __syncthreads();
#pragma unroll
        for (int a = 0; a < ATT_QW; ++a) {
            const int row = qi0 + warp * ATT_QW + a;
            if (row >= nrows) continue;                    // warp-uniform
            const int t = row / R, key = kt + lane;
            const float* qr = Qs + (warp * ATT_QW + a) * dq;
            const float* kr = Ks + lane * (dq + 1);
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;   // four chains: latency, not one
            int i = 0;
            if (HD % 4 == 0 && HD > 0) {
#pragma unroll
                for (; i < HD; i += 4) {
                    const float4 qv = *(const float4*)(qr + i);          // one broadcast load
                    s0 += qv.x * kr[i]; s1 += qv.y * kr[i + 1]; s2 += qv.z * kr[i + 2]; s3 += qv.w * kr[i + 3];
                }
            }
            for (; i + 3 < dq; i += 4) {
                s0 += qr[i] * kr[i]; s1 += qr[i + 1] * kr[i + 1];
                s2 += qr[i + 2] * kr[i + 2]; s3 += qr[i + 3] * kr[i + 3];
            }
            for (; i < dq; ++i) s0 += qr[i] * kr[i];
            float s = ((s0 + s1) + (s2 + s3)) * scale;
            if (key >= kend || key > pos0 + t) s = -INFINITY;
            const float mnew = fmaxf(m_[a], warp_max(s));
            if (mnew == -INFINITY) continue;               // nothing visible yet (warp-uniform)
            const float alpha = expf(m_[a] - mnew);
            const float pe = expf(s - mnew);
            l_[a] = l_[a] * alpha + warp_sum(pe);
#pragma unroll
            for (int c = 0; c < ATT_DV; ++c) acc[a][c] *= alpha;
            for (int j = 0; j < ATT_KT; ++j) {
                const float pj = __shfl_sync(0xffffffffu, pe, j);
#pragma unroll
                for (int c = 0; c < ATT_DV; ++c)
                    if (lane + 32 * c < dv) acc[a][c] += pj * Vs[j * dv + lane + 32 * c];
            }
            m_[a] = mnew;
        }
    }
    const int TH = T * H;
    if (nsplit == 1) {
#pragma unroll
        for (int a = 0; a < ATT_QW; ++a) {
            const int row = qi0 + warp * ATT_QW + a;
            if (row >= nrows) continue;
            float o[ATT_DV];
#pragma unroll
            for (int c = 0; c < ATT_DV; ++c) o[c] = acc[a][c] / l_[a];
            out_row(out, row / R, g * R + row % R, H, dv, o, oxh, oxs, oxc, OKX, oact);
        }
        return;
    }
#pragma unroll
    for (int a = 0; a < ATT_QW; ++a) {
        const int row = qi0 + warp * ATT_QW + a;
        if (row >= nrows) continue;
        const i64 idx = (i64)split * TH + (i64)(row / R) * H + g * R + row % R;
        if (lane == 0) { ws_m[idx] = m_[a]; ws_l[idx] = l_[a]; }
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c)
            if (lane + 32 * c < dv) ws_acc[idx * dv + lane + 32 * c] = acc[a][c];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        int* ctr = counters + blockIdx.x * gridDim.y + g;
        const int prev = atomicAdd(ctr, 1);
        is_last = prev == nsplit - 1;
        if (is_last) *ctr = 0;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
#pragma unroll
    for (int a = 0; a < ATT_QW; ++a) {
        const int row = qi0 + warp * ATT_QW + a;
        if (row >= nrows) continue;
        const i64 idx0 = (i64)(row / R) * H + g * R + row % R;
        // lanes read the splits' (max, sum) in parallel, 32 at a time; the sums are then added in
        // split order as before (a split with no visible key has m = -inf, l = 0, acc = 0: f = 0)
        float M = -INFINITY;
        for (int s0 = 0; s0 < nsplit; s0 += 32)
            if (s0 + lane < nsplit) M = fmaxf(M, __ldcg(ws_m + (s0 + lane) * TH + idx0));
        M = warp_max(M);
        float L = 0.0f;
        float o[ATT_DV];
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) o[c] = 0.0f;
        for (int s0 = 0; s0 < nsplit; s0 += 32) {
            const int sl = s0 + lane;
            float ms = -INFINITY, ls = 0.0f;
            if (sl < nsplit) { ms = __ldcg(ws_m + sl * TH + idx0); ls = __ldcg(ws_l + sl * TH + idx0); }
            const float fl = ms == -INFINITY ? 0.0f : expf(ms - M);
            const int n = min(32, nsplit - s0);
#pragma unroll 4
            for (int j = 0; j < n; ++j) {
                const float f = __shfl_sync(0xffffffffu, fl, j);
                L += __shfl_sync(0xffffffffu, ls, j) * f;
                const float* a = ws_acc + ((s0 + j) * TH + idx0) * dv + lane;
#pragma unroll
                for (int c = 0; c < ATT_DV; ++c)
                    if (lane + 32 * c < dv) o[c] += __ldcg(a + 32 * c) * f;
            }
        }
#pragma unroll
        for (int c = 0; c < ATT_DV; ++c) o[c] = o[c] / L;
        out_row(out, row / R, g * R + row % R, H, dv, o, oxh, oxs, oxc, OKX, oact);
    }
}

#define ATT_ARGS const float* q, i64 ldq_t, i64 ldq_h, const float* k, const float* v, float* out, int T, int H, \
    int G, int dq, int dv, const int* pos0p, float scale, float* ws_m, float* ws_l, float* ws_acc, \
    int* counters, u16* oxh, float* oxs, float* oxc, int OKX, int oact
#define ATT_INST(NAME, QW, HD) \
    extern "C" __global__ void __launch_bounds__(128) NAME(ATT_ARGS) { grid_dep(); \
        attention_body<QW, HD>(q, ldq_t, ldq_h, k, v, out, T, H, G, dq, dv, pos0p, scale, ws_m, ws_l, ws_acc, \
                           counters, oxh, oxs, oxc, OKX, oact); }
ATT_INST(attention_q1, 1, 0)
ATT_INST(attention_q4, 4, 0)
ATT_INST(attention_q1_d64, 1, 64)
ATT_INST(attention_q4_d64, 4, 64)
ATT_INST(attention_q1_d128, 1, 128)
ATT_INST(attention_q4_d128, 4, 128)

// ---- decode attention: clusters of ATD_NS blocks a kv group --------------------------------------
// For a step of NR <= ATD_NR query rows a group (decode: T R, R = H / G) and dq = dv = HD. Grid
// (1, G, ATD_NS NC), clusters of ATD_NS blocks along z. Of the NC clusters of a group, the first
// nca = ceil(kmax / ATD_CK) (at most NC) take the kmax visible keys, cut evenly over their blocks
// (the others leave at once: a short context in a long cache costs no more than in a short one);
// ATD_TK keys a shared tile, all of a tile's loads in flight at once (one memory latency a tile).
// Per tile: scores of every (key, row) pair (8 warps, K read once for a lane's row, no cross-lane
// reduction), the rows' online softmax (warp r: row r), then P V with a thread a value dim. The
// blocks' partial (max, sum, acc) of row r go into the shared memory of block r of the cluster
// (distributed shared memory), one cluster barrier, and that block merges them in block order.
// With nca = 1 it writes the row (and its xprep); else it writes the cluster's partial to ws_* and
// the last cluster to arrive for the row (atomic counter, reset for the next launch) merges the
// nca partials in cluster order. Results depend on kmax (and NC) only, never on timing.
// With knew (DecodeGraph: the rope and KV store fused in, one launch fewer a layer): q comes as
// projected and is rotated as it loads, and the step's T new keys come from knew / vnew [T, G, HD]:
// the block whose keys they are rotates k, puts both in its tile and writes the cache rows, which
// no other block reads in this launch. Tables cos_t / sin_t [P, HD / 2]; the same bits as
// qkv_rope_store followed by the plain launch.
#define ATD_NS 8
#define ATD_TK 64
#define ATD_NR 8
#define ATD_THREADS 256
#define ATD_CK 512           // visible keys a cluster takes before the next one joins

// NeoX rotation of the pair (a, b) by (c, s), correctly rounded whatever the compiler's contraction
__device__ __forceinline__ void rot(float a, float b, float c, float s, float* ra, float* rb) {
    *ra = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *rb = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

template <int HD, int NR>
__device__ __forceinline__ void attention_decode_body(const float* q, i64 ldq_t, i64 ldq_h, const float* k,
        const float* v, float* out, int T, int H, int G, int S, int NC, const int* pos0p, float scale,
        float* ws_m, float* ws_l, float* ws_acc, int* counters, u16* oxh, float* oxs, float* oxc, int OKX,
        int oact, const float* knew, const float* vnew, const float* cos_t, const float* sin_t) {
#if HAVE_CLUSTERS
    extern __shared__ float4 sm4[];             // sized by gpu_ops._attention_decode: the arrays below
    float* sm = (float*)sm4;
    constexpr int KS = HD + 4;                   // Ks / Qs row stride: 16-byte rows, conflict-free
    constexpr int KW = 32 / NR;                  // keys a warp a pass
    constexpr int RS = ATD_THREADS / HD;         // rows of P V a pass (a thread: value dim tid % HD)
    constexpr int RPT = (NR + RS - 1) / RS;      // rows a thread
    constexpr int NLD = ATD_TK * HD * 2 / 4 / ATD_THREADS;   // float4 loads a thread a tile
    float* Ks = sm;                              // [TK][KS]
    float* Vs = Ks + ATD_TK * KS;                // [TK][HD]
    float* Qs = Vs + ATD_TK * HD;                // [NR][KS]
    float* Ps = Qs + ATD_NR * KS;                // [NR][TK] scores, then probabilities
    float* Al = Ps + ATD_NR * ATD_TK;            // [NR] this tile's rescale of the running acc
    float* Mm = Al + ATD_NR;                     // [NS] partial maxima of the row this block merges
    float* Ml = Mm + ATD_NS;                     // [NS] partial sums
    float* Ma = Ml + ATD_NS;                     // [NS][HD] partial accumulators
    __shared__ int is_last;
    const int R = H / G, g = blockIdx.y, rank = (int)cluster_rank(), cl = blockIdx.z / ATD_NS;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nrows = T * R;
    {   // K / V of the block's keys do not depend on the previous kernel (but the newest row does, and
        // pos0 may not be final yet): pull its lines into L2 before waiting, hints only
        const int k0 = min(max(*(volatile const int*)pos0p, 0), S) + T;
        const int na = min(max((k0 + ATD_CK - 1) / ATD_CK, 1), NC), c0 = (k0 + ATD_NS * na - 1) / (ATD_NS * na);
        const int b0 = cl < na ? min((cl * ATD_NS + rank) * c0, S) : S, e0 = min(b0 + c0, S);
        constexpr int LN = HD / 32;               // 128-byte lines of a key's row
        for (int u = threadIdx.x; u < (e0 - b0) * 2 * LN; u += ATD_THREADS) {
            const int key = b0 + u / (2 * LN), w = u % (2 * LN);
            prefetch_line((w < LN ? k : v) + ((i64)key * G + g) * HD + 32 * (w % LN));
        }
    }
    grid_dep();
    const int pos0 = *pos0p;
    const int kmax = pos0 + (nrows - 1) / R + 1;
    const int nca = min(max((kmax + ATD_CK - 1) / ATD_CK, 1), NC);
    if (cl >= nca) return;                       // the whole cluster: its blocks all see the same kmax
    cluster_arrive_relaxed();
    if (knew == nullptr) {
        for (int u = threadIdx.x; u < ATD_NR * HD / 4; u += ATD_THREADS) {
            const int r = u / (HD / 4), i = u % (HD / 4);
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < nrows) x = __ldg((const float4*)(q + (i64)(r / R) * ldq_t + (i64)(g * R + r % R) * ldq_h) + i);
            *(float4*)(Qs + r * KS + 4 * i) = x;
        }
    } else {                                     // q as projected: rotated here, at position pos0 + t
        for (int u = threadIdx.x; u < ATD_NR * HD / 2; u += ATD_THREADS) {
            const int r = u / (HD / 2), i = u % (HD / 2);
            float a = 0.0f, b = 0.0f;
            if (r < nrows) {
                const float* qr = q + (i64)(r / R) * ldq_t + (i64)(g * R + r % R) * ldq_h;
                const i64 c = (i64)(pos0 + r / R) * (HD / 2) + i;
                rot(qr[i], qr[i + HD / 2], __ldg(cos_t + c), __ldg(sin_t + c), &a, &b);
            }
            Qs[r * KS + i] = a;
            Qs[r * KS + i + HD / 2] = b;
        }
    }
    const int chunk = (kmax + ATD_NS * nca - 1) / (ATD_NS * nca);
    const int kbeg = min((cl * ATD_NS + rank) * chunk, kmax), kend = min(kbeg + chunk, kmax);
    float m_run = -INFINITY, l_run = 0.0f;       // row `warp`'s (warps < NR), lane-uniform
    float acc[RPT];
#pragma unroll
    for (int j = 0; j < RPT; ++j) acc[j] = 0.0f;
    const int dcol = threadIdx.x % HD, rg = threadIdx.x / HD;
    for (int kt = kbeg; kt < kend; kt += ATD_TK) {
        const int nk = min(ATD_TK, kend - kt);   // keys of this tile (short contexts: fewer than a tile)
        float4 r[NLD];
#pragma unroll
        for (int i = 0; i < NLD; ++i) {
            const int u = threadIdx.x + i * ATD_THREADS;          // u < TK HD / 4: K, else V
            const bool isk = u < ATD_TK * HD / 4;
            const int uu = isk ? u : u - ATD_TK * HD / 4, key = kt + uu / (HD / 4);
            r[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (key < kend) r[i] = __ldg((const float4*)((isk ? k : v) + ((i64)key * G + g) * HD) + uu % (HD / 4));
        }
        __syncthreads();                          // the previous tile's readers are done
#pragma unroll
        for (int i = 0; i < NLD; ++i) {
            const int u = threadIdx.x + i * ATD_THREADS;
            const bool isk = u < ATD_TK * HD / 4;
            const int uu = isk ? u : u - ATD_TK * HD / 4;
            if (isk) *(float4*)(Ks + (uu / (HD / 4)) * KS + 4 * (uu % (HD / 4))) = r[i];
            else ((float4*)Vs)[uu] = r[i];
        }
        __syncthreads();
        if (knew != nullptr && pos0 < kt + nk && pos0 + T > kt) {
            // the step's own keys (rows pos0 .. pos0 + T - 1, not in the cache yet): k rotated, v as
            // projected, into the tile and into the cache rows, by the one block whose keys they are
            const int n0 = max(pos0, kt), n1 = min(pos0 + T, kt + nk);
            for (int u = threadIdx.x; u < (n1 - n0) * (HD / 2); u += ATD_THREADS) {
                const int key = n0 + u / (HD / 2), i = u % (HD / 2);
                const i64 src = ((i64)(key - pos0) * G + g) * HD, dst = ((i64)key * G + g) * HD;
                const i64 c = (i64)key * (HD / 2) + i;
                float a, b;
                rot(knew[src + i], knew[src + i + HD / 2], __ldg(cos_t + c), __ldg(sin_t + c), &a, &b);
                const float va = vnew[src + i], vb = vnew[src + i + HD / 2];
                float* kr = Ks + (key - kt) * KS;
                float* vr = Vs + (key - kt) * HD;
                kr[i] = a; kr[i + HD / 2] = b;
                vr[i] = va; vr[i + HD / 2] = vb;
                ((float*)k)[dst + i] = a; ((float*)k)[dst + i + HD / 2] = b;   // k, v: the caches
                ((float*)v)[dst + i] = va; ((float*)v)[dst + i + HD / 2] = vb;
            }
            __syncthreads();
        }
        // scores: lane = (key kk, row rr), row fastest
        for (int kk0 = warp * KW; kk0 < nk; kk0 += (ATD_THREADS / 32) * KW) {
            const int rr = lane % NR, kk = kk0 + lane / NR, key = kt + kk;
            const float* qr = Qs + rr * KS;
            const float* kr = Ks + kk * KS;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma unroll
            for (int i = 0; i < HD; i += 4) {
                const float4 a = *(const float4*)(qr + i), b = *(const float4*)(kr + i);
                s0 += a.x * b.x; s1 += a.y * b.y; s2 += a.z * b.z; s3 += a.w * b.w;
            }
            float sc = ((s0 + s1) + (s2 + s3)) * scale;
            if (rr >= nrows || key >= kend || key > pos0 + rr / R) sc = -INFINITY;
            Ps[rr * ATD_TK + kk] = sc;
        }
        __syncthreads();
        if (warp < NR) {                          // online softmax of row `warp` over this tile (all TK written)
            float x[ATD_TK / 32];
#pragma unroll
            for (int i = 0; i < ATD_TK / 32; ++i) x[i] = lane + 32 * i < nk ? Ps[warp * ATD_TK + lane + 32 * i] : -INFINITY;
            float mx = -INFINITY;
#pragma unroll
            for (int i = 0; i < ATD_TK / 32; ++i) mx = fmaxf(mx, x[i]);
            const float mnew = fmaxf(m_run, warp_max(mx));
            float alpha = 1.0f, ps = 0.0f;
            if (mnew != -INFINITY) {
                alpha = expf(m_run - mnew);
#pragma unroll
                for (int i = 0; i < ATD_TK / 32; ++i) {
                    x[i] = expf(x[i] - mnew);
                    ps += x[i];
                }
            } else {
#pragma unroll
                for (int i = 0; i < ATD_TK / 32; ++i) x[i] = 0.0f;
            }
#pragma unroll
            for (int i = 0; i < ATD_TK / 32; ++i) Ps[warp * ATD_TK + lane + 32 * i] = x[i];
            l_run = l_run * alpha + warp_sum(ps);
            m_run = mnew;
            if (lane == 0) Al[warp] = alpha;
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
            const int row = rg + j * RS;
            if (row < NR) {
                const float* pr = Ps + row * ATD_TK;
                float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;     // four chains: latency, not one
#pragma unroll 4
                for (int kk = 0; kk < nk; kk += 4) {       // p = 0 and V = 0 past nk
                    const float4 p = *(const float4*)(pr + kk);
                    a0 += p.x * Vs[kk * HD + dcol];
                    a1 += p.y * Vs[(kk + 1) * HD + dcol];
                    a2 += p.z * Vs[(kk + 2) * HD + dcol];
                    a3 += p.w * Vs[(kk + 3) * HD + dcol];
                }
                acc[j] = acc[j] * Al[row] + ((a0 + a1) + (a2 + a3));
            }
        }
    }
    // hand row r's partial to block r % NS (a block merges at most one row: NR <= NS)
    cluster_wait();
#pragma unroll
    for (int j = 0; j < RPT; ++j) {
        const int row = rg + j * RS;
        if (row < nrows) st_cluster(Ma + rank * HD + dcol, row % ATD_NS, acc[j]);
    }
    if (warp < nrows && lane == 0) {
        st_cluster(Mm + rank, warp % ATD_NS, m_run);
        st_cluster(Ml + rank, warp % ATD_NS, l_run);
    }
    cluster_sync();
    if (rank >= nrows) return;
    const int row = rank, t = row / R, h = g * R + row % R;
    const bool mine = (int)threadIdx.x < HD;
    // every block's (max, sum); a block with no visible key has m = -inf, l = 0, acc = 0: f = 0
    float M = -INFINITY;
#pragma unroll
    for (int b = 0; b < ATD_NS; ++b) M = fmaxf(M, Mm[b]);
    float L = 0.0f, o = 0.0f;
#pragma unroll
    for (int b = 0; b < ATD_NS; ++b) {
        const float mb = Mm[b];
        const float f = mb == -INFINITY ? 0.0f : expf(mb - M);
        L += Ml[b] * f;
        if (mine) o += Ma[b * HD + dcol] * f;
    }
    if (nca > 1) {                               // the cluster's partial; the last cluster merges them
        const int TH = T * H;
        const i64 idx = (i64)cl * TH + (i64)t * H + h;
        if (mine) ws_acc[idx * HD + dcol] = o;
        if (threadIdx.x == 0) { ws_m[idx] = M; ws_l[idx] = L; }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            int* ctr = counters + g * ATD_NR + row;
            const int prev = atomicAdd(ctr, 1);
            is_last = prev == nca - 1;
            if (is_last) *ctr = 0;
        }
        __syncthreads();
        if (!is_last || !mine) return;
        __threadfence();
        const i64 idx0 = (i64)t * H + h;
        M = -INFINITY;
        for (int c = 0; c < nca; ++c) M = fmaxf(M, __ldcg(ws_m + c * TH + idx0));
        L = 0.0f;
        o = 0.0f;
        for (int c = 0; c < nca; ++c) {          // cluster order: the same sums every launch
            const float mc = __ldcg(ws_m + c * TH + idx0);
            const float f = mc == -INFINITY ? 0.0f : expf(mc - M);
            L += __ldcg(ws_l + c * TH + idx0) * f;
            o += __ldcg(ws_acc + (c * TH + idx0) * HD + dcol) * f;
        }
    }
    if (!mine) return;
    o = o / L;
    out[((i64)t * H + h) * HD + dcol] = o;
    if (oxh == nullptr) return;
    const int ncx = OKX >> 5, ch = (h * HD) / 32 + (dcol >> 5);
    if (oact == ACT_I8) prep_chunk_i8(o, (u8*)(oxh + (i64)t * OKX), ch, ncx, oxs + (i64)t * ncx + ch, oxc + (i64)t * ncx + ch);
    else prep_chunk(o, oxh + (i64)t * OKX, ch, ncx, oxs + (i64)t * ncx + ch, oxc + (i64)t * ncx + ch);
#endif
}

#define ATD_ARGS const float* q, i64 ldq_t, i64 ldq_h, const float* k, const float* v, float* out, int T, int H, \
    int G, int S, int NC, const int* pos0p, float scale, float* ws_m, float* ws_l, float* ws_acc, int* counters, \
    u16* oxh, float* oxs, float* oxc, int OKX, int oact, const float* knew, const float* vnew, \
    const float* cos_t, const float* sin_t
#define ATD_INST(NAME, HD, NR) \
    extern "C" __global__ void __launch_bounds__(ATD_THREADS) CLUSTER_DIMS(1, 1, ATD_NS) NAME(ATD_ARGS) { \
        attention_decode_body<HD, NR>(q, ldq_t, ldq_h, k, v, out, T, H, G, S, NC, pos0p, scale, ws_m, ws_l, ws_acc, \
                                      counters, oxh, oxs, oxc, OKX, oact, knew, vnew, cos_t, sin_t); }
ATD_INST(attention_dec_d64_r4, 64, 4)
ATD_INST(attention_dec_d64_r8, 64, 8)
ATD_INST(attention_dec_d128_r4, 128, 4)
ATD_INST(attention_dec_d128_r8, 128, 8)

// (a, b) -> (a cos - b sin, b cos + a sin) with numpy's roundings (no fused multiply-add)

// x [T, nh, r] (strides ldt, ldh; last axis contiguous) -> out [T, nh, r] contiguous.
// Pair i of token t uses row pos[t] (pos == null: row t) of the tables cos / sin [P, r/2].
extern "C" __global__ void rope_kernel(const float* x, i64 ldt, i64 ldh, float* out, int T, int nh, int r,
                                       const float* cos_t, const float* sin_t, const int* pos, int interleaved) {
    grid_dep();
    const int t = blockIdx.x / nh, hd = blockIdx.x % nh, half = r / 2;
    const i64 row = pos ? pos[t] : t;
    const float* xr = x + t * ldt + hd * ldh;
    float* orow = out + ((i64)t * nh + hd) * r;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
        float ra, rb;
        rot(xr[ia], xr[ib], cos_t[row * half + i], sin_t[row * half + i], &ra, &rb);
        orow[ia] = ra;
        orow[ib] = rb;
    }
}

// Decode / prefill of GQA after the q, k, v projections of T tokens at positions pos0 + t
// (pos0 in device memory): rotate q [T, H, d] in place (NeoX halves), rotate k and store it and
// v ([T, G, d]) into the caches kc, vc [P, G, d] at row pos0 + t. Tables [P, d/2].
extern "C" __global__ void qkv_rope_store(float* q, const float* k, const float* v, int T, int H, int G, int d,
                                          const float* cos_t, const float* sin_t, const int* pos0p,
                                          float* kc, float* vc) {
    grid_dep();
    const int per = H + 2 * G, t = blockIdx.x / per, j = blockIdx.x % per, half = d / 2;
    const i64 pos = (i64)(*pos0p) + t;
    if (j < H + G) {
        const bool isq = j < H;
        const int hd = isq ? j : j - H;
        const float* src = isq ? q + ((i64)t * H + hd) * d : k + ((i64)t * G + hd) * d;
        float* dst = isq ? q + ((i64)t * H + hd) * d : kc + (pos * G + hd) * d;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            float ra, rb;
            rot(src[i], src[i + half], cos_t[pos * half + i], sin_t[pos * half + i], &ra, &rb);
            dst[i] = ra;
            dst[i + half] = rb;
        }
    } else {
        const int hd = j - H - G;
        for (int i = threadIdx.x; i < d; i += blockDim.x) vc[(pos * G + hd) * d + i] = v[((i64)t * G + hd) * d + i];
    }
}
