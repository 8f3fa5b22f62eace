// Row dot products shared by the GEMV, router and MoE kernels (pasted after common.cuh).
//
// A warp computes RW weight rows at once against T tokens; lane l takes K-chunks l, l+32, ...
// (a chunk is 32 codes: 16 bytes of q4, 32 of q8; 8 values of a float type), U chunks per
// loop trip so that RW*U 16-byte loads are in flight per lane before the first is used.
// Quantized rows: codes are turned into fp16 (exact), multiplied with the fp16 activations
// in half2 pairs (8 products per partial sum), partial sums go to fp32 and the group scale
// and min are applied in fp32:
//   q4: w = s*q + m = s*(q-8) + (m+8s)   ->  chunk = s*sum((q-8)x) + (m+8s)*sum(x)
//   q8: w = s*q                           ->  chunk = s*sum(q x)
// Centring q4 codes keeps the fp16 partial sums small (better rounding, no cancellation).
// With int8 activations (ACT_I8, common.cuh) a chunk is two exact integer sums (dp4a) and float
// scaling:  q4: chunk = d * (s * sum(q xq) + m * sum(xq)),  q8: chunk = d * s * sum(q xq).

// 32 q4 codes -> 16 half2 of (code - 8), pairs (k0,k4) (k1,k5) (k2,k6) (k3,k7) of each 8
__device__ __forceinline__ void q4_decode(const uint4 w, u32 p[16]) {
    const u32 MAGIC = 0x64006400u;        // 1024.0 in both halves: OR-ing a code into the mantissa
    const u32 LOW_BIAS = 0x64086408u;     // 1032 = 1024 + 8
    const u32 SIXTEENTH = 0x2C002C00u;    // 1/16: a high nibble lands as 1024 + 16 q
    const u32 HIGH_BIAS = 0xD480D480u;    // -72 = -(1024/16 + 8)
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 a = ws[j], b = a >> 8;
        p[4 * j + 0] = hsub2((a & 0x000F000Fu) | MAGIC, LOW_BIAS);
        p[4 * j + 1] = hfma2((a & 0x00F000F0u) | MAGIC, SIXTEENTH, HIGH_BIAS);
        p[4 * j + 2] = hsub2((b & 0x000F000Fu) | MAGIC, LOW_BIAS);
        p[4 * j + 3] = hfma2((b & 0x00F000F0u) | MAGIC, SIXTEENTH, HIGH_BIAS);
    }
}

// 32 int8 codes (two 16-byte loads) -> 16 half2 in the same pair order
__device__ __forceinline__ void q8_decode(const uint4 a, const uint4 b, u32 p[16]) {
    const u32 M = 0x64646464u;            // high bytes of fp16 1024.0
    const u32 BIAS = 0x64806480u;         // 1152 = 1024 + 128 (codes are stored xor 0x80 below)
    const u32 ws[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 w0 = ws[2 * j] ^ 0x80808080u, w1 = ws[2 * j + 1] ^ 0x80808080u;   // q + 128
        const u32 lo = __byte_perm(w0, w1, 0x5140);   // bytes k0 k4 k1 k5
        const u32 hi = __byte_perm(w0, w1, 0x7362);   // bytes k2 k6 k3 k7
        p[4 * j + 0] = hsub2(__byte_perm(lo, M, 0x4140), BIAS);
        p[4 * j + 1] = hsub2(__byte_perm(lo, M, 0x4342), BIAS);
        p[4 * j + 2] = hsub2(__byte_perm(hi, M, 0x4140), BIAS);
        p[4 * j + 3] = hsub2(__byte_perm(hi, M, 0x4342), BIAS);
    }
}

