"""Offloaded batch-1 decode that keeps CUDA graphs: one graph segment between MoE routers.

Legend: L layers, E experts per layer, A active experts, D hidden.

DecodeGraph records a whole greedy step as one graph, which needs every routed expert resident.
OffloadDecodeGraph cuts the same kernel sequence (DecodeGraph's own launch helpers, same buffers,
same order, so the same bits) at every MoE layer's router:
  seg 0      embed | layers up to the first MoE layer's router (top-k ids -> device `ids`)
  seg k      that layer's routed experts (gate/up/down via the slot table [L,E]) | shared expert |
             the following layers up to the next MoE router (or final norm, lm_head, argmax)
Between segments the host reads back one small pinned buffer (the A ids, and the predicted
router logits below) with an async copy + event sync, then `runtime.demand(layer, ids)` issues the
demand copies of the misses on the CudaEngine's stream first (before the stats / policy
bookkeeping), makes the compute stream wait on the copy events of the experts this layer needs
(stall = CUDA-event time of those waits, CudaEngine.drain_stall) and returns the slots the expert
segment will read. Every pool / table write of the runtime is issued on the graph's stream, so it
is ordered with the segments. The next segment is launched, then those slots are fenced (no later
copy overwrites a slot a queued kernel still reads) and `runtime.end_layer(layer, pregate=...)`
plans prefetches while the device runs the segment: the host work that is not on the path from
the router to the copies and the launch runs behind them.

Predictions (`predict_ahead` S > 0; default 1 for pregate, 2 for expertflow, 0 for ondemand): the
segment that ends with MoE layer i's router also applies the routers of MoE layers i+1..i+S to the
same residual stream (after layer i's attention), each through its own layer's ffn_norm (as
Model.router_logits does with a hidden state), on the device; their logits [S, E] come back in the
same read-back and reach the policy as end_layer(pregate=logits). The eager path's pre-gate sees the
residual after layer i's FFN instead; this one sees it one FFN earlier (more lead time).

Trace replay (bench O1): `route_hook(layer, None, ids [1,A], weights [1,A])` on host numpy arrays
(e.g. offload_gpu_bench.TraceRouter built on the numpy backend) replaces the router's choice:
after the segment that ran the router, its ids are still read back (the sync a real run pays),
then the hook's ids / weights go to the runtime and are written into the device `ids` / `rw`
buffers (pinned staging, async on the graph's stream) once the demand copies are issued.

Host timing (always on, perf_counter): `host_times()` -> seconds per step spent in the router
read-back sync, the route hook, runtime.demand, from the sync to the first demand copy issued,
graph launches, and after-launch work (fences, end_layer / planning).
Timeline: while the runtime records one (stats.timeline), each segment launch is bracketed by CUDA
events (kind "compute", labelled with the MoE layer whose router ends it; the last one with the
last layer).
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import ConfigError
from . import gpu_ops as ops
from .gpu_decode import DecodeGraph
from .gpu_kernels import cupy

HOST_KEYS = ("router_sync_s", "route_hook_s", "runtime_s", "to_first_copy_s", "launch_s", "after_launch_s")


class OffloadDecodeGraph(DecodeGraph):
    """Greedy decode of `model` (cupy backend) whose routed experts live in `runtime.pool`."""

    def __init__(self, model, runtime, cache, route_hook=None, predict_ahead: int | None = None):
        if not model.cfg.is_moe:
            raise ConfigError("OffloadDecodeGraph needs a model with routed experts")
        super().__init__(model, runtime.pool, cache)
        self.rt, self.route_hook = runtime, route_hook
        eng = runtime.engine
        if hasattr(eng, "compute"):
            eng.compute = self.stream            # copy-event waits and fences go on our stream
        self.moe = [l for l, L in enumerate(self.layers) if L["moe"]]
        self.moe_index = {l: i for i, l in enumerate(self.moe)}
        self.ahead = self._ahead(predict_ahead)
        self._readback_buffers()
        self.segs = self._segments()
        self.graphs: list | None = None
        self.pending: tuple | None = None       # (layer, slots, predicted logits) until end_layer
        self.route_log: list | None = None      # a list: the ids [A] of every MoE layer, in order
        self.reset_host()

    def _ahead(self, n: int | None) -> int:
        if n is None:
            n = {"pregate": 1, "horizon": 2}.get(self.rt.policy.prefetch, 0)
        if n < 0:
            raise ConfigError(f"predict_ahead must be >= 0, got {n}")
        return min(int(n), len(self.moe) - 1)

    def _readback_buffers(self) -> None:
        """One device buffer read back per MoE layer: [ids (A) | predicted logits (S*E float32)]."""
        import cupyx
        cfg = self.cfg
        A, E, S, D = cfg.top_k, cfg.n_experts, self.ahead, cfg.hidden_size
        n = A + S * E
        self.rb = cupy.zeros(n, dtype=cupy.int32)
        self.ids = self.rb[:A].reshape(1, A)      # the router's ids live in it (DecodeGraph's are unused)
        self.rb_host = cupyx.empty_pinned((n,), dtype=np.int32)
        self.rb_ready = cupy.cuda.Event(disable_timing=True)
        self.up_ids = cupyx.empty_pinned((A,), dtype=np.int32)       # route hook -> device ids / rw
        self.up_rw = cupyx.empty_pinned((A,), dtype=np.float32)
        if S:
            self.plog = self.rb[A:].view(cupy.float32).reshape(S, E)
            self.pids = cupy.zeros((S, A), dtype=cupy.int32)
            self.pwts = cupy.zeros((S, A), dtype=cupy.float32)
            self.px32 = cupy.zeros((1, D), dtype=cupy.float32)
            self.pprep = ops.XPrep(1, D, self.prepD.KX, self.prepD.act)   # the graph's format

    def reset_host(self) -> None:
        self.host = dict.fromkeys(HOST_KEYS, 0.0)
        self.host.update(steps=0, copy_layers=0)

    def host_times(self) -> dict:
        """Host seconds per step by part (see the module docstring), and layers that issued copies."""
        n = max(self.host["steps"], 1)
        out = {k: self.host[k] / n for k in HOST_KEYS}
        out["copy_layers_per_step"] = self.host["copy_layers"] / n
        return out

    # ---- the step cut at the routers -----------------------------------------------------------
    def _segments(self) -> list:
        """[(MoE layer ending the segment or None, [callables])]; calls run in DecodeGraph order."""
        segs, cur = [], [self._embed]
        for l, L in enumerate(self.layers):
            cur.append(lambda l=l: self._attn(l, self.pend))
            if L["moe"]:
                cur.append(lambda l=l: self._route(l))
                if self.ahead:
                    cur.append(lambda l=l: self._predict(l))
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

    def _experts_into_pend(self, l: int) -> None:
        """DecodeGraph._experts of layer l; what the next norm adds is kept for the next segment."""
        self.pend = self._experts(l)

    def _final(self) -> None:
        m = self.model
        self._norm(m.out_norm, self.pend)
        self._gemv(self.lm_desc, [m.lm_head], self.x32, self.prepD)
        ops.argmax_advance(self.logits, self.cfg.vocab_size, self.tok, self.pos, self.hist)

    def _predict(self, l: int) -> None:
        """Routers of the next `ahead` MoE layers on this layer's residual stream (each through its
        own ffn_norm, into separate buffers: x32 / prepD still feed layer l's experts) -> plog."""
        cfg, i, h = self.cfg, self.moe_index[l], self.hb[self.cur]
        for k in range(min(self.ahead, len(self.moe) - 1 - i)):
            w = self.layers[self.moe[i + 1 + k]]["w"]
            W = w["ffn_gate_inp"]
            ops.rows_prep(h, cfg.hidden_size, nw=w["ffn_norm"], eps=cfg.rms_norm_eps, x32=self.px32,
                          prep=self.pprep)
            ops.router(W, 1, self.px32, self.pprep if W.quantized else None, cfg, self.pids[k:k + 1],
                       self.pwts[k:k + 1], logits=self.plog[k:k + 1])

    # ---- the host side between segments -------------------------------------------------------
    def _read_back(self, l: int) -> tuple:
        """(ids [1, A], predicted logits [n, E] float64 or None) of the segment just run (waits)."""
        A, E = self.cfg.top_k, self.cfg.n_experts
        cupy.cuda.runtime.memcpyAsync(self.rb_host.ctypes.data, self.rb.data.ptr, self.rb.nbytes, 2,
                                      self.stream.ptr)
        self.rb_ready.record(self.stream)
        self.rb_ready.synchronize()
        ids = np.array(self.rb_host[:A]).reshape(1, A)
        n = min(self.ahead, len(self.moe) - 1 - self.moe_index[l])
        pred = self.rb_host[A:A + n * E].view(np.float32).reshape(n, E).astype(np.float64) if n > 0 else None
        return ids, pred

    def _offload(self, l: int) -> None:
        """Read back (sync), optional trace override, runtime.demand (copies first); the expert
        segment's slots and the predictions wait in `pending` for _after_launch."""
        h, t0 = self.host, time.perf_counter()
        ids, pred = self._read_back(l)
        t1 = time.perf_counter()
        wts = None
        if self.route_hook is not None:
            A = self.cfg.top_k
            ids, wts = self.route_hook(l, None, ids, np.zeros(ids.shape, np.float32))
            ids = np.ascontiguousarray(ids, dtype=np.int32).reshape(1, -1)
            wts = np.ascontiguousarray(wts, dtype=np.float32).reshape(1, -1)
            if ids.shape[1] != A or wts.shape[1] != A:
                raise ConfigError(f"route_hook must return {A} ids and weights for layer {l}")
        t2 = time.perf_counter()
        slots = self.rt.demand(l, ids)
        t3 = time.perf_counter()
        if wts is not None:         # after the copies are issued; the stream orders it before the experts
            self._upload_route(ids, wts)
        if self.route_log is not None:
            self.route_log.append(ids.reshape(-1).copy())
        self.pending = (l, slots, pred)
        first = self.rt.first_issue_t
        if first is not None:
            h["to_first_copy_s"] += first - t1
            h["copy_layers"] += 1
        h["router_sync_s"] += t1 - t0
        h["runtime_s"] += t3 - t2
        h["route_hook_s"] += (t2 - t1) + (time.perf_counter() - t3)

    def _upload_route(self, ids: np.ndarray, wts: np.ndarray) -> None:
        """ids / weights -> the device buffers through pinned staging (async on the graph's stream;
        the staging is rewritten only after the next read-back, which follows this copy)."""
        np.copyto(self.up_ids, ids.reshape(-1))
        np.copyto(self.up_rw, wts.reshape(-1))
        rt, s = cupy.cuda.runtime, self.stream.ptr
        rt.memcpyAsync(self.ids.data.ptr, self.up_ids.ctypes.data, self.up_ids.nbytes, 1, s)
        rt.memcpyAsync(self.rw.data.ptr, self.up_rw.ctypes.data, self.up_rw.nbytes, 1, s)

    def _after_launch(self) -> None:
        """The expert segment of the pending layer is queued: fence its slots, release them, plan
        prefetches from the predictions (the device is busy with the segment meanwhile)."""
        t0 = time.perf_counter()
        l, slots, pred = self.pending
        self.pending = None
        fence = getattr(self.rt.engine, "fence", None)
        for s in slots if fence is not None else ():
            fence(s)
        self.rt.end_layer(l, pregate=pred)
        self.host["after_launch_s"] += time.perf_counter() - t0

    def _launch(self, launch, k: int, rec) -> None:
        t0 = time.perf_counter()
        if rec is None:
            launch(k)
        else:                                   # timeline: the segment between two events
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record(self.stream)
            launch(k)
            e1.record(self.stream)
            l = self.segs[k][0]
            rec.compute(self.cfg.n_layers - 1 if l is None else l, e0, e1)
        self.host["launch_s"] += time.perf_counter() - t0

    def _run(self, launch) -> None:
        """One step; launch(k) runs segment k (eagerly or as its graph) on self.stream."""
        with self.stream:
            self.rt.begin_step(np.zeros(1, dtype=np.int64))
            rec = self.rt.recorder
            self.pending = None
            for k, (l, _) in enumerate(self.segs):
                self._launch(launch, k, rec)
                if self.pending is not None:
                    self._after_launch()
                if l is not None:
                    self._offload(l)
            self.rt.end_step()
            self.host["steps"] += 1

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
        self.reset_host()

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
