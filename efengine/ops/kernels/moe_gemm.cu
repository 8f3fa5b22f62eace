// Grouped prefill GEMMs of the routed experts of one layer on tensor cores: fp16 operands, fp32
// accumulation (mma.sync m16n8k16), weights read in their stored type (q4 / q8 / f16 / bf16)
// and widened to fp16 in registers right before they go to shared memory (no fp16 copy of an
// expert ever reaches global memory).
//
// Legend: P (token, rank) pairs sorted by expert, K inputs, N outputs of one matrix, I expert
// width, D hidden, BM x BN a block's tile (pairs x weight rows), BK the k-step.
//
// One launch covers every expert of a layer. tiles[b] = (expert index, first pair p0, rows m, 0)
// with m <= BM pairs of one expert; grid (tiles, column blocks). wtab[e] = device addresses of
// the expert's parts: gate q s m, up q s m (mg_gateup) or down q s m (mg_down).
// A block: BM / 16 warps (4 for BM = 64, 8 for the _m128 kernels: each widened B tile then
// serves twice the rows), BM / 32 along M x 2 along N, each a 32 x 64 sub-tile = 2 x 8 MMAs a k16.
// Per k-step: A (fp16 rows, see to_f16_rows) -> smem by cp.async (rows past m and columns past
// ka zero-filled); B -> registers (issued one k-step ahead, so the loads fly during the MMAs),
// widened to fp16 and stored to smem; then ldmatrix + mma. Two smem stages, one barrier a step.
//
// mg_gateup_*: a block makes 64 columns of h. Smem B row r (0..127) holds, for warp column
//   wn = r / 64: gate rows (r % 64 < 32) or up rows (else) nb0 + wn*32 + r % 32, so every thread
//   holds g and u of the same h element and applies silu(g) * u in registers.
//   h [P, ldh] float32, rows in sorted pair order; columns I..ldh-1 come out 0 (zero weights).
// mg_down_*: y[orow[p], n] = (h16 row p . down row n) * ainv[p], rows of y = (token, rank) slots:
//   every element is written by exactly one thread, no atomics, so the bits never depend on
//   scheduling.
#define MG_BN 128
#define MG_BK 64
#ifndef MG_SPLIT
#define MG_SPLIT 1                           // the k16 step after which the next stage is widened
#endif
#define MG_LDS 72                            // smem row stride in halves: 144 B, ldmatrix conflict-free
#define MG_B_STAGE (MG_BN * MG_LDS)
// dynamic shared memory: 2 * (BM + BN) * LDS * 2 bytes = 55296 (BM 64) or 73728 (BM 128)