// sum of 4 byte products plus c: a's bytes unsigned (q4 nibbles), or signed (q8 codes); b's signed
__device__ __forceinline__ int dp4a_us(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int dp4a_ss(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// the int8 codes of chunk c of one token's row (xrow: the row's start, as for the fp16 prep; 2
// planes of ncx uint4): 8 words, even / odd k of each 8 values in alternate words (common.cuh)
__device__ __forceinline__ void load_xchunk_i8(const u16* xrow, int c, int ncx, u32 xv[8]) {
    const uint4* p = (const uint4*)xrow + c;
    const uint4 a = ld_nc4(p), b = ld_nc4(p + ncx);
    xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
    xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
}

// sum over one chunk of q4 codes (w: 32 codes) times its int8 activations xv, exact: 8 dp4a and
// 9 bit operations. A high nibble is taken in place (16 q, unsigned bytes): s1 = 16 * its sum.
__device__ __forceinline__ int q4_dot_i8(const uint4 w, const u32 xv[8]) {
    const u32 ws[4] = {w.x, w.y, w.z, w.w};
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        s0 = dp4a_us(ws[j] & 0x0F0F0F0Fu, xv[2 * j], s0);        // k 8j, 8j+2, 8j+4, 8j+6
        s1 = dp4a_us(ws[j] & 0xF0F0F0F0u, xv[2 * j + 1], s1);    // k 8j+1, 8j+3, ... (times 16)
    }
    return s0 + (s1 >> 4);
}

// a chunk's int8 activations in k order (for q8 codes, which are stored in k order): once per
// chunk and token, shared by the rows
__device__ __forceinline__ void x_korder(const u32 xv[8], u32 xn[8]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        xn[2 * j] = __byte_perm(xv[2 * j], xv[2 * j + 1], 0x5140);       // x0 x1 x2 x3
        xn[2 * j + 1] = __byte_perm(xv[2 * j], xv[2 * j + 1], 0x7362);   // x4 x5 x6 x7
    }
}

// the same for 32 int8 codes in k order (two 16-byte loads) and activations in k order (x_korder)
__device__ __forceinline__ int q8_dot_i8(const uint4 a, const uint4 b, const u32 xn[8]) {
    const u32 ws[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    int s0 = 0, s1 = 0;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
        s0 = dp4a_ss(ws[j], xn[j], s0);
        s1 = dp4a_ss(ws[j + 1], xn[j + 1], s1);
    }
    return s0 + s1;
}

// the exact integer sum of one chunk of row weights (w[0], w[NL - 1]: its loads) with activations
// xv (kernel order) / xn (k order, q8 only)
template <int WT>
__device__ __forceinline__ int chunk_dot_i8(const uint4 w0, const uint4 w1, const u32 xv[8], const u32 xn[8]) {
    return WT == WT_Q4 ? q4_dot_i8(w0, xv) : q8_dot_i8(w0, w1, xn);
}

// the prepared fp16 activations of chunk c of one token's row (4 planes: 16 packed pairs)
__device__ __forceinline__ void load_xchunk(const u16* xrow, int c, int ncx, uint4 x[4]) {
    const uint4* xv = (const uint4*)xrow + c;
#pragma unroll
    for (int j = 0; j < 4; ++j) x[j] = ld_nc4(xv + j * ncx);
}

// sum over one chunk of decoded codes times its activations (two chains of 8 products)
__device__ __forceinline__ float dot16(const u32 p[16], const uint4 x[4]) {
    u32 a0 = 0u, a1 = 0u;
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
        a0 = hfma2(p[4 * j + 0], x[j].x, a0); a0 = hfma2(p[4 * j + 1], x[j].y, a0);
        a0 = hfma2(p[4 * j + 2], x[j].z, a0); a0 = hfma2(p[4 * j + 3], x[j].w, a0);
        a1 = hfma2(p[4 * j + 4], x[j + 1].x, a1); a1 = hfma2(p[4 * j + 5], x[j + 1].y, a1);
        a1 = hfma2(p[4 * j + 6], x[j + 1].z, a1); a1 = hfma2(p[4 * j + 7], x[j + 1].w, a1);
    }
    return h2sum(a0) + h2sum(a1);
}

