"""The CuPy backend: the interface of numpy_backend.py on our own CUDA kernels.

Legend: T tokens, K / N a linear's inputs / outputs, D hidden, H / G query / kv heads,
dq / dv head dims, S keys, E experts, A active experts, I expert width.

Matrices stay in their stored type on the device (GpuWeight); the kernels dequantize on the fly:
- T <= SMALL_T tokens: GEMV kernels (q4 / q8 / f16 / bf16 / f32 weights, fp32 accumulation);
- larger T (prefill): weights widened to fp16 on the fly (f16 ones read in place), then cuBLAS
  (fp32 accumulation) on fp16 rows of x (gpu_dense_prefill.py). mm_input(x) prepares those rows
  once for every linear that reads x (and moe_prefill_device): Model passes it where one input
  feeds several matrices. RMSNorm and the weighted sum of the routed experts are one launch each.
Routed experts run through the MoE kernels (gate+up+SiLU fused, then down) for small T; a
prefill (T >= MOE_PREFILL_MIN_T) runs all experts of a layer in two grouped tensor-core launches
that dequantize in shared memory (moe_prefill, gpu_prefill.py), or per expert through fp16
GEMMs where those kernels do not take the layout. Every op has its numpy twin in NumpyBackend
(tests compare).
act: how the GEMV / MoE kernels take activations for quantized weights: "f16" (fp16 pairs,
hfma2) or "int8" (int8 codes a chunk of 32 with a float scale, dp4a; act_int8.py, whose twin is
NumpyBackend(act="int8")). Prefill GEMMs are fp16 either way.
The CUDA-graph decode path that needs no host round trip is gpu_decode.DecodeGraph.
"""
from __future__ import annotations

import numpy as np

from .. import quant
from ..config import ModelConfig
from ..errors import FormatError
from ..format import expert_layout
from . import act_int8
from . import gpu_ops as ops
from . import gpu_prefill
from . import gpu_attn_prefill
from . import gpu_dense_prefill as dense
from .gpu_kernels import cupy
from .gpu_weights import ExpertHandle, ExpertLayout, GpuWeight, make_weight, upload_blob

SMALL_T = act_int8.MAX_ROWS     # up to this many tokens (8) a linear uses the GEMV kernels


def device_bytes(raw):
    """Stored bytes of a tensor (host numpy / memmap, or already on the device) as device uint8."""
    return upload_blob(raw).reshape(-1).view(cupy.uint8)