__device__ __forceinline__ u32 mg_smem(const void* p) {
    u32 s;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(s) : "l"(p));
    return s;
}
// 16 bytes global -> shared, asynchronously; full = false writes 16 zero bytes (reads nothing)
__device__ __forceinline__ void mg_cp16(u32 dst, const void* src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(full ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void mg_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void mg_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void mg_ldsm4(u32 addr, u32* r) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
// c[16x8] += a[16x16] (row) * b[16x8] (col), fp16 in, fp32 accumulate. Not volatile: it has no
// side effects, so the compiler may interleave it with the widening of the next stage.
__device__ __forceinline__ void mg_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 mg_prmt(u32 a, u32 b, u32 sel) {
    u32 d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ u32 mg_hmul2(u32 a, u32 b) {
    u32 d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ uint4 mg_u4(u32 a, u32 b, u32 c, u32 d) {
    uint4 v;
    v.x = a;
    v.y = b;
    v.z = c;
    v.w = d;
    return v;
}
__device__ __forceinline__ u32 mg_f2h2(float lo, float hi) {   // (lo, hi) -> packed fp16 pair
    u32 d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
}

// Per weight type: 16-byte chunks a row a k-step (CPR), k values a chunk (HPC), byte offset of
// column k in a stored row (boff).
template <int WT> struct MgW;
template <> struct MgW<WT_Q4> {
    static constexpr int CPR = 2, HPC = 32;
    static __device__ __forceinline__ i64 boff(int k) { return k >> 1; }
};
template <> struct MgW<WT_Q8> {
    static constexpr int CPR = 4, HPC = 16;
    static __device__ __forceinline__ i64 boff(int k) { return k; }
};
template <> struct MgW<WT_F16> {
    static constexpr int CPR = 8, HPC = 8;
    static __device__ __forceinline__ i64 boff(int k) { return (i64)k * 2; }
};
template <> struct MgW<WT_BF16> {
    static constexpr int CPR = 8, HPC = 8;
    static __device__ __forceinline__ i64 boff(int k) { return (i64)k * 2; }
};

// Widen one loaded chunk to fp16 and store it at dst (HPC halves, 16-byte aligned).
// q4: w = code * s + m (codes exact in fp16, one rounding by the fused multiply-add);
// q8: w = code * s; bf16 -> f32 -> f16 (round to nearest).
template <int WT>
__device__ __forceinline__ void mg_widen(uint4 raw, u16 s, u16 m, u16* dst) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
    if (WT == WT_Q4) {
        const u32 s2 = (u32)s | ((u32)s << 16), m2 = (u32)m | ((u32)m << 16);
#pragma unroll
        for (int j = 0; j < 4; ++j) {        // word j: codes 8j..8j+7, nibble i = code 8j+i
            const u32 x = w[j];
            // 0x6400 | c is the fp16 1024 + c; pairs (c0, c4), (c1, c5), (c2, c6), (c3, c7)
            const u32 p0 = hsub2((x & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p1 = hsub2(((x >> 4) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p2 = hsub2(((x >> 8) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p3 = hsub2(((x >> 12) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            uint4 o;
            o.x = hfma2(mg_prmt(p0, p1, 0x5410u), s2, m2);   // (c0, c1)
            o.y = hfma2(mg_prmt(p2, p3, 0x5410u), s2, m2);   // (c2, c3)
            o.z = hfma2(mg_prmt(p0, p1, 0x7632u), s2, m2);   // (c4, c5)
            o.w = hfma2(mg_prmt(p2, p3, 0x7632u), s2, m2);   // (c6, c7)
            *(uint4*)(dst + 8 * j) = o;
        }
    } else if (WT == WT_Q8) {
        const u32 s2 = (u32)s | ((u32)s << 16);
        u32 o[8];
#pragma unroll
        for (int j = 0; j < 4; ++j) {        // word j: codes 4j..4j+3 (int8)
            const u32 x = w[j] ^ 0x80808080u;                // code + 128, unsigned
            // 0x64XX is the fp16 1024 + XX; minus 1152 (0x6480) leaves the code exactly
            o[2 * j] = mg_hmul2(hsub2(mg_prmt(x, 0x64646464u, 0x4140u), 0x64806480u), s2);
            o[2 * j + 1] = mg_hmul2(hsub2(mg_prmt(x, 0x64646464u, 0x4342u), 0x64806480u), s2);
        }
        *(uint4*)dst = mg_u4(o[0], o[1], o[2], o[3]);
        *(uint4*)(dst + 8) = mg_u4(o[4], o[5], o[6], o[7]);
    } else if (WT == WT_F16) {
        *(uint4*)dst = raw;
    } else {                                 // bf16: (lo, hi) bit pairs
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            o[j] = mg_f2h2(__uint_as_float(w[j] << 16), __uint_as_float(w[j] & 0xFFFF0000u));
        *(uint4*)dst = mg_u4(o[0], o[1], o[2], o[3]);
    }
}

template <int WT, bool GATEUP, int BM>
__device__ __forceinline__ void mg_body(const int* __restrict__ tiles, const u64* __restrict__ wtab,
                                        const u16* __restrict__ xa, int lda, int ka,
                                        const int* __restrict__ arow, const float* __restrict__ ainv,
                                        int N, int K, int Kp, int gsh, float* __restrict__ out, int ldo,
                                        const int* __restrict__ orow) {
    typedef MgW<WT> W;
    constexpr bool QUANT = WT == WT_Q4 || WT == WT_Q8;
    constexpr int THREADS = 2 * BM, A_STAGE = BM * MG_LDS, AR = THREADS / 8;   // AR: A rows a pass
    constexpr int CH = MG_BN * W::CPR / THREADS;         // chunks a thread: q4 2, q8 4, f16 8 (BM 64)
    extern __shared__ __align__(16) u16 mg_sm[];
    u16* As = mg_sm;                                     // [2][BM][LDS]
    u16* Bs = mg_sm + 2 * A_STAGE;                       // [2][BN][LDS]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int ex = tiles[4 * blockIdx.x], p0 = tiles[4 * blockIdx.x + 1], mcnt = tiles[4 * blockIdx.x + 2];
    if (mcnt <= 0) return;                                // a spare tile of a device-made plan (mg_plan)
    const int nb0 = blockIdx.y * (GATEUP ? MG_BN / 2 : MG_BN);
    const int Kb = QUANT ? Kp : K;                        // B's k extent (codes past K are padding)
    const int G = QUANT ? (Kp >> gsh) : 0;
    const i64 rowb = W::boff(Kb);                         // bytes a weight row

    // A: 4 chunks of 8 halves a thread, rows tid/8 + 16i, column chunk tid % 8
    const u16* asrc[4];
    bool aok[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int r = (tid >> 3) + AR * i;
        aok[i] = r < mcnt;
        const int p = p0 + (aok[i] ? r : 0);
        const int ar = arow ? arow[p] : p;
        asrc[i] = xa + (i64)ar * lda + (tid & 7) * 8;
    }
    // B: CH chunks a thread; chunk i is smem row (tid + 128 i) / CPR, column chunk (tid % CPR)
    const u8* bq[CH];
    const u16* bs[CH];
    const u16* bm[CH];
    bool bok[CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
        const int r = (tid + THREADS * i) / W::CPR;
        int sel = 0, n = nb0 + r;
        if (GATEUP) {
            sel = (r & 63) >> 5;
            n = nb0 + (r >> 6) * 32 + (r & 31);
        }
        bok[i] = n < N;
        const int nn = bok[i] ? n : 0;
        const u64* e = wtab + (GATEUP ? 6 : 3) * ex + 3 * sel;
        bq[i] = (const u8*)e[0] + nn * rowb + W::boff((tid % W::CPR) * W::HPC);
        bs[i] = QUANT ? (const u16*)e[1] + (i64)nn * G : (const u16*)0;
        bm[i] = WT == WT_Q4 ? (const u16*)e[2] + (i64)nn * G : (const u16*)0;
    }
    uint4 braw[CH];
    u16 bsc[CH], bmn[CH];

    auto load_a = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = (tid >> 3) + AR * i, k = k0 + (tid & 7) * 8;
            const bool ok = aok[i] && k < ka;
            mg_cp16(mg_smem(As + stage * A_STAGE + r * MG_LDS + (tid & 7) * 8),
                    ok ? (const void*)(asrc[i] + k0) : (const void*)xa, ok);
        }
    };
    auto load_b = [&](int k0) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int k = k0 + (tid % W::CPR) * W::HPC;
            const bool ok = bok[i] && k < Kb;
            braw[i] = ok ? ld_stream(bq[i] + W::boff(k0)) : mg_u4(0u, 0u, 0u, 0u);
            if (QUANT) bsc[i] = ok ? __ldg(bs[i] + (k >> gsh)) : (u16)0;
            if (WT == WT_Q4) bmn[i] = ok ? __ldg(bm[i] + (k >> gsh)) : (u16)0;
        }
    };
    auto store_b = [&](int stage) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int r = (tid + THREADS * i) / W::CPR;
            mg_widen<WT>(braw[i], QUANT ? bsc[i] : (u16)0, WT == WT_Q4 ? bmn[i] : (u16)0,
                         Bs + stage * MG_B_STAGE + r * MG_LDS + (tid % W::CPR) * W::HPC);
        }
    };

    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][j][c] = 0.0f;
    const bool warp_on = wm * 32 < mcnt;                  // warp-uniform: rows past m are skipped
    const bool hi_on = wm * 32 + 16 < mcnt;

    // B runs two k-steps ahead: while the MMAs of step kt read stage cur, the registers hold step
    // kt+1's raw weights; halfway through the MMAs they are widened into the other stage and step
    // kt+2's loads are issued, so widening overlaps the tensor cores instead of following them.
    const int nk = (Kb + MG_BK - 1) / MG_BK;
    load_a(0, 0);
    mg_commit();
    load_b(0);
    store_b(0);
    if (nk > 1) load_b(MG_BK);
    mg_wait_all();
    __syncthreads();
    for (int kt = 0; kt < nk; ++kt) {
        const int cur = kt & 1;
        const bool more = kt + 1 < nk;
        if (more) load_a(cur ^ 1, (kt + 1) * MG_BK);
        mg_commit();
        const u16* as = As + cur * A_STAGE + (wm * 32 + (lane & 15)) * MG_LDS + (lane >> 4) * 8;
        const u16* bsm = Bs + cur * MG_B_STAGE + (wn * 64 + (lane & 7) + ((lane >> 4) << 3)) * MG_LDS
                         + ((lane >> 3) & 1) * 8;
#pragma unroll
        for (int kk = 0; kk < MG_BK / 16; ++kk) {
            if (warp_on) {
                u32 a[2][4], b[8][2];
                mg_ldsm4(mg_smem(as + kk * 16), a[0]);
                if (hi_on) mg_ldsm4(mg_smem(as + 16 * MG_LDS + kk * 16), a[1]);
#pragma unroll
                for (int jp = 0; jp < 4; ++jp) {
                    u32 r[4];
                    mg_ldsm4(mg_smem(bsm + jp * 16 * MG_LDS + kk * 16), r);
                    b[2 * jp][0] = r[0];
                    b[2 * jp][1] = r[1];
                    b[2 * jp + 1][0] = r[2];
                    b[2 * jp + 1][1] = r[3];
                }
#pragma unroll
                for (int j = 0; j < 8; ++j) mg_mma(acc[0][j], a[0], b[j][0], b[j][1]);
                if (hi_on) {
#pragma unroll
                    for (int j = 0; j < 8; ++j) mg_mma(acc[1][j], a[1], b[j][0], b[j][1]);
                }
            }
            if (kk == MG_SPLIT) {             // stage cur ^ 1 was last read before the previous barrier
                if (more) store_b(cur ^ 1);
                if (kt + 2 < nk) load_b((kt + 2) * MG_BK);
            }
        }
        mg_wait_all();
        __syncthreads();
    }

    // epilogue: c[0], c[1] at (row g, cols 2t, 2t+1), c[2], c[3] at row g + 8
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wm * 32 + mi * 16 + g + hf * 8;
            if (r >= mcnt) continue;
            const int p = p0 + r;
            const float inv = ainv[arow ? arow[p] : p];
            if (GATEUP) {
                float* o = out + (i64)p * ldo;
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = nb0 + wn * 32 + j * 8 + t4 * 2 + e;
                        if (col < ldo)
                            o[col] = silu_mul1(acc[mi][j][hf * 2 + e] * inv, acc[mi][j + 4][hf * 2 + e] * inv);
                    }
            } else {
                float* o = out + (i64)orow[p] * ldo;
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int n = nb0 + wn * 64 + j * 8 + t4 * 2 + e;
                        if (n < N) o[n] = acc[mi][j][hf * 2 + e] * inv;
                    }
            }
        }
}

#define MG_ARGS                                                                                     \
    const int *tiles, const u64 *wtab, const u16 *xa, int lda, int ka, const int *arow, const float *ainv, \
        int N, int K, int Kp, int gsh, float *out, int ldo, const int *orow
// MINB: blocks an SM the 64-row kernels are compiled for (registers <= 64K / (128 MINB)). The
// f16 / bf16 ones (no widening, fewer live registers) take 3: at 179 registers only 2 blocks (8
// warps) fit an SM, too few weight loads in flight for small experts (Nsight Compute, Qwen1.5-MoE
// at 512 tokens: 69% of DRAM bandwidth). H100, in a prefill layer: gate+up 330 -> 297 us, down
// 172 -> 159 us. q4 / q8 keep the compiler's choice (MINB 1); 2 and 4 were not compared.
#ifndef MG_MINB_F16
#define MG_MINB_F16 3
#endif
#define MG_KERNELS(WTN, WTC, MINB)                                                                  \
    extern "C" __global__ void __launch_bounds__(128, MINB) mg_gateup_##WTN(MG_ARGS) {              \
        mg_body<WTC, true, 64>(tiles, wtab, xa, lda, ka, arow, ainv, N, K, Kp, gsh, out, ldo, orow);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, MINB) mg_down_##WTN(MG_ARGS) {                \
        mg_body<WTC, false, 64>(tiles, wtab, xa, lda, ka, arow, ainv, N, K, Kp, gsh, out, ldo, orow);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) mg_gateup_##WTN##_m128(MG_ARGS) {             \
        mg_body<WTC, true, 128>(tiles, wtab, xa, lda, ka, arow, ainv, N, K, Kp, gsh, out, ldo, orow);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256) mg_down_##WTN##_m128(MG_ARGS) {               \
        mg_body<WTC, false, 128>(tiles, wtab, xa, lda, ka, arow, ainv, N, K, Kp, gsh, out, ldo, orow);\
    }
