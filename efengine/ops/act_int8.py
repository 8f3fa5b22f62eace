"""int8 activations for products with quantized matrices (act="int8"): the numpy twin of the GPU's
dp4a path (kernels/common.cuh prep_chunk_i8, dot.cuh q4_dot_i8 / q8_dot_i8).

Legend: R rows, K values a row, KX prepared length (a multiple of 32), C = KX/32 chunks, N outputs.

A row is cut into chunks of 32 values along K (zero padded to KX). Chunk c, all float32 and
correctly rounded:
    amax = max |x|,   d = amax * float32(1/127),   q = rint(x * (1 / d))   (int8, -127..127)
rint = round half to even, so x ~ d*q with |x - d*q| <= d/2 (plus a few float32 roundings). A
chunk whose amax is below 2^-100 (zero included) has d = 0 and codes 0; one holding inf or NaN
has d = NaN and codes 0 (its products come out NaN, as a float product would).

A quantized weight row (q4: w = s*c + m, q8: w = s*c, s and m fp16 per group along K; a group
holds whole chunks) then gives, per chunk,
    sum_k w_k (d q_k) = d * (s * sum_k c_k q_k + m * sum_k q_k)
two exact integer sums (dp4a) and float32 scaling. The min term uses the codes' own sum
(d * sum q, stored per chunk), not the float sum of x: the product is then exactly the dot
product of the dequantized weights with the dequantized activations, one function that the
numpy backend computes as fake_quant(x) @ W.T from float weights alone. It is also the more
accurate choice for the usual groups (m ~ -8s, centred weights): its error is sum_k w_k e_k
(e = d q - x), while the float sum would leave sum_k (w_k - m) e_k, and |w - m| is larger
than |w| on average (test_int8act.py measures both).

Only products of up to MAX_ROWS rows (the GPU's GEMV / MoE-kernel steps) use int8 activations;
longer steps (prefill) run fp16 GEMMs on the GPU and exact float32 on numpy. Float matrices,
and quantized ones whose group the GPU kernels cannot take (widened to f16 at load), keep
float activations.
"""
from __future__ import annotations

import numpy as np

from .. import quant
from ..errors import ConfigError

ACTS = ("f16", "int8")
MAX_ROWS = 8            # = cupy_backend.SMALL_T: rows up to which products run the GEMV kernels
CHUNK = 32
# byte of value i of an 8-block in the kernels' order: [x0 x2 x4 x6 | x1 x3 x5 x7], so that the
# 32-bit word 2b pairs with a q4 word's low nibbles (even k) and word 2b+1 with its high ones
POS8 = np.array([0, 4, 1, 5, 2, 6, 3, 7])
STEP = np.float32(1 / 127)
TINY = np.float32(2.0 ** -100)


def check_act(act: str) -> str:
    if act not in ACTS:
        raise ConfigError(f"unknown activation format {act!r}; choose one of {', '.join(ACTS)}")
    return act


def kernel_group(qtype: str, group: int) -> bool:
    """Whether the GPU keeps a matrix of this type and group quantized (and so takes int8 x)."""
    from .gpu_weights import FAST_GROUPS
    return qtype in quant.QUANT_TYPES and int(group) in FAST_GROUPS