class CupyBackend:
    name = "cupy"
    xp = cupy
    MOE_PREFILL_MIN_T = SMALL_T + 1     # Model._moe hands steps this long to moe_prefill

    def __init__(self, act: str = "f16"):
        self._layouts: dict[int, ExpertLayout] = {}
        self._wtabs: dict[tuple, tuple] = {}     # expert base addresses -> (moe_prefill_device tables, layout)
        self.act = act_int8.check_act(act)

    # ---- transfers and weights --------------------------------------------------------------
    def asarray(self, a):
        return cupy.asarray(a)

    def to_host(self, a) -> np.ndarray:
        return cupy.asnumpy(a)

    def weight(self, source, name: str):
        """A matrix as a GpuWeight (stored type); a 1-D tensor as a float32 device array."""
        if not source.has(name):
            raise FormatError(f"weight source lacks tensor {name!r}, which this model's config needs")
        tensors = getattr(source, "tensors", None)
        info = tensors.get(name) if isinstance(tensors, dict) else None
        if info is not None and len(info.shape) == 2:
            return make_weight(info.type, info.shape, info.group, device_bytes(source.raw(name)))
        w = cupy.asarray(np.ascontiguousarray(source.load(name), dtype=np.float32))
        if w.ndim == 2:         # a source without stored bytes (e.g. float32 from safetensors)
            return GpuWeight("f32", w.shape, 0, w.reshape(-1).view(cupy.uint8))
        return w

    def load_expert(self, source, layer: int, e: int) -> ExpertHandle:
        """One expert's blob on the device (sources without blobs: packed as float32 parts)."""
        if not hasattr(source, "expert_blob"):
            lay, blob = _f32_blob(source.expert_weights(layer, e))
            return ExpertHandle(int(blob.data.ptr), lay, blob)
        key = id(source)
        lay = self._layouts.get(key)
        if lay is None:
            lay = self._layouts[key] = ExpertLayout.of(source)
        blob = device_bytes(source.expert_blob(layer, e))
        return ExpertHandle(int(blob.data.ptr), lay, blob)

    # ---- dense ops -----------------------------------------------------------------------------
    def linear(self, x, W):
        """x [..., K] (or mm_input's Rows16 of x [T, K]) @ W.T."""
        rows = x if isinstance(x, dense.Rows16) else None
        if rows is not None:
            x = rows.x
        if not isinstance(W, GpuWeight):
            return cupy.matmul(x, W.T)
        if x.shape[-1] != W.K:
            raise FormatError(f"linear: x has {x.shape[-1]} inputs, the weight {W.K}")
        if rows is not None:
            return self._gemm(rows, W)
        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, W.K)
        if x2.shape[0] <= SMALL_T:
            y = ops.linear_small(x2, W, self.act)
        else:
            y = self._gemm(dense.rows16(x2), W)
        return y.reshape(*lead, W.N)

    def mm_input(self, x):
        """x [T, K] prepared once for every linear (and moe_prefill_device) that reads it: fp16 rows
        (gpu_dense_prefill.Rows16) for a prefill step, x itself for up to SMALL_T tokens (the GEMV
        kernels read float rows). Only linears and moe_prefill_device take the result."""
        if isinstance(x, dense.Rows16):
            return x
        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        return dense.rows16(x) if x.ndim == 2 and x.shape[0] > SMALL_T else x

    @staticmethod
    def _gemm(rows, W: GpuWeight):
        """Prefill product rows.x @ W.T through cuBLAS: f16 weights in place, others widened first."""
        if W.qtype == "f16":
            return dense.gemm(rows, W.ptr("q"), W.N, W.K)
        w16 = W.f16()
        return dense.gemm(rows, w16.data.ptr, W.N, W.K)

    def embed(self, ids, W):
        ids = cupy.ascontiguousarray(cupy.asarray(ids).reshape(-1), dtype=cupy.int32)
        if not isinstance(W, GpuWeight):
            return W[ids]
        return ops.embed(ids, W)

    def rms_norm(self, x, w, eps: float):
        D = x.shape[-1]
        if x.ndim > 1 and x.shape[0] > SMALL_T:  # a prefill: one block a row, few host calls
            return dense.rms_norm(x, w, eps)
        x2 = cupy.ascontiguousarray(x, dtype=cupy.float32).reshape(-1, D)
        out = cupy.empty_like(x2)
        ops.rows_prep(x2, D, nw=cupy.ascontiguousarray(w, dtype=cupy.float32), eps=eps, x32=out)
        return out.reshape(x.shape)

    def rope(self, x, cos, sin, interleaved: bool = False):
        if x.strides[-1] != 4:
            x = cupy.ascontiguousarray(x)
        return ops.rope(x, cos, sin, interleaved)

    def attention(self, q, k, v, pos0: int, scale: float):
        if q.shape[0] >= gpu_attn_prefill.MIN_T:         # prefill: batched GEMMs + fused softmax
            return gpu_attn_prefill.attention_prefill(q, k, v, pos0, scale)
        if q.strides[-1] != 4:
            q = cupy.ascontiguousarray(q)
        return ops.attention(q, cupy.ascontiguousarray(k), cupy.ascontiguousarray(v), pos0, scale)

    _silu_mul = None
    _sigmoid = None

    def silu_mul(self, g, u):
        if CupyBackend._silu_mul is None:
            CupyBackend._silu_mul = cupy.ElementwiseKernel(
                "float32 g, float32 u", "float32 y", "y = g / (1.0f + expf(-g)) * u", "efengine_silu_mul")
        return CupyBackend._silu_mul(g, u)

    def sigmoid(self, x):
        if CupyBackend._sigmoid is None:
            CupyBackend._sigmoid = cupy.ElementwiseKernel(
                "float32 x", "float32 y", "y = 1.0f / (1.0f + expf(-x))", "efengine_sigmoid")
        return CupyBackend._sigmoid(x)

    # ---- mixture of experts ------------------------------------------------------------------
    def route(self, logits, cfg: ModelConfig):
        return ops.route(logits, cfg)

    def expert_ffn(self, x, h: ExpertHandle):
        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        T = x.shape[0]
        lay = h.layout
        if T > SMALL_T:
            return self._expert_gemm(x, h)
        gate, up, down = (ops.Mat.of_part(lay.parts[p]) for p in ("gate", "up", "down"))
        src = ops.Experts(base=h.base)
        return _expert_pairs(src, gate, up, down, T, 1, x, None, self.act)

    def _expert_gemm(self, x, h: ExpertHandle):
        """Prefill: fp16 GEMMs; quantized gate and up are widened into one [2I, D] matrix (one GEMM)."""
        x16 = ops.to_f16_rows(x)
        gw, uw = h.weight("gate"), h.weight("up")
        I = gw.N
        if gw.quantized:
            w2 = cupy.empty((2 * I, gw.K), dtype=cupy.float16)
            gw.f16(out=w2[:I])
            uw.f16(out=w2[I:])
            gu = ops.matmul_f16(x, w2, x16)
            g, u = gu[:, :I], gu[:, I:]
        else:
            g, u = ops.matmul_f16(x, gw.f16(), x16), ops.matmul_f16(x, uw.f16(), x16)
        return ops.matmul_f16(self.silu_mul(g, u), h.weight("down").f16())

    def moe_prefill(self, x, ids: np.ndarray, handles: dict):
        """Every routed expert of a layer on its tokens: y [T*A, D], row t*A + a = expert ids[t, a]
        on x[t] (unweighted). ids [T, A] host; handles {expert id: ExpertHandle} for every id."""
        x = cupy.ascontiguousarray(x, dtype=cupy.float32)
        if gpu_prefill.grouped_ok(handles):
            return gpu_prefill.moe_prefill(x, ids, handles)
        A = ids.shape[1]
        order, experts, tiles = gpu_prefill.plan(ids, bm=ids.size)      # one tile an expert
        y = cupy.empty((ids.size, x.shape[1]), dtype=cupy.float32)
        for ei, p0, n, _ in tiles.tolist():
            slots = cupy.asarray(order[p0:p0 + n])
            y[slots] = self.expert_ffn(x[slots // A], handles[int(experts[ei])])
        return y

    def moe_prefill_device(self, x, ids, handles: dict):
        """moe_prefill with ids [T, A] on the device and handles = every expert of the layer (all
        resident): no host round trip. x [T, D] or mm_input's Rows16 of it. None if the grouped
        kernels do not take these experts. Tables and layout checks are made once per expert set."""
        key = tuple(handles[e].base for e in sorted(handles))
        ent = self._wtabs.get(key)
        if ent is None or ent[1].parts["gate"].shape[1] != x.shape[1]:
            if not gpu_prefill.grouped_ok(handles):
                return None
            if len(self._wtabs) > 4096:          # address tables of replaced pools
                self._wtabs.clear()
            hs = {e: handles[e] for e in sorted(handles)}
            tables = gpu_prefill.weight_tables(hs)
            ent = self._wtabs[key] = (tables, gpu_prefill.checked_layout(hs, x.shape[1]))
        return gpu_prefill.moe_prefill_device(x, ids, handles, ent[0], checked=ent[1])

    def moe_combine(self, y, weights):
        return dense.moe_combine(y, weights)


def _f32_blob(w: dict):
    """gate / up / down float32 arrays -> (layout, device blob) in the .ef blob layout."""
    specs = {p: ("f32", tuple(w[p].shape), quant.DEFAULT_GROUP) for p in ("gate", "up", "down")}
    places, nbytes = expert_layout(specs)
    blob = np.zeros(nbytes, dtype=np.uint8)
    for p, t in places.items():
        blob[t.offset:t.offset + t.nbytes] = np.ascontiguousarray(w[p], dtype=np.float32).reshape(-1).view(np.uint8)
    return ExpertLayout(places, nbytes), cupy.asarray(blob)


def _expert_pairs(src, gate, up, down, P: int, A: int, x, rw, act: str = "f16"):
    """Routed-expert FFN of P (token, rank) pairs through the MoE kernels -> y [P, D]."""
    T, D = x.shape
    prep = None
    if gate.qtype in ("q4", "q8"):
        prep = ops.XPrep(T, D, gate.Kp, act)
        ops.rows_prep(x, D, prep=prep)
    I = gate.N
    h = cupy.empty((P, I), dtype=cupy.float32)
    hprep = ops.XPrep(P, I, max(down.Kp, ops.cdiv(I, 32) * 32), act) if down.qtype in ("q4", "q8") else None
    ops.moe_gateup(src, gate, up, P, A, x, prep, h, hprep)
    y = cupy.empty((P, D), dtype=cupy.float32)
    ops.moe_down(src, down, P, h, hprep, rw, y)
    return y
