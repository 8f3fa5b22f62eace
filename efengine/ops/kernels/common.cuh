// Helpers shared by every efengine kernel. The loader (gpu_kernels.py) pastes this file in
// front of each .cu source, so sources compile under NVRTC with no include paths. Half
// precision goes through inline PTX (the same instructions cuda_fp16.h emits) so that no
// toolkit header is needed on the machine.
//
// Weight types (WT): 0 f32, 1 f16, 2 bf16 (raw bits), 4 q4 (affine, codes two a byte, low
// nibble = even k), 8 q8 (symmetric int8). Quantized rows hold Kp codes (K rounded up to the
// group), scales s and mins m fp16 [N, Kp/group].
//
// Activation prep ("xprep") for quantized weights: x is cut into chunks of 32 values along K;
// each chunk gets its own power-of-two scale so that its largest value lies in [8, 16), and is
// stored as fp16 in the order the q4/q8 decoders produce codes: within every 8 values
// [x0 x4 x1 x5 x2 x6 x3 x7]. A token's row holds NC = KX/32 chunks as 4 planes of 16 bytes:
// plane j, chunk c at uint4 index j * NC + c (so the lanes of a warp, which take consecutive
// chunks, read consecutive 16-byte words). xs = sum of the (scaled, fp16-rounded) chunk,
// xc = 1 / scale. The bound keeps every fp16 partial sum of 8 products far below 65504.
//
// Int8 prep ("int8" activations, the dp4a kernels; efengine/ops/act_int8.py is the numpy twin):
// chunk c becomes 32 codes q = rint(x * (1 / d)) with d = amax * float32(1/127), so x ~ d * q
// (float32, correctly rounded, round half to even). A chunk whose amax is below 2^-100, zero
// included, gets d = 0 and codes 0; one holding inf or NaN d = NaN and codes 0. It fills the
// buffers of the fp16 prep at the same row addresses: row r's codes are the first KX bytes of its
// 2 * KX, as 2 planes of 16 bytes a chunk (plane j, chunk c at uint4 index j * NC + c: a warp's
// loads are contiguous), xs = the chunk's code sum (an exact integer), xc = d.
// Inside a chunk every 8 values x0..x7 are stored [x0 x2 x4 x6 | x1 x3 x5 x7]: a q4 word's low
// nibbles (even k) meet the first 32-bit word, its high nibbles the second, with no byte shuffling;
// q8 codes (k order) take the activations after one byte_perm a word, once per chunk and token.
#define ACT_F16 0
#define ACT_I8 1

#define WT_F32 0
#define WT_F16 1
#define WT_BF16 2
#define WT_Q4 4
#define WT_Q8 8

#ifndef INFINITY                 // NVRTC has no <math.h>
#define INFINITY __int_as_float(0x7f800000)
#endif

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ float h2f(u16 a) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(a));
    return f;
}
__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// the two halves of a packed pair, summed in float32
__device__ __forceinline__ float h2sum(u32 a) {
    return h2f((u16)(a & 0xFFFFu)) + h2f((u16)(a >> 16));
}
__device__ __forceinline__ float bf2f(u16 b) { return __uint_as_float(((u32)b) << 16); }

// 16 bytes of weights that are read exactly once: do not let them evict activations from L1
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ uint4 ld_nc4(const void* p) { return __ldg((const uint4*)p); }

// Programmatic dependent launch (sm_90 and later). A graph whose kernels are launched with the
// PDL attribute (gpu_kernels.dependent_launches) may schedule a kernel's blocks while the previous
// kernel still runs, which hides most of the ~2 us gap between two of a decode step's ~300 small
// kernels. Every kernel of the modules that take such launches calls grid_dep() first, before it
// reads or writes anything: `wait` returns once the previous grid has finished and its writes are
// visible, so the order is exactly that of a plain stream; then the next kernel may launch.
// Without the attribute (or before sm_90) both are no-ops.
__device__ __forceinline__ void grid_dep() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Release / acquire fence at GPU scope: enough to publish values before a counter increment and to
// read them after observing it (the last-arriver pattern); __threadfence() is a sequentially
// consistent fence, a stronger and slower barrier than these hand-offs need.
__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Softmax of one row held by a warp in registers: x[i] is element lane + 32 i, -inf where the row
// has no element (it comes out 0). In place; at least one element must be finite.
template <int N>
__device__ __forceinline__ void warp_softmax(float (&x)[N]) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; ++i) m = fmaxf(m, x[i]);
    m = warp_max(m);
    float l = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        x[i] = expf(x[i] - m);
        l += x[i];
    }
    l = warp_sum(l);
#pragma unroll
    for (int i = 0; i < N; ++i) x[i] = x[i] / l;
}

// block-wide sum / max; `red` is shared scratch of 32 floats; every thread gets the result
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[w] = v;
    __syncthreads();
    float r = lane < nw ? red[lane] : 0.f;
    return warp_sum(r);
}

// silu(g) * u exactly as the numpy reference writes it: g / (1 + exp(-g)) * u
__device__ __forceinline__ float silu_mul1(float g, float u) { return g / (1.0f + expf(-g)) * u; }
__device__ __forceinline__ float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