MG_KERNELS(q4, WT_Q4, 1)
MG_KERNELS(q8, WT_Q8, 1)
MG_KERNELS(f16, WT_F16, MG_MINB_F16)
MG_KERNELS(bf16, WT_BF16, MG_MINB_F16)

// Routing tables on the device, one block: pairs p = t*A + a of ids [P] grouped by expert.
// Out: arow[q] = token of the q-th grouped pair, slot[q] = its pair index p, tiles[n_max][4] =
// (expert, first grouped pair, rows <= bm, 0) in expert order; tiles past the last are empty
// (rows 0: mg_body returns at once), so the GEMM grids can be sized on the host without reading
// the counts back. Pairs of one expert come in atomic order: each row of the GEMMs is computed
// independently of its neighbours, so the products do not depend on it. smem: 2 * E ints.
extern "C" __global__ void mg_plan(const int* __restrict__ ids, int P, int A, int E, int bm,
                                   int* __restrict__ arow, int* __restrict__ slot, int* __restrict__ tiles,
                                   int n_max) {
    extern __shared__ int mg_cnt[];                   // [E] counts, then [E] cursors
    int* cur = mg_cnt + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) mg_cnt[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int e = ids[p];
        if ((unsigned)e < (unsigned)E) atomicAdd(&mg_cnt[e], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {                           // E and the tile count are small: one thread
        int s = 0, nt = 0;
        for (int e = 0; e < E; ++e) {
            cur[e] = s;
            for (int m0 = 0; m0 < mg_cnt[e] && nt < n_max; m0 += bm, ++nt) {
                tiles[4 * nt] = e;
                tiles[4 * nt + 1] = s + m0;
                tiles[4 * nt + 2] = min(bm, mg_cnt[e] - m0);
                tiles[4 * nt + 3] = 0;
            }
            s += mg_cnt[e];
        }
        for (; nt < n_max; ++nt) tiles[4 * nt] = tiles[4 * nt + 1] = tiles[4 * nt + 2] = tiles[4 * nt + 3] = 0;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) {
        const int e = ids[p];
        if ((unsigned)e >= (unsigned)E) continue;
        const int q = atomicAdd(&cur[e], 1);
        slot[q] = p;
        arow[q] = p / A;
    }
}