__device__ __forceinline__ void unpack8(int wt, const uint4 a, const uint4 b, float f[8]) {
    if (wt == WT_F32) {
        f[0] = __uint_as_float(a.x); f[1] = __uint_as_float(a.y);
        f[2] = __uint_as_float(a.z); f[3] = __uint_as_float(a.w);
        f[4] = __uint_as_float(b.x); f[5] = __uint_as_float(b.y);
        f[6] = __uint_as_float(b.z); f[7] = __uint_as_float(b.w);
    } else {
        const u32 w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (wt == WT_F16) { f[2 * j] = h2f((u16)(w[j] & 0xFFFFu)); f[2 * j + 1] = h2f((u16)(w[j] >> 16)); }
            else { f[2 * j] = __uint_as_float(w[j] << 16); f[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u); }
        }
    }
}

// s + f . (a, b), the eight products added one by one in k order (float weight rows)
__device__ __forceinline__ float add8(float s, const float (&f)[8], const float4 a, const float4 b) {
    s += f[0] * a.x; s += f[1] * a.y; s += f[2] * a.z; s += f[3] * a.w;
    s += f[4] * b.x; s += f[5] * b.y; s += f[6] * b.z; s += f[7] * b.w;
    return s;
}

// units of a row for dot_rows' ranges: 32-code chunks (quantized), 8 values (float, K % 8 == 0)
// or single values
__device__ __forceinline__ int row_units(int wt, int K, int Kp) {
    return (wt == WT_Q4 || wt == WT_Q8) ? (Kp >> 5) : ((K & 7) == 0 ? (K >> 3) : K);
}

