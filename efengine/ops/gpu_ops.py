"""Launch wrappers of the CUDA kernels: shapes, dtypes and contiguity are checked here.

Legend: T tokens, R rows, K inputs, N outputs, KX prepared length (>= every consumer's Kp),
H / G query / kv heads, dq / dv head dims, S keys, E experts, A active experts, P = T*A pairs,
I expert width, D hidden.

The functions take preallocated outputs where a captured CUDA graph needs fixed addresses
(gpu_decode.py) and allocate otherwise. None of them synchronizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from .act_int8 import check_act
from .gpu_kernels import (ACT, ACT_SUFFIX, addr, cdiv, cupy, driver_function, f32, i32, i64, kernel, launch,
                          ptr, resident_blocks, u64)
from .gpu_weights import GpuWeight, PartPlace

GEMV_T = (8, 4, 2, 1)           # token counts with compiled GEMV variants
GEMV_RW = {1: 2, 2: 2, 4: 2, 8: 1}
ATT_WARPS = 4
ATT_HEAD_DIMS = (64, 128)     # attention kernels compiled for dq = dv = these (others: the generic one)
# decode attention in clusters (attn.cu attention_dec_*): ATD_NS blocks a cluster, ATD_TK keys a tile,
# at most ATD_NR query rows a kv group, a cluster a group for each ATD_CK keys of the launch's S
ATD_NS, ATD_TK, ATD_NR, ATD_THREADS, ATD_CK = 8, 64, 8, 256, 512
RT_NB, RT_THREADS = 8, 256    # router: blocks a token (one cluster, gemv.cu RT_NB) and their threads


def _f32c(a, what: str):
    if a.dtype != cupy.float32:
        raise ConfigError(f"{what}: expected float32, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ConfigError(f"{what}: expected a contiguous array")
    return a


class XPrep:
    """Prepared activations of R rows for quantized weights of row length <= KX (see common.cuh).

    act "f16": xh [R, KX] fp16 values in the kernels' order, xs chunk sums, xc 1 / chunk scale;
    act "int8": int8 codes in the first KX bytes of each row of xh (same row addresses), xs the
    chunks' code sums, xc their scales d (act_int8.py). The kernels that read or write a prep take
    its format from here (gemv_launch, router, moe_gateup, moe_down, attention, rows_prep)."""

    def __init__(self, R: int, K: int, KX: int, act: str = "f16"):
        if KX % 32 or KX < K:
            raise ConfigError(f"prepared length {KX} must be a multiple of 32 and >= K={K}")
        self.R, self.K, self.KX, self.act = R, K, KX, check_act(act)
        self.xh = cupy.zeros((R, KX), dtype=cupy.uint16)
        self.xs = cupy.zeros((R, KX // 32), dtype=cupy.float32)
        # chunks no kernel writes (past a row's K) stand for zeros: scale 1 (fp16), d = 0 (int8)
        self.xc = (cupy.ones if act == "f16" else cupy.zeros)((R, KX // 32), dtype=cupy.float32)
        self.cnt = cupy.zeros((R, KX // 32), dtype=cupy.int32)   # chunk completion (moe_gateup)

    def rows(self, r0: int, r1: int) -> "XPrep":
        v = XPrep.__new__(XPrep)
        v.R, v.K, v.KX, v.act = r1 - r0, self.K, self.KX, self.act
        v.xh, v.xs, v.xc, v.cnt = self.xh[r0:r1], self.xs[r0:r1], self.xc[r0:r1], self.cnt[r0:r1]
        return v

    def i8_bytes(self):
        """act "int8": the codes as uint8 [R, KX] in the kernels' byte order (act_int8.kernel_bytes)."""
        return self.xh.view(cupy.uint8)[:, : self.KX]


def _suffix(quantized: bool, prep: XPrep | None) -> str:
    """Kernel name suffix of a quantized weight's kernel reading `prep` ("" for float weights)."""
    return ACT_SUFFIX[prep.act] if quantized and prep is not None else ""


def _act(prep: XPrep | None) -> np.int32:
    return i32(0 if prep is None else ACT[prep.act])


def prep_len(K: int, *weights) -> int:
    return max([K + (-K) % 32] + [w.Kp for w in weights if w is not None and w.quantized])


