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
// serves twice the rows, 16 for _m256: one block an SM), BM / 32 along M x 2 along N, each a
// 32 x 64 sub-tile = 2 x 8 MMAs a k16 (mg_body's WMR: rows a warp).
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
#ifndef MG_FRAG_AHEAD
#define MG_FRAG_AHEAD 1                      // ldmatrix one MMA unit ahead (1) or just before it (0)
#endif
#define MG_LDS 72                            // smem row stride in halves: 144 B, ldmatrix conflict-free
#define MG_B_STAGE (MG_BN * MG_LDS)
// dynamic shared memory: 2 * (BM + BN) * LDS * 2 bytes = 55296 (BM 64), 73728 (128), 110592 (256)

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
// 16 bytes registers -> shared (dst a shared-space address)
__device__ __forceinline__ void mg_sts(u32 dst, uint4 v) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
// 8 bytes of weights read once (ld_stream's half): .x, .y; .z = .w = 0
__device__ __forceinline__ uint4 mg_ld8(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
    r.z = r.w = 0u;
    return r;
}
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

// Widen one loaded chunk (NW 32-bit words: q4 2 or 4, else 4) to fp16 and store it at shared
// address dst (16-byte aligned). q4: w = code * s + m (codes exact in fp16, one rounding by the
// fused multiply-add); q8: w = code * s; bf16 -> f32 -> f16 (round to nearest).
template <int WT, int NW>
__device__ __forceinline__ void mg_widen(uint4 raw, u16 s, u16 m, u32 dst) {
    const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
    if (WT == WT_Q4) {
        const u32 s2 = (u32)s | ((u32)s << 16), m2 = (u32)m | ((u32)m << 16);
#pragma unroll
        for (int j = 0; j < NW; ++j) {       // word j: codes 8j..8j+7, nibble i = code 8j+i
            const u32 x = w[j];
            // 0x6400 | c is the fp16 1024 + c; pairs (c0, c4), (c1, c5), (c2, c6), (c3, c7)
            const u32 p0 = hsub2((x & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p1 = hsub2(((x >> 4) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p2 = hsub2(((x >> 8) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            const u32 p3 = hsub2(((x >> 12) & 0x000F000Fu) | 0x64006400u, 0x64006400u);
            mg_sts(dst + 16 * j, mg_u4(hfma2(mg_prmt(p0, p1, 0x5410u), s2, m2),     // (c0, c1)
                                       hfma2(mg_prmt(p2, p3, 0x5410u), s2, m2),     // (c2, c3)
                                       hfma2(mg_prmt(p0, p1, 0x7632u), s2, m2),     // (c4, c5)
                                       hfma2(mg_prmt(p2, p3, 0x7632u), s2, m2)));   // (c6, c7)
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
        mg_sts(dst, mg_u4(o[0], o[1], o[2], o[3]));
        mg_sts(dst + 16, mg_u4(o[4], o[5], o[6], o[7]));
    } else if (WT == WT_F16) {
        mg_sts(dst, raw);
    } else {                                 // bf16: (lo, hi) bit pairs
        u32 o[4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
            o[j] = mg_f2h2(__uint_as_float(w[j] << 16), __uint_as_float(w[j] & 0xFFFF0000u));
        mg_sts(dst, mg_u4(o[0], o[1], o[2], o[3]));
    }
}

template <int V> struct MgI { static constexpr int value = V; };

// Shared-memory addresses are 32-bit values computed once (a base per thread plus constant
// offsets), so every ldmatrix / store takes an immediate offset: before, the generic pointers were
// rebuilt with 64-bit arithmetic at each k16 step (~200 of a k-step's ~490 instructions).
template <int WT, bool GATEUP, int BM, int WMR>
__device__ __forceinline__ void mg_body(const int* __restrict__ tiles, const u64* __restrict__ wtab,
                                        const u16* __restrict__ xa, int lda, int ka,
                                        const int* __restrict__ arow, const float* __restrict__ ainv,
                                        int N, int K, int Kp, int gsh, float* __restrict__ out, int ldo,
                                        const int* __restrict__ orow) {
    typedef MgW<WT> W;
    constexpr bool QUANT = WT == WT_Q4 || WT == WT_Q8;
    // warps: BM / WMR along M x 2 along N, each WMR x 64 (MI m16 tiles x 8 n8 tiles)
    constexpr int MI = WMR / 16, THREADS = BM / WMR * 64;
    constexpr int AR = THREADS / 8, AP = BM / AR;          // A: AR rows a pass, AP passes
    // B chunks: 16 bytes, or 8 (SUB 2) where 16-byte chunks would leave threads without one
    constexpr int SUB = MG_BN * W::CPR >= THREADS ? 1 : THREADS / (MG_BN * W::CPR);
    constexpr int CPR = W::CPR * SUB, HPC = W::HPC / SUB, CH = MG_BN * CPR / THREADS;
    constexpr u32 ROWB = MG_LDS * 2, A_BYTES = BM * ROWB, B_BYTES = MG_BN * ROWB;
    extern __shared__ __align__(16) u16 mg_sm[];
    const u32 sA = mg_smem(mg_sm), sB = sA + 2 * A_BYTES;   // [2][BM][LDS] then [2][BN][LDS]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 1, wn = warp & 1;
    const int ex = tiles[4 * blockIdx.x], p0 = tiles[4 * blockIdx.x + 1], mcnt = tiles[4 * blockIdx.x + 2];
    if (mcnt <= 0) return;                                // a spare tile of a device-made plan (mg_plan)
    const int nb0 = blockIdx.y * (GATEUP ? MG_BN / 2 : MG_BN);
    const int Kb = QUANT ? Kp : K;                        // B's k extent (codes past K are padding)
    const int G = QUANT ? (Kp >> gsh) : 0;
    const i64 rowb = W::boff(Kb);                         // bytes a weight row

    // A: AP chunks of 8 halves a thread, rows tid/8 + AR i, column chunk tid % 8
    const int acol = (tid & 7) * 8, alim = ka - acol;     // the chunk is in range while k0 < alim
    // source chunk of pass i as a 16-byte index into xa (32 bits: fewer live registers than
    // pointers), ~0 for rows past m (zero-filled)
    u32 asrc[AP];
#pragma unroll
    for (int i = 0; i < AP; ++i) {
        const int r = (tid >> 3) + AR * i;
        const int ar = r < mcnt ? (arow ? arow[p0 + r] : p0 + r) : -1;
        asrc[i] = ar < 0 ? ~0u : (u32)(((i64)ar * lda + acol) >> 3);
    }
    const u32 adst = sA + ((tid >> 3) * MG_LDS + acol) * 2;
    // B: CH chunks a thread; chunk i is smem row (tid + THREADS i) / CPR, column chunk tid % CPR
    const int bc = (tid % CPR) * HPC, blim = Kb - bc;
    const u8* bq[CH];
    const u16* bs[CH];
    const u16* bm[CH];
    bool bok[CH];
#pragma unroll
    for (int i = 0; i < CH; ++i) {
        const int r = (tid + THREADS * i) / CPR;
        int sel = 0, n = nb0 + r;
        if (GATEUP) {
            sel = (r & 63) >> 5;
            n = nb0 + (r >> 6) * 32 + (r & 31);
        }
        bok[i] = n < N;
        const int nn = bok[i] ? n : 0;
        const u64* e = wtab + (GATEUP ? 6 : 3) * ex + 3 * sel;
        bq[i] = (const u8*)e[0] + nn * rowb + W::boff(bc);
        bs[i] = QUANT ? (const u16*)e[1] + (i64)nn * G + (bc >> gsh) : (const u16*)0;
        bm[i] = WT == WT_Q4 ? (const u16*)e[2] + (i64)nn * G + (bc >> gsh) : (const u16*)0;
    }
    const u32 bdst = sB + ((tid / CPR) * MG_LDS + bc) * 2;   // chunk i: + i (THREADS / CPR) rows
    uint4 braw[CH];
    u16 bsc[CH], bmn[CH];

    auto load_a = [&](u32 stage, int k0) {
#pragma unroll
        for (int i = 0; i < AP; ++i) {
            const bool ok = asrc[i] != ~0u && k0 < alim;
            mg_cp16(adst + stage + i * AR * ROWB, (const uint4*)xa + (ok ? asrc[i] + (k0 >> 3) : 0u), ok);
        }
    };
    // k0 is a multiple of BK and bc < BK, so (k0 + bc) >> gsh = (k0 >> gsh) + (bc >> gsh) for any group
    auto load_b = [&](int k0) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const bool ok = bok[i] && k0 < blim;
            const u8* q = bq[i] + W::boff(k0);
            braw[i] = !ok ? mg_u4(0u, 0u, 0u, 0u) : SUB == 1 ? ld_stream(q) : mg_ld8(q);
            if (QUANT) bsc[i] = ok ? __ldg(bs[i] + (k0 >> gsh)) : (u16)0;
            if (WT == WT_Q4) bmn[i] = ok ? __ldg(bm[i] + (k0 >> gsh)) : (u16)0;
        }
    };
    auto store_b = [&](u32 stage) {
#pragma unroll
        for (int i = 0; i < CH; ++i)
            mg_widen<WT, 4 / SUB>(braw[i], QUANT ? bsc[i] : (u16)0, WT == WT_Q4 ? bmn[i] : (u16)0,
                                  bdst + stage + i * (THREADS / CPR) * ROWB);
    };

    float acc[MI][8][4];
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][j][c] = 0.0f;
    // ldmatrix addresses of this lane in stage 0: A rows wm*WMR + lane % 16 (x4: k 0-7, 8-15);
    // B rows wn*64 + (lane % 8) + 8 (lane / 16), k half (lane / 8) % 2
    const u32 a_ld = sA + ((wm * WMR + (lane & 15)) * MG_LDS + (lane >> 4) * 8) * 2;
    const u32 b_ld = sB + ((wn * 64 + (lane & 7) + ((lane >> 4) << 3)) * MG_LDS + ((lane >> 3) & 1) * 8) * 2;
    // m16 tiles of the warp that get MMAs (warp-uniform): all MI if more than half its rows hold
    // pairs, the first MI / 2 if any does, else none (tiles past m multiply zero rows, unstored)
    const int wrows = mcnt - wm * WMR, nm = wrows > WMR / 2 ? MI : wrows > 0 ? MI / 2 : 0;

    // B runs two k-steps ahead: while the MMAs of step kt read stage cur, the registers hold step
    // kt+1's raw weights; halfway through the MMAs they are widened into the other stage and step
    // kt+2's loads are issued, so widening overlaps the tensor cores instead of following them.
    // Fragments run one k16 ahead: the ldmatrix of k16 step kk+1 flies during the MMAs of kk.
    const int nk = (Kb + MG_BK - 1) / MG_BK;
    // one k-step over stage cur with NM m16 halves of MMAs
    auto kstep = [&](auto nmt, int kt) {
        constexpr int NM = decltype(nmt)::value;
        // fragments one unit ahead need a second set of registers: 32-row warps only
        constexpr bool AHEAD = MG_FRAG_AHEAD && MI == 2;
        const int cur = kt & 1;
        const u32 ao = a_ld + cur * A_BYTES, bo = b_ld + cur * B_BYTES;
        // fragments of unit u = (k16 step u / 2, B half u % 2: n8 tiles 4h..4h+3)
        u32 fa[2][MI][4], fb[2][4][2];
        auto frag_a = [&](int kk) {
#pragma unroll
            for (int mi = 0; mi < NM; ++mi) mg_ldsm4(ao + mi * 16 * ROWB + kk * 32, fa[kk & 1][mi]);
        };
        auto frag_b = [&](int u) {
            if constexpr (NM > 0) {
#pragma unroll
                for (int jp = 0; jp < 2; ++jp) {
                    u32 r[4];
                    mg_ldsm4(bo + ((u & 1) * 2 + jp) * 16 * ROWB + (u >> 1) * 32, r);
                    fb[u & 1][2 * jp][0] = r[0];
                    fb[u & 1][2 * jp][1] = r[1];
                    fb[u & 1][2 * jp + 1][0] = r[2];
                    fb[u & 1][2 * jp + 1][1] = r[3];
                }
            }
        };
        frag_a(0);
        frag_b(0);
#pragma unroll
        for (int u = 0; u < 2 * (MG_BK / 16); ++u) {
            const int kk = u >> 1;
            if (AHEAD && u + 1 < 2 * (MG_BK / 16)) {   // the next unit's ldmatrix flies during these MMAs
                if (u & 1) frag_a(kk + 1);
                frag_b(u + 1);
            }
#pragma unroll
            for (int mi = 0; mi < NM; ++mi)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    mg_mma(acc[mi][(u & 1) * 4 + j], fa[kk & 1][mi], fb[u & 1][j][0], fb[u & 1][j][1]);
            if (!AHEAD && u + 1 < 2 * (MG_BK / 16)) {
                if (u & 1) frag_a(kk + 1);
                frag_b(u + 1);
            }
            if (u == 2 * MG_SPLIT + 1) {      // stage cur ^ 1 was last read before the previous barrier
                if (kt + 1 < nk) store_b((cur ^ 1) * B_BYTES);
                if (kt + 2 < nk) load_b((kt + 2) * MG_BK);
            }
        }
    };
    load_a(0, 0);
    mg_commit();
    load_b(0);
    store_b(0);
    if (nk > 1) load_b(MG_BK);
    mg_wait_all();
    __syncthreads();
    for (int kt = 0; kt < nk; ++kt) {
        if (kt + 1 < nk) load_a(((kt + 1) & 1) * A_BYTES, (kt + 1) * MG_BK);
        mg_commit();
        if (nm == MI)
            kstep(MgI<MI>(), kt);
        else if (nm > 0)
            kstep(MgI<MI / 2>(), kt);
        else
            kstep(MgI<0>(), kt);
        mg_wait_all();
        __syncthreads();
    }

    // epilogue: c[0], c[1] at (row g, cols 2t, 2t+1), c[2], c[3] at row g + 8
    const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int r = wm * WMR + mi * 16 + g + hf * 8;
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
#define MG_PASS tiles, wtab, xa, lda, ka, arow, ainv, N, K, Kp, gsh, out, ldo, orow
#ifndef MG_MINB_F16
#define MG_MINB_F16 3
#endif
#define MG_KERNELS(WTN, WTC, MINB)                                                                  \
    extern "C" __global__ void __launch_bounds__(128, MINB) mg_gateup_##WTN(MG_ARGS) {              \
        mg_body<WTC, true, 64, 32>(MG_PASS);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(128, MINB) mg_down_##WTN(MG_ARGS) {                \
        mg_body<WTC, false, 64, 32>(MG_PASS);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2) mg_gateup_##WTN##_m128(MG_ARGS) {          \
        mg_body<WTC, true, 128, 32>(MG_PASS);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2) mg_down_##WTN##_m128(MG_ARGS) {            \
        mg_body<WTC, false, 128, 32>(MG_PASS);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(512, 1) mg_gateup_##WTN##_m256(MG_ARGS) {          \
        mg_body<WTC, true, 256, 32>(MG_PASS);\
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(512, 1) mg_down_##WTN##_m256(MG_ARGS) {            \
        mg_body<WTC, false, 256, 32>(MG_PASS);\
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
