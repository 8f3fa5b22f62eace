"""Numpy twins of the fused CUDA kernels that NumpyBackend has no op for.

Legend: R rows, K values a row, KX prepared length, C = KX/32 chunks, P (token, rank) pairs,
E experts, A active, I expert width, D hidden, L layers.

Each function computes what its kernel computes, in float64 where the kernel's rounding is not
the point, so tests on the GPU compare kernels against these (and CPU tests check the twins
against quant.py and NumpyBackend).
"""
from __future__ import annotations

import numpy as np

from .. import quant

PREP_TARGET_EXP = 4
# position of value j of an 8-block inside its 16-byte word: x0 x4 x1 x5 x2 x6 x3 x7
PERM = np.array([0, 2, 4, 6, 1, 3, 5, 7])


def prep_ref(x: np.ndarray, KX: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xprep of x [R, K]: (xh fp16 [R, KX] in prepared order, xs [R, C] chunk sums, xc [R, C])."""
    R, K = x.shape
    xp = np.zeros((R, KX), np.float32)
    xp[:, :K] = x
    ch = xp.reshape(R, KX // 32, 32)
    amax = np.abs(ch).max(axis=2)
    _, e = np.frexp(amax)
    ok = (amax > 0) & np.isfinite(amax)
    scale = np.where(ok, np.ldexp(np.float32(1), PREP_TARGET_EXP - e), 1).astype(np.float32)
    h = (ch * scale[..., None]).astype(np.float16)
    xs = h.astype(np.float32).sum(axis=2, dtype=np.float64).astype(np.float32)
    xc = np.where(ok, np.ldexp(np.float32(1), e - PREP_TARGET_EXP), 1).astype(np.float32)
    perm = np.empty_like(h)                                   # [R, C, 32], order within 8s
    perm.reshape(R, KX // 8, 8)[:, :, PERM] = h.reshape(R, KX // 8, 8)
    # planes: 8-value group j of chunk c goes to plane j at position c
    out = perm.reshape(R, KX // 32, 4, 8).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(out).reshape(R, KX), xs, xc


def unprep_ref(xh: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """Values a prep stands for: [R, KX] float64 (undo the layout and the chunk scales)."""
    R, KX = xh.shape
    v = xh.astype(np.float64).reshape(R, 4, KX // 32, 8).transpose(0, 2, 1, 3).reshape(R, KX // 8, 8)
    v = v[:, :, PERM].reshape(R, KX // 32, 32)
    return (v * xc[..., None]).reshape(R, KX)


def rows_prep_ref(h: np.ndarray, ybuf=None, add2=None, add2_gate=None, nw=None, eps: float = 0.0):
    """(updated h, normed x) of rows_prep: h + ((sum_a ybuf[:, a]) + sigmoid(g) * add2); RMSNorm."""
    h = h.astype(np.float32).copy()
    if ybuf is not None or add2 is not None:
        acc = None
        if ybuf is not None:
            acc = ybuf[:, 0].copy()
            for a in range(1, ybuf.shape[1]):
                acc = acc + ybuf[:, a]
        if add2 is not None:
            s2 = add2 if add2_gate is None else (1 / (1 + np.exp(-add2_gate.reshape(-1, 1)))) * add2
            acc = s2 if acc is None else acc + s2
        h = h + acc
    x = None
    if nw is not None:
        var = np.mean(np.square(h, dtype=np.float64), axis=-1, keepdims=True)
        x = nw * (h / np.sqrt(var + eps))
    return h, x


def expert_ffn_ref(x: np.ndarray, w: dict) -> np.ndarray:
    """down(silu(gate x) * up x) in float64 of one expert's float weights {gate, up, down}."""
    x = x.astype(np.float64)
    g, u = x @ w["gate"].T.astype(np.float64), x @ w["up"].T.astype(np.float64)
    return (g / (1 + np.exp(-g)) * u) @ w["down"].T.astype(np.float64)


def blob_weights(blob: np.ndarray, layout: dict) -> dict:
    """gate / up / down float32 of a host blob (uint8) with the .ef expert layout."""
    return {p: quant.dequantize(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group)
            for p, t in layout.items()}


def moe_slots_ref(x: np.ndarray, ids: np.ndarray, rw, table: np.ndarray, pool: np.ndarray,
                  layout: dict) -> tuple[np.ndarray, bool]:
    """The MoE kernels' output y [P, D] (one row a (token, rank) pair, weighted) and the error flag.

    x [T, D], ids / rw [T, A], table [E] slot of each expert (-1: not resident), pool [slots, blob].
    """
    T, A = ids.shape
    y = np.zeros((T * A, x.shape[1]))
    err = False
    for t in range(T):
        for a in range(A):
            e = int(ids[t, a])
            slot = int(table[e]) if 0 <= e < len(table) else -1
            if slot < 0:
                err = True
                continue
            out = expert_ffn_ref(x[t:t + 1], blob_weights(pool[slot], layout))[0]
            y[t * A + a] = out * (1.0 if rw is None else float(rw[t, a]))
    return y, err


def dequant_f16_ref(buf: np.ndarray, qtype: str, shape, group: int) -> np.ndarray:
    """dequant_f16: the stored matrix as fp16 (dequantized in float32, then rounded)."""
    return quant.dequantize(buf, qtype, shape, group).astype(np.float16)