def rows_prep(h, K: int, *, ybuf=None, A: int = 0, add2=None, add2_gate=None, nw=None, eps: float = 0.0,
              x32=None, prep: XPrep | None = None, hout=None) -> None:
    """h [R, >=K] f32 rows: residual update into hout (a different buffer of h's shape), optional
    RMSNorm into x32 [R, K], optional xprep of the result."""
    if h.ndim != 2 or h.strides[1] != 4 or h.dtype != cupy.float32:
        raise ConfigError("rows_prep: h must be float32 [R, ld] with contiguous rows")
    R, ldh = h.shape[0], h.strides[0] // 4
    if (ybuf is not None or add2 is not None) and (hout is None or hout.shape != h.shape or hout.strides != h.strides
                                                    or addr(hout) == addr(h)):
        raise ConfigError("rows_prep: a residual update needs hout, another buffer shaped like h")
    if nw is not None and (x32 is None or x32.shape != (R, K)):
        raise ConfigError("rows_prep: RMSNorm needs x32 [R, K]")
    if prep is not None and (prep.R != R or prep.K != K):
        raise ConfigError(f"rows_prep: prep is for {prep.R} x {prep.K}, got {R} x {K}")
    chunks = max(cdiv(K, 32), 0 if prep is None else prep.KX // 32)
    launch("gemv", "rows_prep", (R, cdiv(chunks, 8)), (256,),
           (h, ptr(hout), i32(ldh), i32(K), ptr(ybuf), i32(A), ptr(add2), ptr(add2_gate), ptr(nw), f32(eps), ptr(x32),
            ptr(None if prep is None else prep.xh), ptr(None if prep is None else prep.xs),
            ptr(None if prep is None else prep.xc), i32(0 if prep is None else prep.KX), _act(prep)))


# ---- GEMV ------------------------------------------------------------------------------------

def gemv_desc(items) -> object:
    """items: (W: GpuWeight, y [T, ldy] f32, bias [N] or None, accumulate) -> device u64 [n, 8]."""
    d = np.zeros((len(items), 8), dtype=np.uint64)
    for i, (W, y, bias, acc) in enumerate(items):
        if y.dtype != cupy.float32 or y.strides[-1] != 4:
            raise ConfigError("gemv: outputs must be float32 with contiguous rows")
        ldy = y.strides[0] // 4 if y.ndim == 2 else W.N
        d[i] = (W.ptr("q"), W.ptr("s"), W.ptr("m"), addr(y), addr(bias), W.N, ldy, 1 if acc else 0)
    return cupy.asarray(d)


def gemv_launch(desc, weights: list, T: int, x32, prep: XPrep | None) -> None:
    """One launch of matrices (same type, K, group) for T in GEMV_T tokens."""
    W = weights[0]
    for w in weights[1:]:
        if (w.qtype, w.K, w.Kp, w.group) != (W.qtype, W.K, W.Kp, W.group):
            raise ConfigError("gemv: matrices of one launch must share type, K and group")
    if T not in GEMV_RW:
        raise ConfigError(f"gemv: no kernel for {T} tokens")
    if W.quantized:
        if prep is None or prep.KX < W.Kp:
            raise ConfigError("gemv: quantized weights need an xprep at least Kp long")
        xh, xs, xc, KX, ldx = prep.xh, prep.xs, prep.xc, prep.KX, 0
    else:
        if x32 is None or x32.shape[-1] != W.K or not x32.flags.c_contiguous:
            raise ConfigError(f"gemv: float weights need contiguous float32 x [T, {W.K}]")
        xh = xs = xc = None
        KX, ldx = 0, W.K
    rw = GEMV_RW[T]
    ntasks = sum(cdiv(w.N, rw) for w in weights)
    name = f"gemv_{W.qtype}_t{T}{_suffix(W.quantized, prep)}"
    grid = min(cdiv(ntasks, 8), resident_blocks("gemv", name, 256))
    launch("gemv", name, (grid,), (256,),
           (desc, i32(len(weights)), i32(ntasks), i32(W.K), i32(W.Kp), i32(W.gshift), ptr(x32), i32(ldx), ptr(xh),
            ptr(xs), ptr(xc), i32(KX)))


def token_chunks(T: int):
    """Split T tokens into runs the compiled variants cover: [(t0, n), ...]."""
    out, t0 = [], 0
    while t0 < T:
        n = next(c for c in GEMV_T if c <= T - t0)
        out.append((t0, n))
        t0 += n
    return out


def linear_small(x, W: GpuWeight, act: str = "f16"):
    """y [T, N] = x [T, K] @ W.T for T <= a few tokens, through the GEMV kernels (quantized W:
    activations prepared in format `act`)."""
    T = x.shape[0]
    x = _f32c(cupy.ascontiguousarray(x), "linear x")
    y = cupy.empty((T, W.N), dtype=cupy.float32)
    prep = None
    if W.quantized:
        prep = XPrep(T, W.K, W.Kp, act)
        rows_prep(x, W.K, prep=prep)
    for t0, n in token_chunks(T):
        desc = gemv_desc([(W, y[t0:t0 + n], None, False)])
        gemv_launch(desc, [W], n, x[t0:t0 + n], None if prep is None else prep.rows(t0, t0 + n))
    return y


# ---- prefill: dequantize + cuBLAS -------------------------------------------------------------

_unscale = None


def to_f16_rows(x):
    """x [T, K] f32 -> (fp16 rows scaled by powers of two so |max| lies in [8, 16), 1/scale [T])."""
    x = _f32c(cupy.ascontiguousarray(x), "prefill x")
    T, K = x.shape
    out = cupy.empty((T, K), dtype=cupy.float16)
    inv = cupy.empty(T, dtype=cupy.float32)
    launch("gemv", "rows_to_f16", (T,), (256,), (x, i32(K), out, inv))
    return out, inv


def matmul_f16(x, w16, x16=None):
    """y [T, N] f32 = x [T, K] f32 @ w16 [N, K].T with fp16 operands and fp32 accumulation.
    x16 = to_f16_rows(x) when the caller already has it."""
    global _unscale
    if _unscale is None:
        _unscale = cupy.ElementwiseKernel("float16 y, float32 s", "float32 z", "z = (float)y * s", "efengine_unscale")
    x16, inv = to_f16_rows(x) if x16 is None else x16
    return _unscale(cupy.matmul(x16, w16.T), inv[:, None])


# ---- routing ---------------------------------------------------------------------------------

def route_params(cfg: ModelConfig) -> tuple:
    E, A = cfg.n_experts, cfg.top_k
    method = 1 if cfg.topk_method == "group_limited_greedy" else 0
    if E > 512 or A > 32 or A > E:
        raise ConfigError(f"GPU routing takes up to 512 experts and 32 active ones, got E={E}, A={A}")
    if method and (cfg.n_group > 32 or E % cfg.n_group):
        raise ConfigError(f"GPU group-limited routing needs n_group <= 32 dividing E, got {cfg.n_group}")
    return (i32(E), i32(A), i32(method), i32(cfg.n_group), i32(cfg.topk_group), i32(bool(cfg.norm_topk_prob)),
            i32(cfg.moe_weighting == "ones"), f32(cfg.routed_scaling_factor))


def route(logits, cfg: ModelConfig, ids=None, wts=None):
    """logits [T, E] f32 -> ids [T, A] int32, weights [T, A] f32 (NumpyBackend.route's rules)."""
    logits = _f32c(cupy.ascontiguousarray(logits), "route logits")
    T, E = logits.shape
    if E != cfg.n_experts:
        raise ConfigError(f"route: {E} logits but the config has {cfg.n_experts} experts")
    p = route_params(cfg)
    ids = cupy.empty((T, cfg.top_k), dtype=cupy.int32) if ids is None else ids
    wts = cupy.empty((T, cfg.top_k), dtype=cupy.float32) if wts is None else wts
    launch("gemv", "route_kernel", (T,), (32,), (logits, i32(T), *p, ids, wts))
    return ids, wts


def router(W: GpuWeight, T: int, x32, prep: XPrep | None, cfg: ModelConfig, ids, wts, *,
           logits=None, extra: GpuWeight | None = None, extra_out=None) -> None:
    """Router GEMV + routing in one launch (a cluster of RT_NB blocks a token: the router's rows are
    read by RT_NB SMs at once); extra = a one-row gate beside it."""
    if W.N != cfg.n_experts:
        raise ConfigError(f"router has {W.N} rows, config {cfg.n_experts} experts")
    if extra is not None and (extra.qtype, extra.K, extra.group) != (W.qtype, W.K, W.group):
        raise ConfigError("router: the shared-expert gate must share the router's type and group")
    q = None if prep is None else prep
    launch("gemv", f"router_{W.qtype}{_suffix(W.quantized, prep)}", (T, RT_NB), (RT_THREADS,),
           (u64(W.ptr("q")), u64(W.ptr("s")), u64(W.ptr("m")),
            u64(0 if extra is None else extra.ptr("q")), u64(0 if extra is None else extra.ptr("s")),
            u64(0 if extra is None else extra.ptr("m")), i32(W.K), i32(W.Kp), i32(W.gshift),
            ptr(x32), i32(W.K), ptr(q and q.xh), ptr(q and q.xs), ptr(q and q.xc), i32(0 if q is None else q.KX),
            ptr(logits), ptr(extra_out), *route_params(cfg), ids, wts))


# ---- mixture of experts ----------------------------------------------------------------------

@dataclass(frozen=True)
class Mat:
    """A matrix for the MoE kernels: type, shape, and q / s / m as offsets from a base address."""
    qtype: str
    N: int
    K: int
    Kp: int
    gshift: int
    q: int
    s: int
    m: int

    @classmethod
    def of_part(cls, p: PartPlace) -> "Mat":
        return cls(p.qtype, p.shape[0], p.shape[1], p.Kp, p.gshift, p.q, p.s, p.m)

    @classmethod
    def of_weight(cls, w: GpuWeight) -> "Mat":
        return cls(w.qtype, w.N, w.K, w.Kp, w.gshift, w.ptr("q"), w.ptr("s"), w.ptr("m"))


@dataclass(frozen=True)
class Experts:
    """Where the experts of a launch live: slot table row of one layer + pool, or one dense base."""
    base: int                  # pool address (routed) or the blob / 0 (dense)
    stride: int = 0
    ids: object = None         # [P] int32 expert ids (None: dense, pair p = token p)
    table: int = 0             # address of the layer's slot-table row [E] int32
    E: int = 0
    err: object = None


def _moe_launch(name: str, P: int, N: int, args) -> None:
    """An MoE kernel as a persistent grid of blocks of the size it was compiled for (moe.cu: TG),
    no more than one warp a row (a kernel's tasks take 1 to 4 rows: moe.cu's H / RWD; warps
    without a task leave at once)."""
    threads = kernel("moe", name).max_threads_per_block
    grid = min(cdiv(P * N, threads // 32), resident_blocks("moe", name, threads))
    launch("moe", name, (grid,), (threads,), args)


def moe_gateup(src: Experts, gate: Mat, up: Mat, P: int, A: int, x32, prep: XPrep | None,
               hout, hprep: XPrep | None) -> None:
    """hout [P, I] = silu(gate x) * up x for every (token, rank) pair; hprep its xprep (or None; its
    format is hprep.act, that of the down projection's prep)."""
    if (gate.qtype, gate.N, gate.K, gate.Kp) != (up.qtype, up.N, up.K, up.Kp):
        raise ConfigError("moe_gateup: gate and up must match")
    if gate.qtype in ("q4", "q8") and (prep is None or prep.KX < gate.Kp):
        raise ConfigError("moe_gateup: quantized experts need an xprep at least Kp long")
    if hout.shape[0] < P or hout.shape[1] != gate.N or hout.strides[1] != 4:
        raise ConfigError(f"moe_gateup: hout must be [>= {P}, {gate.N}] float32")
    if hprep is not None and (hprep.KX < cdiv(gate.N, 32) * 32 or hprep.R < P):
        raise ConfigError("moe_gateup: hprep too short")
    name = f"moe_gateup_{gate.qtype}{_suffix(gate.qtype in ('q4', 'q8'), prep)}"
    _moe_launch(name, P, gate.N,
           (i32(P), ptr(src.ids), u64(src.table), i32(src.E), ptr(src.err), u64(src.base), i64(src.stride),
            u64(gate.q), u64(gate.s), u64(gate.m), u64(up.q), u64(up.s), u64(up.m),
            i32(gate.N), i32(gate.K), i32(gate.Kp), i32(gate.gshift), i32(A),
            ptr(x32), i32(gate.K), ptr(prep and prep.xh), ptr(prep and prep.xs), ptr(prep and prep.xc),
            i32(0 if prep is None else prep.KX), hout, i32(hout.strides[0] // 4),
            ptr(hprep and hprep.xh), ptr(hprep and hprep.xs), ptr(hprep and hprep.xc),
            i32(0 if hprep is None else hprep.KX), ptr(hprep and hprep.cnt), _act(hprep)))


def moe_down(src: Experts, down: Mat, P: int, h32, hprep: XPrep | None, rw, y) -> None:
    """y [P, D] = rw[p] * (down h[p]) (rw None: weight 1), one row a (token, rank) pair."""
    if down.qtype in ("q4", "q8") and (hprep is None or hprep.KX < down.Kp):
        raise ConfigError("moe_down: quantized experts need h's xprep at least Kp long")
    if down.qtype not in ("q4", "q8") and (h32.shape[1] != down.K or h32.strides[1] != 4):
        raise ConfigError("moe_down: float experts need h [P, I] float32")
    if y.shape[0] < P or y.shape[1] != down.N:
        raise ConfigError(f"moe_down: y must be [>= {P}, {down.N}]")
    name = f"moe_down_{down.qtype}{_suffix(down.qtype in ('q4', 'q8'), hprep)}"
    _moe_launch(name, P, down.N,
           (i32(P), ptr(src.ids), u64(src.table), i32(src.E), ptr(src.err), u64(src.base), i64(src.stride),
            u64(down.q), u64(down.s), u64(down.m), i32(down.N), i32(down.K), i32(down.Kp), i32(down.gshift),
            h32, i32(h32.strides[0] // 4), ptr(hprep and hprep.xh), ptr(hprep and hprep.xs),
            ptr(hprep and hprep.xc), i32(0 if hprep is None else hprep.KX), ptr(rw), y, i32(y.strides[0] // 4)))


# ---- attention and rotary --------------------------------------------------------------------

def attn_qw(T: int, R: int) -> int:
    """Query rows a warp: 1 for decode-sized steps (all warps busy), 4 for prefill (shared tiles)."""
    return 1 if T * R <= 4 * ATT_WARPS else 4


class AttnWork:
    """Workspace of split-K attention for up to T tokens, H heads, nsplit splits."""

    def __init__(self, T: int, H: int, G: int, dv: int, nsplit: int):
        tiles = cdiv(T * (H // G), ATT_WARPS)            # enough for one row a warp
        self.nsplit = nsplit
        self.m = cupy.empty(nsplit * T * H, dtype=cupy.float32)
        self.l = cupy.empty(nsplit * T * H, dtype=cupy.float32)
        self.acc = cupy.empty(nsplit * T * H * dv, dtype=cupy.float32)
        self.counters = cupy.zeros(max(tiles, ATD_NR) * G, dtype=cupy.int32)   # split-K / decode kernel


def attn_splits(T: int, H: int, G: int, S: int) -> int:
    """Key splits so that a small step still fills the GPU (one split when the rows do)."""
    R = H // G
    blocks = cdiv(T * R, attn_qw(T, R) * ATT_WARPS) * G
    if blocks >= 132 or S <= 64:
        return 1
    return max(1, min(cdiv(S, 64), 264 // blocks))


_CLUSTERS: list = []


def clusters_supported() -> bool:
    """Thread block clusters (sm_90+): the cluster kernels' fast paths (else their fallbacks)."""
    if not _CLUSTERS:
        _CLUSTERS.append(int(cupy.cuda.Device().compute_capability) >= 90)
    return _CLUSTERS[0]


def _attention_decode(q, k, v, pos0, scale: float, out, S: int, work: AttnWork | None, prep: XPrep | None,
                      new_kv=None) -> bool:
    """attention() through the cluster decode kernel where it applies (few query rows a kv group,
    dq = dv in ATT_HEAD_DIMS, 16-byte aligned rows); False where it does not. NC = ceil(S / ATD_CK)
    clusters a group (at most work.nsplit), of which the kernel uses those the visible keys need."""
    T, H, d = q.shape
    G = k.shape[1]
    rows = T * (H // G)
    if (not clusters_supported() or d != v.shape[2] or d not in ATT_HEAD_DIMS or rows > ATD_NR
            or (addr(q) | q.strides[0] | q.strides[1] | addr(k) | addr(v)) % 16):
        return False
    nc = max(1, cdiv(S, ATD_CK))
    if work is not None:
        nc = min(nc, work.nsplit)
    elif nc > 1:
        work = AttnWork(T, H, G, d, nc)
    smem = 4 * (ATD_TK * (d + 4) + ATD_TK * d + ATD_NR * (d + 4) + ATD_NR * ATD_TK + ATD_NR + ATD_NS * (d + 2))
    launch("attn", f"attention_dec_d{d}_r{4 if rows <= 4 else 8}", (1, G, ATD_NS * nc), (ATD_THREADS,),
           (q, i64(q.strides[0] // 4), i64(q.strides[1] // 4), k, v, out, i32(T), i32(H), i32(G), i32(S), i32(nc),
            pos0, f32(scale), ptr(work and work.m), ptr(work and work.l), ptr(work and work.acc),
            ptr(work and work.counters), ptr(prep and prep.xh), ptr(prep and prep.xs), ptr(prep and prep.xc),
            i32(0 if prep is None else prep.KX), _act(prep), *(new_kv or (ptr(None),) * 4)), shared=smem)
    return True


def attention(q, k, v, pos0, scale: float, out=None, work: AttnWork | None = None, S: int | None = None,
              prep: XPrep | None = None, new_kv=None):
    """Causal attention: q [T, H, dq] (any strides, last axis contiguous), k [S, G, dq], v [S, G, dv].

    pos0: int, or a device int32 [1] (graph replays). S (keys the launch may cover) defaults to
    k.shape[0]. Returns out [T, H, dv] float32; with prep (dv % 32 == 0) also the xprep (format
    prep.act) of out's rows [T, H*dv] for a quantized o projection.
    new_kv = (k_new, v_new [T, G*d] float32, cos, sin [P, d/2]): q, k_new and v_new come as
    projected (d = dq = dv); q and k_new are rotated (NeoX halves) at positions pos0 + t, and k_new,
    v_new stored at rows pos0 + t of the caches k, v: inside the decode kernel where it applies,
    else by qkv_rope_store first (q contiguous, rotated in place).
    """
    T, H, dq = q.shape
    Sk, G, dk = k.shape
    dv = v.shape[2]
    if dk != dq or v.shape[:2] != (Sk, G) or H % G:
        raise ConfigError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    if dv > 256:
        raise ConfigError(f"attention: value head dim {dv} > 256")
    if q.strides[2] != 4 or q.dtype != cupy.float32:
        raise ConfigError("attention: q must be float32 with a contiguous last axis")
    if prep is not None and (dv % 32 or prep.R != T or prep.K != H * dv):
        raise ConfigError("attention: the fused xprep needs dv % 32 == 0 and a prep of [T, H*dv]")
    _f32c(k, "attention k")
    _f32c(v, "attention v")
    S = Sk if S is None else S
    if not isinstance(pos0, cupy.ndarray):
        pos0 = cupy.full((1,), int(pos0), dtype=cupy.int32)
    if out is None:
        out = cupy.empty((T, H, dv), dtype=cupy.float32)
    if new_kv is not None:
        kn, vn, cos, sin = new_kv
        if dq != dv or kn.size != T * G * dq or vn.size != T * G * dq or cos.shape[-1] * 2 != dq:
            raise ConfigError(f"attention: new keys / values {kn.shape} / {vn.shape} or rope tables {cos.shape} "
                              f"do not fit q {q.shape}, k {k.shape}")
        for a, what in ((kn, "new k"), (vn, "new v"), (cos, "cos"), (sin, "sin")):
            _f32c(a, f"attention {what}")
    if _attention_decode(q, k, v, pos0, scale, out, min(S, Sk), work, prep, new_kv):
        return out
    if new_kv is not None:
        if not q.flags.c_contiguous:
            raise ConfigError("attention: new_kv needs a contiguous q where the decode kernel does not apply")
        qkv_rope_store(q, kn, vn, H, G, dq, cos, sin, pos0, k, v)
    nsplit = work.nsplit if work is not None else attn_splits(T, H, G, S)
    if work is None and nsplit > 1:
        work = AttnWork(T, H, G, dv, nsplit)
    qw = attn_qw(T, H // G)
    tiles = cdiv(T * (H // G), qw * ATT_WARPS)
    shared = 4 * (32 * (dq + 1) + 32 * dv + qw * ATT_WARPS * dq)
    fixed = f"_d{dq}" if dq == dv and dq in ATT_HEAD_DIMS else ""      # compiled for this head dim
    launch("attn", f"attention_q{qw}{fixed}", (tiles, G, nsplit), (32 * ATT_WARPS,),
           (q, i64(q.strides[0] // 4), i64(q.strides[1] // 4), k, v, out, i32(T), i32(H), i32(G), i32(dq), i32(dv),
            pos0, f32(scale), ptr(work and work.m), ptr(work and work.l), ptr(work and work.acc),
            ptr(work and work.counters), ptr(prep and prep.xh), ptr(prep and prep.xs), ptr(prep and prep.xc),
            i32(0 if prep is None else prep.KX), _act(prep)), shared=shared)
    return out


def rope(x, cos, sin, interleaved: bool, pos=None, out=None):
    """x [T, h, r] (last axis contiguous) rotated by tables cos / sin [P, r/2] (row pos[t] or t)."""
    T, nh, r = x.shape
    if x.strides[2] != 4 or x.dtype != cupy.float32 or r % 2:
        raise ConfigError("rope: x must be float32 [T, h, r] with r even and a contiguous last axis")
    cos = _f32c(cupy.ascontiguousarray(cos, dtype=cupy.float32), "rope cos")
    sin = _f32c(cupy.ascontiguousarray(sin, dtype=cupy.float32), "rope sin")
    if cos.shape[-1] != r // 2 or sin.shape != cos.shape:
        raise ConfigError(f"rope: tables {cos.shape} do not fit r={r}")
    out = cupy.empty((T, nh, r), dtype=cupy.float32) if out is None else out
    launch("attn", "rope_kernel", (T * nh,), (max(32, min(256, cdiv(r // 2, 32) * 32)),),
           (x, i64(x.strides[0] // 4), i64(x.strides[1] // 4), out, i32(T), i32(nh), i32(r), cos, sin, ptr(pos),
            i32(bool(interleaved))))
    return out


def qkv_rope_store(q, k, v, H: int, G: int, d: int, cos, sin, pos0, kc, vc) -> None:
    """Rotate q in place, rotate k, store k and v at rows pos0 + t of kc / vc [P, G, d]."""
    T = q.shape[0]
    launch("attn", "qkv_rope_store", (T * (H + 2 * G),), (max(32, min(256, cdiv(d // 2, 32) * 32)),),
           (q, k, v, i32(T), i32(H), i32(G), i32(d), cos, sin, pos0, kc, vc))


def embed(ids, W: GpuWeight, out=None):
    """out [T, D] f32 = rows ids [T] (int32 on the device) of W, dequantized."""
    T = ids.shape[0]
    out = cupy.empty((T, W.K), dtype=cupy.float32) if out is None else out
    launch("misc", "embed_kernel", (T, cdiv(W.K, 256)), (256,),
           (ids, i32(W.wt), W.buf, u64(W.ptr("s")), u64(W.ptr("m")), i32(W.K), i32(W.Kp),
            i32(W.group if W.quantized else 1), out))
    return out


def argmax_advance(logits, V: int, tok, pos, hist=None) -> None:
    """tok = argmax(logits [V]); hist[pos] = tok; pos += 1 (all device int32)."""
    launch("misc", "argmax_advance", (1,), (1024,), (logits, i32(V), tok, pos, ptr(hist)))


def expert_gate(ids, rw, forced, mtab: int, dtab: int, log: int, pos, stall: int, err, A: int,
                timeout_s: float = 10.0, progress=None, layer: int = 0, pred=None, n_pred: int = 0) -> None:
    """Run-ahead residency check of one MoE layer (kernels/offload.cu): ids [A] (and rw [A]) from
    the router, or `forced` (ids [A] int32, weights [A] f32 on the device) replacing them; mtab /
    log / stall are host-mapped addresses (page-locked memory) of the layer's map row [E] int32,
    its log row [A + 1 + n_pred] int32 and the stall counter (u64 ns); dtab the device table row
    [E]; progress a device int32 [1] (the claim slot_guard reads); pred n_pred float32 logged."""
    if A > 32:
        raise ConfigError(f"expert_gate: at most 32 active experts, got {A}")
    fi, fw = forced if forced is not None else (None, None)
    if progress is None:
        progress = cupy.zeros(1, dtype=cupy.int32)
    launch("offload", "expert_gate", (1,), (32,),
           (ids, rw, ptr(fi), ptr(fw), u64(mtab), u64(dtab), u64(log), pos, u64(stall), err, i32(A),
            i64(int(timeout_s * 1e9)), progress, i32(layer), ptr(pred), i32(n_pred)))


def step_done(progress) -> None:
    launch("offload", "step_done", (1,), (1,), (progress,))


def slot_guard(progress, layer: int, err, stream, timeout_s: float = 10.0) -> None:
    """On `stream` (the copy stream): wait while model layer `layer` holds a claim on its slots."""
    with stream:
        launch("offload", "slot_guard", (1,), (1,), (progress, i32(layer), err, i64(int(timeout_s * 1e9))))


_scratch = []


def load_offload_kernels() -> None:
    """Load every kernel of offload.cu now (one launch each, on scratch words). CUDA loads kernels
    lazily, and loading may wait for running kernels: a publish or guard loaded for the first time
    while a gate spins waiting for it would never run."""
    import cupyx
    if not _scratch:
        w = cupyx.empty_pinned((4,), dtype=np.int32)
        w[...] = [0, 0, 0, 7]
        ids, rw = cupy.zeros(1, dtype=cupy.int32), cupy.zeros(1, dtype=cupy.float32)
        dtab, pos, err = cupy.zeros(1, dtype=cupy.int32), cupy.zeros(1, dtype=cupy.int32), cupy.zeros(1, dtype=cupy.int32)
        progress = cupy.full(1, -1, dtype=cupy.int32)
        stall = cupyx.empty_pinned((1,), dtype=np.uint64)
        s = cupy.cuda.Stream(non_blocking=True)
        with s:                               # the kernel, loaded even where the driver write works
            launch("offload", "publish", (1,), (1,), (u64(w.ctypes.data), i32(0)))
        publish(w.ctypes.data + 8, 0, s)      # tries the driver's write once
        slot_guard(progress, 0, err, s)
        with s:
            expert_gate(ids, rw, None, w.ctypes.data, addr(dtab), w.ctypes.data + 4, pos, stall.ctypes.data, err, 1,
                        progress=progress)
            step_done(progress)
        s.synchronize()
        _scratch.append(w)


def publish(dst: int, value: int, stream) -> None:
    """*dst (int32, host-mapped) = value once the work queued before it on `stream` is done.

    The driver's stream write (cuStreamWriteValue32: a fenced write by the stream's front end, a
    few us of host time, no SM) where it works; else the `publish` kernel (a launch, ~20 us)."""
    fn = _write_value()
    if fn is not None and fn(stream.ptr, dst, value & 0xFFFFFFFF, 0) == 0:
        return
    _WRITE_VALUE[0] = False               # refused (no stream memory operations): kernels from now on
    with stream:
        launch("offload", "publish", (1,), (1,), (u64(dst), i32(value)))


_WRITE_VALUE: list = [True]               # False once the driver refused a stream write


def _write_value():
    """cuStreamWriteValue32 from the driver library (ctypes), or None."""
    if not _WRITE_VALUE[0]:
        return None
    import ctypes
    return driver_function(("cuStreamWriteValue32_v2", "cuStreamWriteValue32"),
                           [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint])
