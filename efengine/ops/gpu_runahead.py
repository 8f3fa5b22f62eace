"""Run-ahead offloaded decode: the whole step is one CUDA graph; the device checks residency.

Legend: L layers, E experts per layer, A active experts, n MoE layers.

OffloadDecodeGraph stops the device at every MoE router: the host reads the ids back, decides,
issues copies and launches the next segment, and the GPU idles for that round trip even when
every expert is resident (~0.14 ms a layer on the H100, most of what ondemand loses at 75% cache).
Here the host leaves the loop unless a copy is needed:
  device  the step as one graph; after each MoE router an `expert_gate` kernel (kernels/offload.cu)
          logs the ids to page-locked host memory, reads each expert's slot from the host-held map
          (pool.host_map) and polls the missing ones until their copies publish them; the MoE
          kernels then read the slots it wrote into the device table.
  host    launches the graph, then follows it layer by layer: waits for the layer's log entry,
          runs `runtime.demand(layer, ids, wait=False)` (copies of the misses; the copy engine
          publishes each slot when its bytes land) and `end_layer`.
So a layer whose experts are resident runs at once; a layer that misses waits on the device for
exactly its copies, which the host issues as soon as it sees the routing.

Evictions without fences: the device may be layers ahead of the host (a gate whose experts are
resident passes at once), so any victim may be an expert of a layer the device has reached: a
prefetch's, and a demand load's too (a prefetch evicted an expert after its gate had passed, and
the host's demand of that layer copies it again). The victim's entry is cleared at once (and the
pool forgets it: a later assign of the slot must not clear the entry again, which by then may
name the expert's new slot, published by its copy before the host polled it), and the copy waits
on the copy stream behind `slot_guard` while the victim's layer holds a claim (kernels/offload.cu
explains the claim). So every policy runs here; pre-gate predictions computed on the device
(predict_ahead) reach the host through the same log row as the ids.
tests/test_offload_runahead_map.py simulates this protocol (device, copy stream, guards) on the CPU.

Trace replay: route_hook is asked for every MoE layer's ids / weights before the step; they go to
the device as the step's plan and the gates substitute them for the router's (the router still
runs: its cost is real). The runtime learns them through the log, as it would the router's.
Stall: the gates' polling time (device globaltimer) summed in a host-mapped counter.
Timelines: not recorded here (OffloadDecodeGraph records them).
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import ConfigError, EfError
from . import gpu_ops as ops
from .gpu_kernels import addr, cupy
from .gpu_offload_decode import OffloadDecodeGraph


class RunaheadDecodeGraph(OffloadDecodeGraph):
    """Greedy decode of `model` (cupy backend) whose routed experts live in `runtime.pool`, with
    residency checked on the device (module docstring)."""

    def __init__(self, model, runtime, cache, route_hook=None, predict_ahead: int | None = None,
                 timeout_s: float = 20.0):
        if not hasattr(runtime.engine, "fence"):
            raise ConfigError("run-ahead decode needs a CudaEngine (copies on their own stream)")
        super().__init__(model, runtime, cache, route_hook=route_hook, predict_ahead=predict_ahead)
        import cupyx
        A, n, E = self.cfg.top_k, len(self.moe), self.cfg.n_experts
        self.timeout_s = float(timeout_s)
        ops.load_offload_kernels()
        runtime.pool.map_to_host()
        self.log = cupyx.empty_pinned((n, A + 1 + self.ahead * E), dtype=np.int32)  # [ids | pos + 1 | logits]
        self.log[...] = -1
        self.stall_ns = cupyx.empty_pinned((1,), dtype=np.uint64)
        self.stall_ns[0] = 0
        self.stall_seen = 0
        self.next_pos: int | None = None             # host mirror of the device's pos
        if route_hook is not None:                   # the step's plan: [n, A] ids and weights
            self.plan_ids = cupy.zeros((n, A), dtype=cupy.int32)
            self.plan_w = cupy.zeros((n, A), dtype=cupy.float32)
            self.plan_up = [(cupyx.empty_pinned((n, A), dtype=np.int32),
                             cupyx.empty_pinned((n, A), dtype=np.float32)) for _ in range(2)]
            self.plan_k = 0

    def _segments(self) -> list:
        segs = super()._segments()
        for l, calls in segs:
            calls.append((lambda l=l: self._gate(l)) if l is not None else
                         (lambda: ops.step_done(self.pool.progress)))
        return segs

    def _n_pred(self, i: int) -> int:
        """Later MoE layers whose router logits MoE layer index i's segment predicts."""
        return min(self.ahead, len(self.moe) - 1 - i)

    def _gate(self, l: int) -> None:
        i, pool, A = self.moe_index[l], self.pool, self.cfg.top_k
        forced = (self.plan_ids[i], self.plan_w[i]) if self.route_hook is not None else None
        n = self._n_pred(i) * self.cfg.n_experts
        ops.expert_gate(self.ids, self.rw, forced, pool.host_map_addr(l), addr(pool.table) + l * pool.E * 4,
                        self.log[i].ctypes.data, self.pos, self.stall_ns.ctypes.data, pool.err, A,
                        self.timeout_s, pool.progress, l, self.plog if n else None, n)

    # ---- the host side: following the device ---------------------------------------------------
    def start(self, token: int, pos: int) -> None:
        super().start(token, pos)
        self.next_pos = int(pos)

    def _plan_route(self) -> None:
        """Ask route_hook for every MoE layer's ids / weights of this step; upload them (async on
        the graph's stream; two staging buffers, so the previous step's upload is never rewritten
        while it may still be reading)."""
        A = self.cfg.top_k
        ids_up, w_up = self.plan_up[self.plan_k]
        self.plan_k ^= 1
        zi, zw = np.zeros((1, A), np.int32), np.zeros((1, A), np.float32)
        for i, l in enumerate(self.moe):
            ids, w = self.route_hook(l, None, zi, zw)
            ids, w = np.asarray(ids, dtype=np.int32).reshape(-1), np.asarray(w, dtype=np.float32).reshape(-1)
            if ids.size != A or w.size != A:
                raise ConfigError(f"route_hook must return {A} ids and weights for layer {l}")
            ids_up[i], w_up[i] = ids, w
        rt, s = cupy.cuda.runtime, self.stream.ptr
        rt.memcpyAsync(self.plan_ids.data.ptr, ids_up.ctypes.data, ids_up.nbytes, 1, s)
        rt.memcpyAsync(self.plan_w.data.ptr, w_up.ctypes.data, w_up.nbytes, 1, s)

    def _follow(self, l: int, seq: int) -> None:
        """Wait for layer l's gate to log its ids (the device is there), then serve its misses."""
        h, A = self.host, self.cfg.top_k
        row = self.log[self.moe_index[l]]
        t0 = time.perf_counter()
        spins = 0
        while row[A] != seq:
            spins += 1
            if spins % 4096 == 0 and time.perf_counter() - t0 > self.timeout_s:
                self.pool.check()
                raise EfError(f"run-ahead decode: layer {l}'s gate did not report within {self.timeout_s} s")
        ids = np.array(row[:A]).reshape(1, A)
        n = self._n_pred(self.moe_index[l])
        pred = row[A + 1:A + 1 + n * self.cfg.n_experts].view(np.float32).reshape(n, -1).astype(np.float64) if n else None
        t1 = time.perf_counter()
        self.rt.demand(l, ids, wait=False)
        first = self.rt.first_issue_t
        if first is not None:
            h["to_first_copy_s"] += first - t1
            h["copy_layers"] += 1
        self.rt.end_layer(l, pregate=pred)
        if self.route_log is not None:
            self.route_log.append(ids.reshape(-1).copy())
        h["router_sync_s"] += t1 - t0
        h["runtime_s"] += time.perf_counter() - t1

    def _settle_stall(self) -> None:
        """Gate stall measured so far -> stats (the last layers' may land in the next step's)."""
        now = int(self.stall_ns[0])
        self.rt.stats.stall_s += (now - self.stall_seen) / 1e9
        self.stall_seen = now

    def _run(self, launch) -> None:
        """One step: launch(k) queues segment k (eagerly, or the whole graph at k == 0); the host
        follows each MoE layer once its segment is queued."""
        if self.next_pos is None:
            raise ConfigError("run-ahead decode: call start(token, pos) first")
        seq = self.next_pos + 1
        self.rt.begin_step(np.zeros(1, dtype=np.int64))
        self.log[:, self.cfg.top_k] = -1              # sequence numbers: an undone (or rewound) step
                                                      # at this position logged the same ones
        if self.route_hook is not None:
            self._plan_route()
        for k, (l, _) in enumerate(self.segs):
            t0 = time.perf_counter()
            with self.stream:
                launch(k)
            self.host["launch_s"] += time.perf_counter() - t0
            if l is not None:        # not on the graph's stream: whatever the host store or runtime
                self._follow(l, seq)  # queues must not wait behind a gate that waits for the host
        self._settle_stall()
        self.rt.end_step()
        self.host["steps"] += 1
        self.next_pos += 1

    # ---- running -------------------------------------------------------------------------------
    def capture(self) -> None:
        """Record the step as one graph (after one eager warm-up step, then undone: call start()
        first, as generate does)."""
        cupy.cuda.Device().synchronize()
        tok, pos, next_pos = self.tok.copy(), self.pos.copy(), self.next_pos
        self._run(self._eager)
        with self.stream:
            self.tok[...] = tok
            self.pos[...] = pos
            self.stream.synchronize()
            self.rt.settled()
            self.stream.begin_capture()
            try:
                for k in range(len(self.segs)):
                    self._eager(k)
            finally:
                graph = self.stream.end_capture()
        self.stream.synchronize()
        self.next_pos = next_pos
        self.graphs = [graph]
        self.pool.check()
        self.reset_host()

    def step(self) -> None:
        """One greedy step: the graph, with the host following it (does not wait at the end)."""
        if self.graphs is None:
            self.capture()
        g = self.graphs[0]
        self._run(lambda k: g.launch(self.stream) if k == 0 else None)

    def finish(self) -> None:
        """Wait for the device; every gate's stall counted, a failed gate raised."""
        self.stream.synchronize()
        self.rt.settled()
        self._settle_stall()
        self.pool.check()
