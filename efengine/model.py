"""One forward pass for every supported architecture, chosen by ModelConfig flags.

Legend: T tokens in a step, D hidden, V vocab, H query heads, G kv heads, d head dim,
S cached positions, E routed experts per layer, A active experts per token, L layers;
MLA: c kv_lora_rank, dn / dr / dv nope / rope / value head dims.

A layer is pre-norm attention then a pre-norm FFN, both residual:
    h = h + attn(rms_norm(h));  h = h + ffn(rms_norm(h))
attention: GQA (optional qkv bias; qk_norm "head" = RMSNorm per head, "full" = over the whole
projection, both before RoPE) or MLA (DeepSeek-V2). ffn: dense SwiGLU, or MoE (router, routed
experts through the ExpertProvider, optional shared experts with an optional sigmoid gate).
Prefill (T > 1) and decode (T == 1) run the same code. Everything is float32.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .config import ModelConfig
from .errors import ConfigError, EfError, FormatError
from .experts import ExpertProvider, ResidentExperts
from .ops import get_backend
from .rope import Rope, softmax_scale

# transformers builds DeepSeek's q_a_layernorm / kv_a_layernorm with the RMSNorm default eps,
# not config.rms_norm_eps.
MLA_NORM_EPS = 1e-6

OnLayer = Callable[[int, Any], None]
# route_hook(layer, router_logits [T, E], ids [T, A], weights [T, A]) -> (ids, weights): lets trace
# replay substitute recorded choices and the opt-in lossy route bias prefer resident experts.
RouteHook = Callable[[int, Any, Any, Any], tuple]


class KVCache:
    """Per-layer key and value arrays [max_tokens, G, dk] / [max_tokens, G, dv] on the device.

    MLA caches the expanded per-head keys (nope + rope) and values, G = H: exactly what
    attention reads, so decode equals a full recompute (a compressed-latent cache is a later
    optimization). `pos` is the number of positions filled.
    """

    def __init__(self, backend, n_layers: int, max_tokens: int, kv_heads: int, k_dim: int, v_dim: int):
        if max_tokens < 1:
            raise ConfigError(f"KV cache needs room for at least one token, got max_tokens={max_tokens}")
        xp = backend.xp
        self.max_tokens = int(max_tokens)
        self.k = [xp.zeros((max_tokens, kv_heads, k_dim), dtype=xp.float32) for _ in range(n_layers)]
        self.v = [xp.zeros((max_tokens, kv_heads, v_dim), dtype=xp.float32) for _ in range(n_layers)]
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v)

    def reset(self) -> None:
        self.pos = 0

    def truncate(self, n: int) -> None:
        """Forget every position from n on (e.g. to reuse a shared prompt prefix)."""
        if not 0 <= n <= self.pos:
            raise EfError(f"cannot truncate a KV cache of {self.pos} positions to {n}")
        self.pos = n

    def store(self, layer: int, pos0: int, k, v):
        """Write k [T,G,dk], v [T,G,dv] at positions pos0.. and return the views 0..pos0+T."""
        end = pos0 + k.shape[0]
        self.k[layer][pos0:end] = k
        self.v[layer][pos0:end] = v
        return self.k[layer][:end], self.v[layer][:end]


def _check_shapes(source, cfg: ModelConfig) -> None:
    """Stored shapes against the config, where the source records them (EfFile does), so a
    mismatch is one clear error rather than a reshape failure deep in a forward pass."""
    tensors = getattr(source, "tensors", None)
    if not isinstance(tensors, dict):
        return
    from efmodels import expected_tensors, expert_shapes
    where = getattr(source, "path", "weight source")
    for name, shape, _ in expected_tensors(cfg):
        t = tensors.get(name)
        if t is not None and tuple(t.shape) != tuple(shape):
            raise FormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, the config needs {tuple(shape)}")
    layout = getattr(source, "expert_layout", None) if cfg.is_moe else None
    for part, shape in (expert_shapes(cfg).items() if layout else ()):
        if tuple(layout[part].shape) != tuple(shape):
            raise FormatError(f"{where}: expert {part} has shape {tuple(layout[part].shape)}, the config needs {tuple(shape)}")


def _check_yield(layer: int, e: int, bounds: dict, done) -> None:
    if e not in bounds or e in done:
        raise EfError(f"expert provider yielded expert {e} of layer {layer} unexpectedly")


class Model:
    """Model(source, backend="numpy"|"cupy"|"auto", experts=None): weights from a weight source.

    `source` is an EfFile or any object with .config, .has, .load, .expert_weights (see
    notes/interfaces.md). `experts` is an ExpertProvider; None keeps every expert resident.
    """

    def __init__(self, source, backend="numpy", experts: ExpertProvider | None = None):
        self.source = source
        self.cfg: ModelConfig = source.config
        self.backend = b = get_backend(backend)
        self.xp = b.xp
        cfg = self.cfg
        if cfg.topk_method == "group_limited_greedy" and cfg.n_experts % cfg.n_group:
            raise ConfigError(f"config: {cfg.n_experts} experts do not split into n_group={cfg.n_group} groups")
        _check_shapes(source, cfg)
        self.rope = Rope(cfg)
        self.scale = softmax_scale(cfg)
        self.experts = experts if experts is not None else ResidentExperts(source, b)
        self.on_layer: OnLayer | None = None
        self.route_hook: RouteHook | None = None     # None: the router decides (lossless)
        self.tok_embd = self._w("token_embd.weight")
        self.out_norm = self._w("output_norm.weight")
        has_out = source.has("output.weight")
        if not has_out and not cfg.tie_embeddings:
            raise FormatError("weight source lacks 'output.weight' and the config does not tie embeddings")
        self.lm_head = self._w("output.weight") if has_out else self.tok_embd
        self.layers = [self._layer(l) for l in range(cfg.n_layers)]

    # ---- weights ------------------------------------------------------------------------------
    def _w(self, name: str):
        return self.backend.weight(self.source, name)

    def _opt(self, name: str):
        return self._w(name) if self.source.has(name) else None

    def _layer(self, l: int) -> dict:
        cfg, p = self.cfg, f"blk.{l}."
        names = ["attn_norm", "ffn_norm", "attn_output"]
        if cfg.attention == "mla":
            names += ["attn_kv_a_mqa", "attn_kv_a_norm", "attn_kv_b"]
            names += ["attn_q_a", "attn_q_a_norm", "attn_q_b"] if cfg.q_lora_rank else ["attn_q"]
        else:
            names += ["attn_q", "attn_k", "attn_v"]
            if cfg.qk_norm:
                names += ["attn_q_norm", "attn_k_norm"]
        if cfg.is_moe_layer(l):
            names.append("ffn_gate_inp")
            if cfg.n_shared_experts:
                names += ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"]
                if cfg.shared_expert_gate:
                    names.append("ffn_gate_inp_shexp")
        else:
            names += ["ffn_gate", "ffn_up", "ffn_down"]
        w = {n: self._w(p + n + ".weight") for n in names}
        if cfg.attention == "gqa" and cfg.qkv_bias:
            for n in ("attn_q", "attn_k", "attn_v"):
                w[n + ".bias"] = self._w(p + n + ".bias")
        w["attn_output.bias"] = self._opt(p + "attn_output.bias")   # Llama / OLMoE attention_bias
        return w

    # ---- public API ---------------------------------------------------------------------------
    def new_cache(self, max_tokens: int) -> KVCache:
        cfg = self.cfg
        if cfg.attention == "mla":
            return KVCache(self.backend, cfg.n_layers, max_tokens, cfg.n_heads, cfg.q_head_dim, cfg.v_head_dim)
        return KVCache(self.backend, cfg.n_layers, max_tokens, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)

    def forward(self, tokens, cache: KVCache, *, last_only: bool = False,
                on_layer: OnLayer | None = None) -> np.ndarray:
        """Logits float32 [T, V] (or [1, V] with last_only) for tokens [T]; appends T positions."""
        h = self.forward_hidden(tokens, cache, on_layer=on_layer)
        return self.logits(h[-1:] if last_only else h)

    def forward_hidden(self, tokens, cache: KVCache, *, on_layer: OnLayer | None = None):
        """Final hidden states [T, D] on the device, before the output norm; appends T positions.

        on_layer(layer, hidden [T, D]) (default: self.on_layer) sees the residual stream after
        each layer, e.g. for a predictor that applies later routers (router_logits) to it.
        """
        tokens = np.asarray(tokens).reshape(-1)
        T, pos0 = tokens.shape[0], cache.pos
        if T == 0:
            raise EfError("forward needs at least one token")
        if pos0 + T > cache.max_tokens:
            raise EfError(f"KV cache full: {pos0} + {T} tokens exceed its {cache.max_tokens} positions "
                          "(make a larger cache with new_cache(max_tokens))")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise EfError(f"token id outside the vocabulary 0..{self.cfg.vocab_size - 1}")
        hook = on_layer if on_layer is not None else self.on_layer
        b = self.backend
        positions = np.arange(pos0, pos0 + T, dtype=np.int64)
        cos, sin = (b.asarray(t) for t in self.rope.cos_sin(positions))
        self.experts.begin_step(positions)
        h = b.embed(b.asarray(tokens), self.tok_embd)
        for l, w in enumerate(self.layers):
            h = h + self._attention(l, w, b.rms_norm(h, w["attn_norm"], self.cfg.rms_norm_eps), cache, pos0, cos, sin)
            h = h + self.ffn(l, b.rms_norm(h, w["ffn_norm"], self.cfg.rms_norm_eps))
            if hook is not None:
                hook(l, h)
        self.experts.end_step()
        cache.pos = pos0 + T
        return h

    def logits(self, hidden) -> np.ndarray:
        """Host float32 logits [T, V] of final hidden states [T, D] (applies the output norm)."""
        b = self.backend
        return b.to_host(b.linear(b.rms_norm(hidden, self.out_norm, self.cfg.rms_norm_eps), self.lm_head)).astype(np.float32, copy=False)

    def ffn(self, layer: int, x):
        """The feed-forward block of `layer` (dense or MoE) on its normalized input x [T, D]."""
        w = self.layers[layer]
        return self._moe(layer, w, x) if self.cfg.is_moe_layer(layer) else self._ffn(w, x, "")

    def router_logits(self, layer: int, hidden):
        """Router logits [T, E] (device) of MoE layer `layer` applied to residual stream `hidden` [T, D]
        (through that layer's ffn_norm, as its router sees its input)."""
        if not self.cfg.is_moe_layer(layer):
            raise EfError(f"layer {layer} is not an MoE layer")
        b, w = self.backend, self.layers[layer]
        return b.linear(b.rms_norm(hidden, w["ffn_norm"], self.cfg.rms_norm_eps), w["ffn_gate_inp"])

    # ---- attention ----------------------------------------------------------------------------
    def _attention(self, l: int, w: dict, x, cache: KVCache, pos0: int, cos, sin):
        q, k, v = (self._qkv_mla if self.cfg.attention == "mla" else self._qkv_gqa)(w, x, cos, sin)
        k_all, v_all = cache.store(l, pos0, k, v)
        o = self.backend.attention(q, k_all, v_all, pos0, self.scale)       # [T, H, dv]
        out = self.backend.linear(o.reshape(o.shape[0], -1), w["attn_output"])
        return out if w["attn_output.bias"] is None else out + w["attn_output.bias"]

    def _mm_input(self, x):
        """x prepared once for the several matrices that read it (backend.mm_input, where the
        backend has one: the CuPy backend's fp16 rows of a prefill); pass it to linears only."""
        prep = getattr(self.backend, "mm_input", None)
        return x if prep is None else prep(x)

    def _qkv_gqa(self, w: dict, x, cos, sin):
        cfg, b, T = self.cfg, self.backend, x.shape[0]
        xm = self._mm_input(x)
        q, k, v = (b.linear(xm, w[n]) for n in ("attn_q", "attn_k", "attn_v"))
        if cfg.qkv_bias:
            q, k, v = q + w["attn_q.bias"], k + w["attn_k.bias"], v + w["attn_v.bias"]
        if cfg.qk_norm == "full":    # OLMoE: over the whole projection, before the head split
            q, k = b.rms_norm(q, w["attn_q_norm"], cfg.rms_norm_eps), b.rms_norm(k, w["attn_k_norm"], cfg.rms_norm_eps)
        q = q.reshape(T, cfg.n_heads, cfg.head_dim)
        k = k.reshape(T, cfg.n_kv_heads, cfg.head_dim)
        v = v.reshape(T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":    # Qwen3: per head
            q, k = b.rms_norm(q, w["attn_q_norm"], cfg.rms_norm_eps), b.rms_norm(k, w["attn_k_norm"], cfg.rms_norm_eps)
        return b.rope(q, cos, sin, False), b.rope(k, cos, sin, False), v

    def _qkv_mla(self, w: dict, x, cos, sin):
        cfg, b, xp, T = self.cfg, self.backend, self.xp, x.shape[0]
        H, dn, dr, dv, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        xm = self._mm_input(x)
        if cfg.q_lora_rank:
            q = b.linear(b.rms_norm(b.linear(xm, w["attn_q_a"]), w["attn_q_a_norm"], MLA_NORM_EPS), w["attn_q_b"])
        else:
            q = b.linear(xm, w["attn_q"])
        q = q.reshape(T, H, dn + dr)
        kv_a = b.linear(xm, w["attn_kv_a_mqa"])                               # [T, c + dr]
        latent = b.rms_norm(kv_a[:, :c], w["attn_kv_a_norm"], MLA_NORM_EPS)   # [T, c]
        k_pe = b.rope(kv_a[:, None, c:], cos, sin, True)                      # [T, 1, dr], shared by heads
        q_pe = b.rope(q[:, :, dn:], cos, sin, True)
        kv = b.linear(latent, w["attn_kv_b"]).reshape(T, H, dn + dv)
        q = xp.concatenate([q[:, :, :dn], q_pe], axis=-1)
        k = xp.concatenate([kv[:, :, :dn], xp.broadcast_to(k_pe, (T, H, dr))], axis=-1)
        return q, k, kv[:, :, dn:]

    # ---- feed-forward -------------------------------------------------------------------------
    def _ffn(self, w: dict, x, suffix: str):
        b, x = self.backend, self._mm_input(x)
        g, u = b.linear(x, w["ffn_gate" + suffix]), b.linear(x, w["ffn_up" + suffix])
        return b.linear(b.silu_mul(g, u), w["ffn_down" + suffix])

    def _moe(self, l: int, w: dict, x):
        """Routed experts (grouped by expert id, each into its own (token, rank) slots) + shared."""
        cfg, b, xp = self.cfg, self.backend, self.xp
        T, A, D = x.shape[0], cfg.top_k, x.shape[1]
        xm = self._mm_input(x)          # router, shared expert and grouped experts read it
        logits = b.linear(xm, w["ffn_gate_inp"])
        ids, weights = b.route(logits, cfg)
        if self.route_hook is not None:
            ids, weights = self.route_hook(l, logits, ids, weights)
        grouped = T >= getattr(b, "MOE_PREFILL_MIN_T", T + 1)
        y = self._moe_on_device(l, xm, ids) if grouped else None
        if y is not None:
            return self._moe_out(w, xm, y.reshape(T, A, D), weights)
        ids_h = np.asarray(b.to_host(ids), dtype=np.int32)                 # [T, A]
        flat = ids_h.reshape(-1)
        order = np.argsort(flat, kind="stable")                            # slots sorted by expert id
        experts, starts = np.unique(flat[order], return_index=True)
        bounds = dict(zip(experts.tolist(), zip(starts.tolist(), [*starts[1:].tolist(), flat.size])))
        if grouped and self._can_group(len(bounds)):
            y, done = self._moe_grouped(l, x, ids_h, bounds)
        else:
            y = xp.empty((T * A, D), dtype=xp.float32)
            done = set()
            for e, handle in self.experts.begin_layer(l, ids_h):
                _check_yield(l, e, bounds, done)
                s0, s1 = bounds[e]
                slots = b.asarray(order[s0:s1])
                if grouped:        # the grouped kernels on one expert: the same bits as all at once
                    y[slots] = b.moe_prefill(x[slots // A], np.full((s1 - s0, 1), e, np.int32), {e: handle})
                else:
                    y[slots] = b.expert_ffn(x[slots // A], handle)
                done.add(e)
        self.experts.end_layer(l)
        if len(done) != len(bounds):
            raise EfError(f"expert provider did not provide experts {sorted(set(bounds) - done)} of layer {l}")
        return self._moe_out(w, xm, y.reshape(T, A, D), weights)

    def _moe_on_device(self, l: int, x, ids):
        """A prefill whose experts are all resident, grouped on the device (backend.moe_prefill_device,
        x as _mm_input made it): y [T*A, D], or None where the backend or the provider cannot (then
        the host groups them)."""
        run = getattr(self.backend, "moe_prefill_device", None)
        ask = getattr(self.experts, "layer_handles", None)
        handles = ask(l) if run is not None and ask is not None else None
        y = run(x, ids, handles) if handles else None
        if y is not None:
            self.experts.end_layer(l)
        return y

    def _moe_out(self, w: dict, x, y, weights):
        """Routed outputs y [T, A, D] combined in rank order, plus the shared experts (x: the
        layer's input or its _mm_input; only linears read it)."""
        cfg, b = self.cfg, self.backend
        out = b.moe_combine(y, weights)
        if cfg.n_shared_experts:
            shared = self._ffn(w, x, "_shexp")
            if cfg.shared_expert_gate:
                shared = b.sigmoid(b.linear(x, w["ffn_gate_inp_shexp"])) * shared
            out = out + shared
        return out

    def _can_group(self, n: int) -> bool:
        """A provider that recycles an expert's slot once the model resumes it (defer_use: the
        offload runtime) must hold all n experts of the layer pinned at once to be grouped."""
        return not hasattr(self.experts, "defer_use") or getattr(self.experts, "n_slots", 0) >= n

    def _moe_grouped(self, l: int, x, ids_h: np.ndarray, bounds: dict):
        """Prefill: every handle of the layer first, then one backend call for all experts
        (backend.moe_prefill -> y [T*A, D] in (token, rank) slots). Slots of a defer_use provider
        stay pinned until the launches are queued, then are fenced (as OffloadDecodeGraph does)."""
        prov, handles = self.experts, {}
        defer = hasattr(prov, "defer_use")
        if defer:
            prov.defer_use = []
        try:
            for e, handle in prov.begin_layer(l, ids_h):
                _check_yield(l, e, bounds, handles)
                handles[e] = handle
            missing = sorted(set(bounds) - set(handles))
            if missing:
                raise EfError(f"expert provider did not provide experts {missing} of layer {l}")
            y = self.backend.moe_prefill(x, ids_h, handles)
        finally:
            if defer:
                slots, prov.defer_use = prov.defer_use, None
                fence = getattr(getattr(prov, "engine", None), "fence", None)
                for s in slots if fence is not None else ():
                    fence(s)
        return y, set(handles)
