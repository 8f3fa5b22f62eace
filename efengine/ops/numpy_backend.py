"""The reference backend: numpy, float32 throughout. Every CuPy kernel is tested against it.

Letter legend: T tokens in a step, D hidden, V vocab, H query heads, G kv heads, R = H/G,
dq / dv query-key / value head dims, r rotated dims, S visible cached positions (keys),
E routed experts, A active experts per token, I expert width, K / N a linear's inputs / outputs.

The interface (a backend is any object with these members; model.py calls nothing else, apart
from the array module `xp` for reshapes, slicing, concatenation, + and *):

  name: str                       "numpy" | "cupy"
  xp: module                      numpy or cupy
  asarray(a) -> array             host array (any dtype) -> device array, same dtype
  to_host(a) -> np.ndarray        device array -> host numpy array
  weight(source, name) -> W       a dense tensor of the weight source made ready for linear /
                                  embed / rms_norm (numpy: float32 dequantized; a device
                                  backend may keep matrices quantized and dequantize in its
                                  kernels; 1-D tensors (norms, biases) are plain float32 arrays)
  load_expert(source, layer, e) -> handle
                                  one routed expert made ready for expert_ffn (numpy:
                                  ExpertWeights of float32 gate [I,D], up [I,D], down [D,I])
  linear(x [T,K], W [N,K]) -> [T,N]          y = x @ W.T (biases are added by the model)
  embed(ids [T] int, W [V,D]) -> [T,D]       rows of W
  rms_norm(x [...,D], w [D], eps) -> [...,D] w * x / sqrt(mean(x^2) + eps), over the last axis
  rope(x [T,h,r], cos [T,r/2], sin [T,r/2], interleaved) -> [T,h,r]
        rotation by angle table; interleaved=False: pairs (x[i], x[i+r/2]) (NeoX / rotate_half);
        interleaved=True: pairs (x[2i], x[2i+1]) (DeepSeek's complex form). Pair i uses
        cos[:, i], sin[:, i]: (a, b) -> (a cos - b sin, b cos + a sin).
  attention(q [T,H,dq], k [S,G,dq], v [S,G,dv], pos0, scale) -> [T,H,dv]
        causal softmax attention; query t sits at absolute position pos0+t and sees keys
        0..pos0+t; query head h reads kv head h // R; softmax in float32.
  silu_mul(g, u) -> silu(g) * u               silu(x) = x / (1 + exp(-x))
  sigmoid(x) -> 1 / (1 + exp(-x))
  route(logits [T,E] f32, cfg) -> ids [T,A] int32, weights [T,A] f32
        every routing variant of ModelConfig: softmax over all E experts (float32), optional
        DeepSeek group_limited_greedy masking, top-A by probability (ties: lower expert id
        first; ids are in rank order, best first), renormalized when norm_topk_prob,
        all ones when moe_weighting == "ones", then times routed_scaling_factor.
  expert_ffn(x [T,D], handle) -> [T,D]        down(silu(gate x) * up x) of one expert
  moe_combine(y [T,A,D], weights [T,A]) -> [T,D]
        the weighted sum in fixed rank order: acc = y[:,0]*w[:,0]; acc = acc + y[:,a]*w[:,a]
        for a = 1..A-1. y holds each (token, rank) expert output in its own slot, so the
        order the experts ran in never changes the bits.

Inputs may be strided views (a slice of a projection, of the KV cache); a device backend makes
them contiguous where its kernels need that. Ops return new arrays and never write their inputs.
cos/sin tables come from efengine.rope (host float32, uploaded per step with asarray).

NumpyBackend(act="int8") is the twin of CupyBackend(act="int8"): products of matrices the GPU keeps
quantized with at most act_int8.MAX_ROWS rows of activations take int8 activations (act_int8.py).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..config import ModelConfig
from .. import quant, routing
from ..errors import FormatError
from . import act_int8

# Attention materializes [G, R, Tb, S] scores; blocks of queries bound that to ~64 MiB.
_SCORE_ELEMS = 16 * 1024 * 1024


class ExpertWeights(NamedTuple):
    """A resident routed expert on the numpy backend (float32)."""
    gate: np.ndarray    # [I, D]
    up: np.ndarray      # [I, D]
    down: np.ndarray    # [D, I]
    int8: tuple = (False, False)    # act="int8": gate/up, down take int8 activations (quantized on the GPU)


class QuantMatrix(NamedTuple):
    """act="int8": a matrix the GPU keeps quantized, float32 here; its small products take int8 x."""
    w: np.ndarray       # [N, K]


class NumpyBackend:
    name = "numpy"
    xp = np
    act = "f16"         # the class default, for subclasses that do not call __init__

    def __init__(self, act: str = "f16"):
        self.act = act_int8.check_act(act)      # "f16": exact float32 products (the reference)
        if self.act == "int8":
            # steps longer than the GPU's GEMV steps go through moe_prefill, as on the GPU, where
            # they take float (fp16 GEMM) activations: float32 here
            self.MOE_PREFILL_MIN_T = act_int8.MAX_ROWS + 1

    # ---- transfers and weights --------------------------------------------------------------
    def asarray(self, a) -> np.ndarray:
        return np.asarray(a)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def weight(self, source, name: str) -> np.ndarray:
        if not source.has(name):
            raise FormatError(f"weight source lacks tensor {name!r}, which this model's config needs")
        w = np.ascontiguousarray(source.load(name), dtype=np.float32)
        if self.act == "int8" and w.ndim == 2:
            tensors = getattr(source, "tensors", None)
            info = tensors.get(name) if isinstance(tensors, dict) else None
            if info is not None and act_int8.kernel_group(info.type, info.group):
                return QuantMatrix(w)
        return w

    def load_expert(self, source, layer: int, e: int) -> ExpertWeights:
        w = source.expert_weights(layer, e)
        int8 = (False, False)
        lay = getattr(source, "expert_layout", None) if hasattr(source, "expert_blob") else None
        if self.act == "int8" and lay:
            int8 = tuple(lay[p].type in quant.QUANT_TYPES for p in ("gate", "down"))
        return ExpertWeights(*(np.ascontiguousarray(w[p], dtype=np.float32) for p in ("gate", "up", "down")),
                             int8=int8)

    # ---- dense ops -----------------------------------------------------------------------------
    def linear(self, x: np.ndarray, W: np.ndarray) -> np.ndarray:
        if isinstance(W, QuantMatrix):
            x, W = _small_int8(x, True), W.w
        return np.matmul(x, W.T)

    def embed(self, ids: np.ndarray, W: np.ndarray) -> np.ndarray:
        if isinstance(W, QuantMatrix):
            W = W.w
        return W[np.asarray(ids, dtype=np.int64)]

    def rms_norm(self, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
        var = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
        return w * (x * (np.float32(1.0) / np.sqrt(var + np.float32(eps))))

    def rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, interleaved: bool = False) -> np.ndarray:
        r = x.shape[-1]
        if interleaved:
            a, b = x[..., 0::2], x[..., 1::2]
        else:
            a, b = x[..., : r // 2], x[..., r // 2:]
        c, s = cos[:, None, :], sin[:, None, :]          # broadcast over heads
        ra, rb = a * c - b * s, b * c + a * s
        out = np.empty_like(x)
        if interleaved:
            out[..., 0::2], out[..., 1::2] = ra, rb
        else:
            out[..., : r // 2], out[..., r // 2:] = ra, rb
        return out

    def attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float) -> np.ndarray:
        T, H, _ = q.shape
        S, G, dv = v.shape
        R = H // G
        kg = k.transpose(1, 2, 0)[:, None]            # [G, 1, dq, S]
        vg = v.transpose(1, 0, 2)[:, None]            # [G, 1, S, dv]
        qg = q.reshape(T, G, R, -1).transpose(1, 2, 0, 3)   # [G, R, T, dq]
        out = np.empty((G, R, T, dv), dtype=np.float32)
        block = max(1, _SCORE_ELEMS // max(1, H * S))
        keys = np.arange(S)
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            scores = np.matmul(qg[:, :, t0:t1], kg) * np.float32(scale)        # [G, R, Tb, S]
            visible = keys[None, :] <= (pos0 + np.arange(t0, t1))[:, None]      # [Tb, S]
            scores = np.where(visible, scores, np.float32(-np.inf))
            scores -= scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p /= p.sum(axis=-1, keepdims=True)
            out[:, :, t0:t1] = np.matmul(p, vg)
        return out.transpose(2, 0, 1, 3).reshape(T, H, dv)

    def silu_mul(self, g: np.ndarray, u: np.ndarray) -> np.ndarray:
        return g / (np.float32(1.0) + np.exp(-g)) * u

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))

    # ---- mixture of experts ------------------------------------------------------------------
    def route(self, logits: np.ndarray, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
        return routing.route(logits, cfg)

    def expert_ffn(self, x: np.ndarray, h: ExpertWeights) -> np.ndarray:
        x = _small_int8(x, h.int8[0])
        hid = self.silu_mul(np.matmul(x, h.gate.T), np.matmul(x, h.up.T))
        return np.matmul(_small_int8(hid, h.int8[1]), h.down.T)

    def moe_prefill(self, x: np.ndarray, ids: np.ndarray, handles: dict) -> np.ndarray:
        """act="int8" only (steps of more than MAX_ROWS tokens): every routed expert of a layer on
        its tokens with float activations -> y [T*A, D], row t*A + a = expert ids[t, a] on x[t]."""
        A, flat = ids.shape[1], ids.reshape(-1)
        y = np.empty((flat.size, x.shape[1]), dtype=np.float32)
        for e, h in handles.items():
            slots = np.flatnonzero(flat == e)
            y[slots] = self.expert_ffn(x[slots // A], h._replace(int8=(False, False)))
        return y

    def moe_combine(self, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
        acc = y[:, 0] * weights[:, 0, None]
        for a in range(1, y.shape[1]):
            acc = acc + y[:, a] * weights[:, a, None]
        return acc


def _small_int8(x: np.ndarray, quantized: bool) -> np.ndarray:
    """x, or the values int8 activations give it where the GPU would take them (a quantized matrix,
    at most act_int8.MAX_ROWS rows)."""
    rows = int(np.prod(x.shape[:-1]))
    return act_int8.fake_quant(x) if quantized and rows <= act_int8.MAX_ROWS else x