def quantize(x: np.ndarray, KX: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [R, K] -> (codes int8 [R, KX] in k order, d float32 [R, C], code sums float32 [R, C])."""
    x = np.asarray(x, np.float32)
    R, K = x.shape
    if KX % CHUNK or KX < K:
        raise ConfigError(f"prepared length {KX} must be a multiple of {CHUNK} and >= K={K}")
    ch = np.zeros((R, KX), np.float32)
    ch[:, :K] = x
    ch = ch.reshape(R, KX // CHUNK, CHUNK)
    fin = np.isfinite(ch)
    bad = ~fin.all(axis=2)
    amax = np.abs(np.where(fin, ch, np.float32(0))).max(axis=2)
    ok = ~bad & (amax >= TINY)
    d = np.where(ok, amax * STEP, np.float32(0)).astype(np.float32)
    inv = np.float32(1) / np.where(ok, d, np.float32(1))
    q = np.rint(np.where(ok[..., None], ch, np.float32(0)) * inv[..., None]).astype(np.int8)
    d[bad] = np.nan
    qsum = q.astype(np.int32).sum(axis=2).astype(np.float32)
    return q.reshape(R, KX), d, qsum


def dequantize(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Codes [R, KX] and scales [R, C] -> the float32 values they stand for (d * q, float32)."""
    R, KX = q.shape
    return (q.reshape(R, KX // CHUNK, CHUNK).astype(np.float32) * d[..., None]).reshape(R, KX)


def fake_quant(x: np.ndarray) -> np.ndarray:
    """x [..., K] -> the float32 values int8 activations give it (chunks along the last axis)."""
    K = x.shape[-1]
    x2 = np.asarray(x, np.float32).reshape(-1, K)
    KX = -(-K // CHUNK) * CHUNK
    q, d, _ = quantize(x2, KX)
    return dequantize(q, d)[:, :K].reshape(x.shape)


def chunk_bytes(q: np.ndarray) -> np.ndarray:
    """Codes [R, KX] in k order -> uint8 [R, C, 32]: each chunk's bytes as a kernel lane holds them
    (its two 16-byte loads), value i of every 8 at byte POS8[i]."""
    R, KX = q.shape
    out = np.empty((R, KX // 8, 8), np.uint8)
    out[:, :, POS8] = q.view(np.uint8).reshape(R, KX // 8, 8)
    return out.reshape(R, KX // CHUNK, CHUNK)


def kernel_bytes(q: np.ndarray) -> np.ndarray:
    """Codes [R, KX] in k order -> uint8 [R, KX] as the kernels store a row: 2 planes of 16 bytes a
    chunk (plane j of chunk c at byte 16 (j C + c)), chunk_bytes order inside."""
    R, KX = q.shape
    cb = chunk_bytes(q).reshape(R, KX // CHUNK, 2, 16).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(cb).reshape(R, KX)


def codes_of(kb: np.ndarray) -> np.ndarray:
    """kernel_bytes inverted: uint8 [R, KX] in the kernels' layout -> codes int8 [R, KX] in k order."""
    R, KX = kb.shape
    cb = kb.reshape(R, 2, KX // CHUNK, 16).transpose(0, 2, 1, 3).reshape(R, KX // 8, 8)
    return np.ascontiguousarray(cb[:, :, POS8]).reshape(R, KX).view(np.int8)


def chunk_dot(buf: np.ndarray, qtype: str, shape, group: int, q: np.ndarray, d: np.ndarray,
              qsum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The dp4a kernels' arithmetic on stored weights (quant.py bytes, [N, K]) and prepared rows
    (q [R, KX], d / qsum [R, C], KX >= Kp): (y [R, N] float64, mag [R, N] float64), where y sums
    d * (s * I1 + m * S) over chunks from the exact integer sums I1 = sum c q, S = sum q, and mag
    = sum over chunks of |d| (|s I1| + |m S|), the size of the float terms a kernel rounds."""
    N, K = shape
    v = quant.views(buf, qtype, shape, group)
    Kp = v["s"].shape[1] * group
    C = Kp // CHUNK
    if qtype == "q4":
        codes = quant.unpack_q4(v["q"]).astype(np.int64)
        m = np.repeat(v["m"].astype(np.float64), group // CHUNK, axis=1)       # [N, C]
    elif qtype == "q8":
        codes = v["q"].astype(np.int64)
        m = np.zeros((N, C))
    else:
        raise ConfigError(f"chunk_dot takes q4 / q8 weights, got {qtype}")
    s = np.repeat(v["s"].astype(np.float64), group // CHUNK, axis=1)           # [N, C]
    xq = q[:, :Kp].astype(np.int64).reshape(-1, C, CHUNK)                       # [R, C, 32]
    I1 = np.einsum("ncj,rcj->rnc", codes.reshape(N, C, CHUNK), xq)              # exact integers
    S = qsum[:, None, :C].astype(np.float64)                                    # [R, 1, C]
    dd = d[:, None, :C].astype(np.float64)
    terms = dd * (s[None] * I1 + m[None] * S)
    mag = np.abs(dd) * (np.abs(s[None] * I1) + np.abs(m[None] * S))
    return terms.sum(axis=2), mag.sum(axis=2)