// acc[r][t] += (this lane's share of units u0 .. u1-1 of) row r . x of token t.
// Quantized WT read xh/xs/xc (KX values a token, prep format ACT); float WT read x32 (ldx a token).
template <int WT, int T, int RW, int U, int ACT = ACT_F16>
__device__ __forceinline__ void dot_rows(const u8* const qr[RW], const u16* const sr[RW], const u16* const mr[RW],
                                         const int K, const int Kp, const int gshift,
                                         const float* __restrict__ x32, const int ldx,
                                         const u16* __restrict__ xh, const float* __restrict__ xs,
                                         const float* __restrict__ xc, const int KX, float acc[RW][T],
                                         const int u0, const int u1) {
    const int lane = threadIdx.x & 31;
    if (WT == WT_Q4 || WT == WT_Q8) {
        constexpr int CB = WT == WT_Q4 ? 16 : 32;      // bytes of one chunk
        constexpr int NL = CB / 16;                    // 16-byte loads per chunk
        const int nc = u1, ncx = KX >> 5;
        for (int c0 = u0 + lane; c0 < nc; c0 += 32 * U) {
            uint4 w[U][RW][NL];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < nc) {
#pragma unroll
                    for (int r = 0; r < RW; ++r)
#pragma unroll
                        for (int j = 0; j < NL; ++j) w[u][r][j] = ld_stream(qr[r] + (i64)c * CB + 16 * j);
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < nc) {
                    const int g = c >> gshift;
#pragma unroll
                    for (int r = 0; r < RW; ++r) {
                        if (ACT == ACT_I8) {
                            const float sc = h2f(__ldg(sr[r] + g));
                            const float mc = WT == WT_Q4 ? h2f(__ldg(mr[r] + g)) : 0.0f;
#pragma unroll
                            for (int t = 0; t < T; ++t) {
                                u32 xv[8], xn[8];
                                load_xchunk_i8(xh + (i64)t * KX, c, ncx, xv);
                                if (WT == WT_Q8) x_korder(xv, xn);
                                const int dot = chunk_dot_i8<WT>(w[u][r][0], w[u][r][NL - 1], xv, xn);
                                const float xd = __ldg(xc + t * ncx + c);
                                acc[r][t] += xd * (WT == WT_Q4 ? sc * (float)dot + mc * __ldg(xs + t * ncx + c)
                                                               : sc * (float)dot);
                            }
                            continue;
                        }
                        u32 p[16];
                        if (WT == WT_Q4) q4_decode(w[u][r][0], p);
                        else q8_decode(w[u][r][0], w[u][r][NL - 1], p);
                        const float sc = h2f(__ldg(sr[r] + g));
                        const float mc = WT == WT_Q4 ? h2f(__ldg(mr[r] + g)) + 8.0f * sc : 0.0f;
#pragma unroll
                        for (int t = 0; t < T; ++t) {
                            uint4 xv[4];
                            load_xchunk(xh + (i64)t * KX, c, ncx, xv);
                            const float d = dot16(p, xv);
                            const float part = WT == WT_Q4 ? sc * d + mc * __ldg(xs + t * ncx + c) : sc * d;
                            acc[r][t] += part * __ldg(xc + t * ncx + c);
                        }
                    }
                }
            }
        }
    } else if ((K & 7) == 0) {
        constexpr int NL = WT == WT_F32 ? 2 : 1;
        constexpr int ES = WT == WT_F32 ? 4 : 2;
        const int n8 = u1;
        for (int c0 = u0 + lane; c0 < n8; c0 += 32 * U) {
            uint4 w[U][RW][NL];
            float4 xa[U][T], xb[U][T];         // x with the weights: one memory latency a trip
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < n8) {
#pragma unroll
                    for (int r = 0; r < RW; ++r)
#pragma unroll
                        for (int j = 0; j < NL; ++j) w[u][r][j] = ld_stream(qr[r] + (i64)c * 8 * ES + 16 * j);
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        xa[u][t] = __ldg((const float4*)(x32 + (i64)t * ldx + 8 * c));
                        xb[u][t] = __ldg((const float4*)(x32 + (i64)t * ldx + 8 * c + 4));
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int c = c0 + 32 * u;
                if (c < n8) {
                    float f[RW][8];
#pragma unroll
                    for (int r = 0; r < RW; ++r) unpack8(WT, w[u][r][0], w[u][r][NL - 1], f[r]);
#pragma unroll
                    for (int t = 0; t < T; ++t) {
                        const float4 a = xa[u][t], b = xb[u][t];
#pragma unroll
                        for (int r = 0; r < RW; ++r) acc[r][t] = add8(acc[r][t], f[r], a, b);
                    }
                }
            }
        }
    } else {
        // K not a multiple of 8 (tiny test models): one element at a time
        for (int k = u0 + lane; k < u1; k += 32) {
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                float wv;
                if (WT == WT_F32) wv = ((const float*)qr[r])[k];
                else if (WT == WT_F16) wv = h2f(((const u16*)qr[r])[k]);
                else wv = bf2f(((const u16*)qr[r])[k]);
#pragma unroll
                for (int t = 0; t < T; ++t) acc[r][t] += wv * x32[(i64)t * ldx + k];
            }
        }
    }
}

// bytes of one stored row
__device__ __forceinline__ i64 row_bytes(int wt, int K, int Kp) {
    return wt == WT_Q4 ? (i64)(Kp >> 1) : wt == WT_Q8 ? (i64)Kp : wt == WT_F32 ? 4ll * K : 2ll * K;
}

// pointers of RW consecutive rows from row0 (clamped to the last row; callers skip the writes)
template <int RW>
__device__ __forceinline__ void row_ptrs(int wt, const u8* q, const u16* s, const u16* m, int row0, int N,
                                         int K, int Kp, int gshift,
                                         const u8* qr[RW], const u16* sr[RW], const u16* mr[RW]) {
    const i64 rb = row_bytes(wt, K, Kp);
    const int G = wt >= WT_Q4 ? (Kp >> (gshift + 5)) : 0;
#pragma unroll
    for (int r = 0; r < RW; ++r) {
        const int row = min(row0 + r, N - 1);
        qr[r] = q + row * rb;
        sr[r] = s + (i64)row * G;
        mr[r] = m + (i64)row * G;
    }
}

// bytes of one row's scales (or mins)
__device__ __forceinline__ i64 scale_row_bytes(int wt, int Kp, int gshift) {
    return wt >= WT_Q4 ? 2 * (i64)(Kp >> (gshift + 5)) : 0;
}

