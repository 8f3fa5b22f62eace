"""Offloaded batch-1 decode that keeps CUDA graphs: one graph segment between MoE routers.

Legend: L layers, E experts per layer, A active experts, D hidden.

DecodeGraph records a whole greedy step as one graph, which needs every routed expert resident.
OffloadDecodeGraph cuts the same kernel sequence (DecodeGraph's own launch helpers, same buffers,
same order, so the same bits) at every MoE layer's router:
  seg 0      embed | layers up to the first MoE layer's router (top-k ids -> device `ids`)
  seg k      that layer's routed experts (gate/up/down via the slot table [L,E]) | shared expert |
             the following layers up to the next MoE router (or final norm, lm_head, argmax)
Between segments the host reads the A ids (one small sync), hands them to the offload runtime
(OffloadRuntime.begin_layer: hits, misses, copies on the CudaEngine's stream into pool slots,
slot table updates), which makes the compute stream wait on the copy events of the experts this
layer needs (stall = CUDA-event time of those waits, CudaEngine.drain_stall), then the next
segment is replayed. Every pool / table write of the runtime is issued on the graph's stream, so
it is ordered with the segments. Since the experts run in a segment launched after begin_layer
returns, the runtime keeps them pinned (`defer_use`) and fences their slots after the launch, so
no later copy overwrites a slot a queued kernel still reads.

Trace replay (bench O1): `route_hook(layer, None, ids [1,A], weights [1,A])` on host numpy arrays
(e.g. offload_gpu_bench.TraceRouter built on the numpy backend) replaces the router's choice:
after the segment that ran the router, its ids are still read back (the sync a real run pays),
then the hook's ids / weights are written into the device `ids` / `rw` buffers before the
runtime and the expert segment see them.

Policies see no hidden states here (pregate never prefetches; expertflow is history-only).
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import gpu_ops as ops
from .gpu_decode import DecodeGraph
from .gpu_kernels import cupy


class OffloadDecodeGraph(DecodeGraph):
    """Greedy decode of `model` (cupy backend) whose routed experts live in `runtime.pool`."""

    def __init__(self, model, runtime, cache, route_hook=None):
        if not model.cfg.is_moe:
            raise ConfigError("OffloadDecodeGraph needs a model with routed experts")
        super().__init__(model, runtime.pool, cache)
        self.rt, self.route_hook = runtime, route_hook
        eng = runtime.engine
        if hasattr(eng, "compute"):
            eng.compute = self.stream            # copy-event waits and fences go on our stream
        self.segs = self._segments()
        self.graphs: list | None = None
        self.ids_host = np.zeros((1, self.cfg.top_k), dtype=np.int32)

    # ---- the step cut at the routers -----------------------------------------------------------
    def _segments(self) -> list:
        """[(MoE layer ending the segment or None, [callables])]; calls run in DecodeGraph order."""
        segs, cur = [], [self._embed]
        for l, L in enumerate(self.layers):
            cur.append(lambda l=l: self._attn(l))
            if L["moe"]:
                cur.append(lambda l=l: self._route(l))
                segs.append((l, cur))
                cur = [lambda l=l: self._experts_into_pend(l)]
            else:
                cur.append(lambda l=l: self._set_pend(self._dense(self.layers[l]["w"])))
        cur.append(self._final)
        segs.append((None, cur))
        return segs

    def _embed(self) -> None:
        ops.embed(self.tok, self.model.tok_embd, out=self.hb[0])
        self.cur, self.pend = 0, {}

    def _set_pend(self, pend: dict) -> None:
        self.pend = pend

    def _attn(self, l: int) -> None:
        """DecodeGraph._step's per-layer body up to the FFN norm."""
        cfg, m, w = self.cfg, self.model, self.layers[l]["w"]
        H, G, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self._norm(w["attn_norm"], self.pend)
        self._gemv(self.layers[l]["qkv"], self.layers[l]["qkv_w"], self.x32, self.prepD)
        ops.qkv_rope_store(self.q, self.k, self.v, H, G, d, self.cos, self.sin, self.pos,
                           self.cache.k[l], self.cache.v[l])
        Wo = w["attn_output"]
        fuse = Wo.quantized and d % 32 == 0
        ops.attention(self.q.reshape(1, H, d), self.cache.k[l], self.cache.v[l], self.pos, m.scale,
                      out=self.o, work=self.attw, S=self.P, prep=self.prepO if fuse else None)
        o2 = self.o.reshape(1, H * d)
        if Wo.quantized and not fuse:
            ops.rows_prep(o2, H * d, prep=self.prepO)
        self._gemv(self.layers[l]["o_desc"][self.cur], [Wo], o2, self.prepO if Wo.quantized else None)
        self._norm(w["ffn_norm"], {})

    def _experts_into_pend(self, l: int) -> None:
        """DecodeGraph._experts of layer l; what the next norm adds is kept for the next segment."""
        self.pend = self._experts(l)

    def _final(self) -> None:
        m = self.model
        self._norm(m.out_norm, self.pend)
        self._gemv(self.lm_desc, [m.lm_head], self.x32, self.prepD)
        ops.argmax_advance(self.logits, self.cfg.vocab_size, self.tok, self.pos, self.hist)

    # ---- the host side between segments -------------------------------------------------------
    def _offload(self, l: int) -> None:
        """Ids to the host (sync), optional trace override, runtime makes the experts resident."""
        self.ids.get(stream=self.stream, out=self.ids_host)          # blocking: waits for the router
        ids = self.ids_host
        if self.route_hook is not None:
            ids, wts = self.route_hook(l, None, ids.copy(), np.zeros(ids.shape, np.float32))
            ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(1, -1)
            self.ids.set(ids, stream=self.stream)
            self.rw.set(np.ascontiguousarray(wts, dtype=np.float32).reshape(1, -1), stream=self.stream)
        self.rt.defer_use = []
        try:
            for _ in self.rt.begin_layer(l, ids):
                pass
        except BaseException:
            self.rt.defer_use = None
            raise

    def _after_launch(self, l: int) -> None:
        """The expert segment of layer l is queued: fence its slots, release them, plan prefetches."""
        slots, self.rt.defer_use = self.rt.defer_use, None
        fence = getattr(self.rt.engine, "fence", None)
        for s in slots if fence is not None else ():
            fence(s)
        self.rt.end_layer(l)

    def _run(self, launch) -> None:
        """One step; launch(k) runs segment k (eagerly or as its graph) on self.stream."""
        with self.stream:
            self.rt.begin_step(np.zeros(1, dtype=np.int64))
            prev = None
            for k, (l, _) in enumerate(self.segs):
                launch(k)
                if prev is not None:
                    self._after_launch(prev)
                if l is not None:
                    self._offload(l)
                prev = l
            self.rt.end_step()

    def _eager(self, k: int) -> None:
        for f in self.segs[k][1]:
            f()

    # ---- running -------------------------------------------------------------------------------
    def capture(self) -> None:
        """Record every segment (after one eager warm-up step through the runtime, then undone:
        it writes the KV cache at `pos`, so call start() first, as generate does)."""
        cupy.cuda.Device().synchronize()
        tok, pos = self.tok.copy(), self.pos.copy()
        self._run(self._eager)
        graphs = []
        with self.stream:
            self.tok[...] = tok
            self.pos[...] = pos
            self.stream.synchronize()
            for k in range(len(self.segs)):
                self.stream.begin_capture()
                try:
                    self._eager(k)
                finally:
                    graphs.append(self.stream.end_capture())
        self.stream.synchronize()
        self.graphs = graphs
        self.pool.check()

    def variant(self, skip: set):
        raise ConfigError("OffloadDecodeGraph has no single-graph variants; use DecodeGraph")

    def step(self) -> None:
        """One greedy step: segment graphs with the runtime between them (does not wait at the end)."""
        if self.graphs is None:
            self.capture()
        self._run(lambda k: self.graphs[k].launch(self.stream))

    def replay(self, n: int = 1) -> None:
        for _ in range(n):
            self.step()

    def step_eager(self) -> None:
        self._run(self._eager)
