"""Resident batch-1 decode as one CUDA graph: no host work between tokens.

Legend: D hidden, V vocab, H / G query / kv heads, d head dim, P cache positions, E experts,
A active experts, I expert width, F shared-expert (or dense FFN) width.

DecodeGraph(model, pool, cache) records one greedy decode step of a cupy-backend Model whose
routed experts all sit in `pool` (an ExpertPool: slot table on the device): embed the token in
`tok`, every layer, final norm, lm_head, argmax -> `tok`, position `pos` += 1. Everything a
step reads is at a fixed device address, so the captured graph replays at any position; the
routers' choices reach the MoE kernels through device memory only. Per layer (MoE, quantized):
  rows_prep(residual update + attn norm + xprep) | q,k,v GEMV (one launch) |
  rope + KV store + attention (clusters of blocks, merged in-kernel, writes o's xprep) | o GEMV (+= residual) |
  rows_prep(ffn norm) | router GEMV + top-k | gate+up+SiLU (A experts) | down (A buffers)
and the next rows_prep adds the A expert buffers in rank order (the numpy model's order).
Supported: GQA without qk-norm (Mixtral, Qwen1.5/2-MoE with bias and shared experts, dense
layers, Llama). Other configs raise ConfigError; use Model.forward for them.
act ("f16" | "int8", default: the backend's): the format of every activation prep, so of how the
kernels of quantized matrices take x (fp16 pairs or int8 codes with dp4a; act_int8.py).
pdl (default: where the GPU and driver take it): the step's kernels are launched as programmatic
dependent launches, so each is scheduled while the one before it runs (gpu_kernels.py); the
kernels wait for their predecessor before touching memory, so the results are the same bits.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from . import gpu_ops as ops
from .act_int8 import check_act
from . import gpu_kernels
from .gpu_kernels import addr, cupy
from .gpu_weights import ExpertPool, GpuWeight


def _dense_src() -> ops.Experts:
    return ops.Experts(base=0)


class DecodeGraph:
    """One greedy decode step of `model` (backend cupy) as a replayable CUDA graph."""

    def __init__(self, model, pool: ExpertPool | None, cache, act: str | None = None, pdl: bool | None = None):
        cfg = self.cfg = model.cfg
        self.act = check_act(act if act is not None else getattr(model.backend, "act", "f16"))
        self.pdl = gpu_kernels.pdl_supported() if pdl is None else bool(pdl)
        if model.backend.name != "cupy":
            raise ConfigError("DecodeGraph needs a model on the cupy backend")
        if cfg.attention != "gqa" or cfg.qk_norm:
            raise ConfigError("DecodeGraph supports GQA attention without qk-norm; use Model.forward")
        if cfg.is_moe and pool is None:
            raise ConfigError("DecodeGraph needs an ExpertPool holding the routed experts")
        self.model, self.pool, self.cache = model, pool, cache
        D, H, G, d = cfg.hidden_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.P = P = cache.max_tokens
        f32 = cupy.float32
        self.tok = cupy.zeros(1, dtype=cupy.int32)
        self.pos = cupy.zeros(1, dtype=cupy.int32)
        self.hist = cupy.zeros(P + 1, dtype=cupy.int32)
        self.hb = [cupy.zeros((1, D), dtype=f32), cupy.zeros((1, D), dtype=f32)]   # residual, ping-pong
        self.x32 = cupy.zeros((1, D), dtype=f32)
        self.q = cupy.zeros((1, H * d), dtype=f32)
        self.k = cupy.zeros((1, G * d), dtype=f32)
        self.v = cupy.zeros((1, G * d), dtype=f32)
        self.o = cupy.zeros((1, H, d), dtype=f32)
        self.logits = cupy.zeros((1, cfg.vocab_size), dtype=f32)
        cos, sin = model.rope.cos_sin(np.arange(P))
        self.cos, self.sin = cupy.asarray(cos), cupy.asarray(sin)
        self.attw = ops.AttnWork(1, H, G, d, max(1, ops.cdiv(P, 64)))
        self._plan()
        self.graph = None
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.skip: set = set()      # kernel classes left out of a step (timing breakdowns only)

    # ---- planning: buffers and descriptors fixed before capture ----------------------------
    def _plan(self) -> None:
        cfg, m = self.cfg, self.model
        D, A = cfg.hidden_size, cfg.top_k
        mats = [m.lm_head]
        self.layers = []
        for l, w in enumerate(m.layers):
            L = {"w": w, "moe": cfg.is_moe_layer(l)}
            qkv = [w["attn_q"], w["attn_k"], w["attn_v"]]
            bias = [w.get(n + ".bias") for n in ("attn_q", "attn_k", "attn_v")]
            L["qkv"] = ops.gemv_desc([(W, y, b, False) for W, y, b in zip(qkv, (self.q, self.k, self.v), bias)])
            L["qkv_w"] = qkv
            L["o_desc"] = [ops.gemv_desc([(w["attn_output"], h, w.get("attn_output.bias"), True)]) for h in self.hb]
            mats += qkv
            if L["moe"]:
                mats.append(w["ffn_gate_inp"])
                if cfg.n_shared_experts:
                    mats += [w["ffn_gate_shexp"], w["ffn_up_shexp"]]
            else:
                mats += [w["ffn_gate"], w["ffn_up"]]
            self.layers.append(L)
        for W in mats:
            if not isinstance(W, GpuWeight) or W.K != D:
                raise ConfigError("DecodeGraph needs GpuWeight matrices (cupy backend) of width D")
        KXD = max([ops.prep_len(D)] + [W.Kp for W in mats if W.quantized])
        if self.pool is not None:
            KXD = max(KXD, self.pool.layout.parts["gate"].Kp)
        self.prepD = ops.XPrep(1, D, KXD, self.act)
        Wo = m.layers[0]["attn_output"]
        self.prepO = ops.XPrep(1, Wo.K, ops.prep_len(Wo.K, *[L["w"]["attn_output"] for L in self.layers]), self.act)
        self.lm_desc = ops.gemv_desc([(m.lm_head, self.logits, None, False)])
        if self.pool is not None:
            lay = self.pool.layout
            self.gate, self.up, self.down = (ops.Mat.of_part(lay.parts[p]) for p in ("gate", "up", "down"))
            I = lay.I
            self.ids = cupy.zeros((1, A), dtype=cupy.int32)
            self.rw = cupy.zeros((1, A), dtype=cupy.float32)
            self.hbuf = cupy.zeros((A, I), dtype=cupy.float32)
            self.ybuf = cupy.zeros((A, D), dtype=cupy.float32)
            quant_down = self.down.qtype in ("q4", "q8")
            self.hprep = ops.XPrep(A, I, max(self.down.Kp, ops.cdiv(I, 32) * 32), self.act) if quant_down else None
        F = self._ffn_width()
        if F:
            self.fbuf = cupy.zeros((1, F), dtype=cupy.float32)
            self.fy = cupy.zeros((1, D), dtype=cupy.float32)
            self.sg = cupy.zeros(1, dtype=cupy.float32)
            downs = [L["w"].get("ffn_down_shexp", L["w"].get("ffn_down")) for L in self.layers]
            kx = max([ops.cdiv(F, 32) * 32] + [W.Kp for W in downs if W is not None and W.quantized])
            self.fprep = ops.XPrep(1, F, kx, self.act)

    def _ffn_width(self) -> int:
        widths = set()
        for L in self.layers:
            w = L["w"]
            g = w.get("ffn_gate_shexp") if L["moe"] else w.get("ffn_gate")
            if g is not None:
                widths.add(g.N)
        if len(widths) > 1:
            raise ConfigError("DecodeGraph: dense FFN / shared expert widths differ between layers")
        return widths.pop() if widths else 0

    # ---- one step ------------------------------------------------------------------------------
    def _dense_ffn(self, gate: GpuWeight, up: GpuWeight, down: GpuWeight) -> None:
        """fy = down(silu(gate x) * up x) of the current normed x (dense weights)."""
        if "gemv" in self.skip:
            return
        ops.moe_gateup(_dense_src(), ops.Mat.of_weight(gate), ops.Mat.of_weight(up), 1, 1, self.x32, self.prepD,
                       self.fbuf, self.fprep if down.quantized else None)
        ops.moe_down(_dense_src(), ops.Mat.of_weight(down), 1, self.fbuf, self.fprep, None, self.fy)

    def _step(self) -> None:
        with gpu_kernels.dependent_launches(self.pdl):
            self._layers()

    def _layers(self) -> None:
        m = self.model
        ops.embed(self.tok, m.tok_embd, out=self.hb[0])
        self.cur = 0
        pend = {}
        for l, L in enumerate(self.layers):
            self._attn(l, pend)
            pend = self._moe(l, L["w"]) if L["moe"] else self._dense(L["w"])
        self._norm(m.out_norm, pend)
        self._gemv(self.lm_desc, [m.lm_head], self.x32, self.prepD)
        ops.argmax_advance(self.logits, self.cfg.vocab_size, self.tok, self.pos, self.hist)

    def _attn(self, l: int, pend: dict) -> None:
        """Layer l up to its FFN norm: residual update by `pend` (the previous FFN's outputs) and
        attention norm, q/k/v, rope + KV store + attention (one launch: gpu_ops.attention new_kv),
        o projection added to the residual, FFN norm."""
        cfg, m, L = self.cfg, self.model, self.layers[l]
        H, d, w = cfg.n_heads, cfg.head_dim, L["w"]
        self._norm(w["attn_norm"], pend)
        self._gemv(L["qkv"], L["qkv_w"], self.x32, self.prepD)
        Wo = w["attn_output"]
        fuse = Wo.quantized and d % 32 == 0          # the attention kernel writes o's xprep
        ops.attention(self.q.reshape(1, H, d), self.cache.k[l], self.cache.v[l], self.pos, m.scale,
                      out=self.o, work=self.attw, S=self.P, prep=self.prepO if fuse else None,
                      new_kv=(self.k, self.v, self.cos, self.sin))
        o2 = self.o.reshape(1, H * d)
        if Wo.quantized and not fuse:
            ops.rows_prep(o2, H * d, prep=self.prepO)
        self._gemv(L["o_desc"][self.cur], [Wo], o2, self.prepO if Wo.quantized else None)
        self._norm(w["ffn_norm"], {})

    def _gemv(self, desc, weights, x32, prep) -> None:
        if "gemv" not in self.skip:
            ops.gemv_launch(desc, weights, 1, x32, prep)

    def _norm(self, nw, pend: dict) -> None:
        """Residual update by the pending FFN outputs (into the other buffer), RMSNorm, xprep."""
        cfg, h = self.cfg, self.hb[self.cur]
        if pend:
            ops.rows_prep(h, cfg.hidden_size, nw=nw, eps=cfg.rms_norm_eps, x32=self.x32, prep=self.prepD,
                          hout=self.hb[1 - self.cur], **pend)
            self.cur = 1 - self.cur
        else:
            ops.rows_prep(h, cfg.hidden_size, nw=nw, eps=cfg.rms_norm_eps, x32=self.x32, prep=self.prepD)

    def _dense(self, w) -> dict:
        self._dense_ffn(w["ffn_gate"], w["ffn_up"], w["ffn_down"])
        return {"ybuf": self.fy, "A": 1}

    def _moe(self, l: int, w) -> dict:
        self._route(l)
        return self._experts(l)

    def _route(self, l: int) -> None:
        """Router product and top-k of layer l on the device: writes ids, rw (and sg, the shared gate)."""
        w = self.layers[l]["w"]
        gate_sh = w.get("ffn_gate_inp_shexp")
        ops.router(w["ffn_gate_inp"], 1, self.x32, self.prepD if w["ffn_gate_inp"].quantized else None, self.cfg,
                   self.ids, self.rw, extra=gate_sh, extra_out=self.sg if gate_sh is not None else None)

    def _experts(self, l: int) -> dict:
        """Routed experts of layer l through the slot table, then the shared expert; returns what the
        next norm must add (the per-rank outputs, in rank order, and the shared expert's)."""
        cfg, pool, A, w = self.cfg, self.pool, self.cfg.top_k, self.layers[l]["w"]
        src = ops.Experts(base=pool.base, stride=pool.stride, ids=self.ids,
                          table=addr(pool.table) + l * pool.E * 4, E=pool.E, err=pool.err)
        if "moe" not in self.skip:
            ops.moe_gateup(src, self.gate, self.up, A, A, self.x32, self.prepD, self.hbuf, self.hprep)
            ops.moe_down(src, self.down, A, self.hbuf, self.hprep, self.rw, self.ybuf)
        pend = {"ybuf": self.ybuf, "A": A}
        if cfg.n_shared_experts:
            self._dense_ffn(w["ffn_gate_shexp"], w["ffn_up_shexp"], w["ffn_down_shexp"])
            pend["add2"] = self.fy
            if w.get("ffn_gate_inp_shexp") is not None:
                pend["add2_gate"] = self.sg
        return pend

    # ---- running -------------------------------------------------------------------------------
    def capture(self) -> None:
        """Record the step (after one eager warm-up step whose effects are undone)."""
        cupy.cuda.Device().synchronize()       # weights / cache written on other streams are done
        tok, pos = self.tok.copy(), self.pos.copy()
        with self.stream:
            self._step()
            self.tok[...] = tok
            self.pos[...] = pos
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self._step()
            finally:
                self.graph = self.stream.end_capture()
        self.stream.synchronize()

    def variant(self, skip: set):
        """A graph of the step without some kernel classes ("gemv": dense matrices, "moe": routed
        experts): wrong tokens, but the time the rest takes (bench breakdowns)."""
        self.skip = set(skip)
        try:
            with self.stream:
                self.stream.begin_capture()
                try:
                    self._step()
                finally:
                    g = self.stream.end_capture()
        finally:
            self.skip = set()
        return g

    def start(self, token: int, pos: int) -> None:
        """Next step embeds `token` at position `pos` (the cache must hold positions 0..pos-1)."""
        if not 0 <= pos < self.P:
            raise ConfigError(f"position {pos} outside the KV cache (0..{self.P - 1})")
        with self.stream:           # the graph's stream: ordered before the next replay
            self.tok.fill(int(token))
            self.pos.fill(int(pos))

    def replay(self, n: int = 1) -> None:
        """n greedy steps (graph replays) on the graph's stream; does not wait for them."""
        if self.graph is None:
            self.capture()
        for _ in range(n):
            self.graph.launch(self.stream)

    def step_eager(self) -> None:
        """One step launched kernel by kernel (same kernels, no graph): for tests."""
        with self.stream:
            self._step()

    def generate(self, token: int, n: int) -> list[int]:
        """Greedy tokens after `token` at position cache.pos; advances cache.pos by n."""
        p0 = self.cache.pos
        if p0 + n > self.P:
            raise ConfigError(f"{n} steps from position {p0} overflow the KV cache of {self.P}")
        self.start(token, p0)
        self.replay(n)
        self.stream.synchronize()
        self.cache.pos = p0 + n
        if self.pool is not None:
            self.pool.check()
        return [int(t) for t in cupy.asnumpy(self.hist[p0:p0 + n])]