// One stored element of a weight matrix, dequantized the way efengine/quant.py does it
// (q * s, then + m: two roundings, no fused multiply-add, so results match numpy bit for bit).
__device__ __forceinline__ float deq_elem(int wt, const u8* q, const u16* s, const u16* m,
                                          i64 row, int k, int K, int Kp, int group) {
    if (wt == WT_F32) return ((const float*)q)[row * K + k];
    if (wt == WT_F16) return h2f(((const u16*)q)[row * K + k]);
    if (wt == WT_BF16) return bf2f(((const u16*)q)[row * K + k]);
    const int G = Kp / group;
    const float sc = h2f(s[row * G + k / group]);
    if (wt == WT_Q8) return __fmul_rn((float)((const signed char*)q)[row * Kp + k], sc);
    const u8 b = q[row * (Kp >> 1) + (k >> 1)];
    const float code = (float)((k & 1) ? (b >> 4) : (b & 15));
    return __fadd_rn(__fmul_rn(code, sc), h2f(m[row * G + k / group]));
}

#define PREP_TARGET_EXP 4   // a chunk's largest |x| is scaled into [2^(E-1), 2^E) = [8, 16)

// One warp: the xprep of chunk c of a token's row (xh_row, NC = ncx chunks); lane j holds value j.
__device__ __forceinline__ void prep_chunk(float v, u16* xh_row, int c, int ncx, float* xs_c, float* xc_c) {
    const int lane = threadIdx.x & 31;
    const float amax = warp_max(fabsf(v));
    int e = 0;
    frexpf(amax, &e);                                    // amax = f * 2^e, f in [0.5, 1)
    const bool ok = amax > 0.0f && amax <= 3.0e38f;      // zero, inf and NaN chunks keep scale 1
    const float scale = ok ? ldexpf(1.0f, PREP_TARGET_EXP - e) : 1.0f;
    const u16 hv = f2h(v * scale);
    const float sum = warp_sum(h2f(hv));
    const int i = lane & 7;
    const int pos = i < 4 ? 2 * i : 2 * (i - 4) + 1;     // x0 x4 x1 x5 x2 x6 x3 x7 in plane lane / 8
    xh_row[(((i64)(lane >> 3) * ncx + c) << 3) + pos] = hv;
    if (lane == 0) {
        *xs_c = sum;
        *xc_c = ok ? ldexpf(1.0f, e - PREP_TARGET_EXP) : 1.0f;
    }
}

#define PREP_I8_STEP 0x1.020408p-7f    // float32(1 / 127)
#define PREP_I8_TINY 0x1p-100f         // chunks with a smaller largest |x| are taken as zero

// One warp: the int8 prep of chunk c of a row (q_row: its codes, NC = ncx chunks), lane j holding value j.
__device__ __forceinline__ void prep_chunk_i8(float v, u8* q_row, int c, int ncx, float* xs_c, float* xc_c) {
    const int lane = threadIdx.x & 31;
    const bool bad = __any_sync(0xffffffffu, !(fabsf(v) <= 3.402823466e38f));     // inf or NaN
    const float amax = warp_max(fabsf(v));
    const bool ok = !bad && amax >= PREP_I8_TINY;
    // correctly rounded products and reciprocal whatever the compiler flags (the numpy twin's ops)
    const float d = ok ? __fmul_rn(amax, PREP_I8_STEP) : (bad ? __int_as_float(0x7fc00000) : 0.0f);
    const int q = ok ? __float2int_rn(__fmul_rn(v, __frcp_rn(d))) : 0;
    const float sum = warp_sum((float)q);                // |sum| <= 32 * 127: exact
    const int pos = (lane & ~7) | ((lane & 1) << 2) | ((lane >> 1) & 3);      // byte in the chunk
    q_row[((i64)((pos >> 4) * ncx + c) << 4) + (pos & 15)] = (u8)q;
    if (lane == 0) {
        *xs_c = sum;
        *xc_c = d;
    }
}

// The prep of the act format (ACT_F16 / ACT_I8) of chunk c of a token's row xh_row (see above).
__device__ __forceinline__ void prep_chunk_act(int act, float v, u16* xh_row, int c, int ncx, float* xs_c,
                                               float* xc_c) {
    if (act == ACT_I8) prep_chunk_i8(v, (u8*)xh_row, c, ncx, xs_c, xc_c);
    else prep_chunk(v, xh_row, c, ncx, xs_c, xc_c);
}

// ---- thread block clusters (sm_90+): the blocks of a cluster hand partial results to one another
// through distributed shared memory and a cluster barrier, no global workspace, counter or fence.
// A kernel declared with CLUSTER_DIMS has a fixed cluster shape; before sm_90 the macro is empty
// and such kernels take a one-block fallback (see the router and decode attention).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define HAVE_CLUSTERS 1
#define CLUSTER_DIMS(x, y, z) __cluster_dims__(x, y, z)
#else
#define HAVE_CLUSTERS 0
#define CLUSTER_DIMS(x, y, z)
#endif

#if HAVE_CLUSTERS
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Split barrier over every thread of the cluster: arrive (relaxed) early, wait before the first
// access to another block's shared memory (a block's shared memory is only valid once it runs).
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }
// full barrier: shared-memory writes before it (local or remote) are visible to every block after it
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
}
// *p of block `rank` of the cluster (p: this block's address of the same shared variable) = v
__device__ __forceinline__ void st_cluster(const float* p, u32 rank, float v) {
    u64 g;
    u32 a, r;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(g) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"((u32)g), "r"(rank));
    a = r;
    asm volatile("st.shared::cluster.f32 [%0], %1;" :: "r"(a), "f"(v) : "memory");
}
#endif

// hints: fetch the 128-byte line of p / the lines of [p, p + n) (warp-cooperative) into L2
__device__ __forceinline__ void prefetch_line(const void* p) { asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); }
__device__ __forceinline__ void prefetch_l2(const void* p, i64 n) {
    const int lane = threadIdx.x & 31;
    const u64 b = (u64)p & ~127ull, e = (u64)p + (u64)n;
    for (u64 a = b + 128ull * lane; a < e; a += 128ull * 32) prefetch_line((const void*)a);
}
