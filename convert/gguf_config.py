"""GGUF metadata -> ModelConfig, for each GGUF architecture we read.

llama.cpp writes hyper-parameters as "{arch}.{key}"; which of our flags a model needs follows
partly from metadata and partly from which tensors exist (biases, q/k norms, MoE layers), the
same way llama.cpp itself decides. Each architecture is a small function over the same helpers.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from efengine.config import ModelConfig
from efengine.errors import CheckpointError

from .gguf_reader import GgufFile

# GGUF architecture -> (our family name, config function); "llama" with experts is Mixtral
ARCHES: dict[str, tuple[str, Callable]] = {}


def _scalar(g: GgufFile, key: str, default=None):
    """Per-layer arrays (some GGUFs store head counts per layer) must be uniform for us."""
    v = g.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise CheckpointError(f"{g.path}: {key} varies per layer ({sorted(set(v))}); not supported")
        v = v[0]
    return v


def _f32(v) -> float:
    """GGUF stores float32: 1e-5 arrives as 9.99999974e-06; keep the value the author wrote."""
    return float(str(np.float32(v)))


def _rope_scaling(g: GgufFile) -> dict | None:
    kind = g.get(".rope.scaling.type", "none")
    if kind in ("none", None):
        if g.has("rope_freqs.weight"):
            raise CheckpointError(f"{g.path}: rope_freqs.weight (Llama-3.1 style rope scaling) is not supported")
        return None
    factor = float(g.need(".rope.scaling.factor"))
    orig = g.get(".rope.scaling.original_context_length")
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        d = {"rope_type": "yarn", "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0}
        if orig:
            d["original_max_position_embeddings"] = int(orig)
        mult = g.get(".rope.scaling.yarn_log_multiplier")
        if mult:   # llama.cpp stores 0.1 * mscale_all_dim (DeepSeek); HF keeps mscale and mscale_all_dim
            d["mscale"] = d["mscale_all_dim"] = float(mult) / 0.1
        return d
    raise CheckpointError(f"{g.path}: rope scaling type {kind!r} is not supported (linear, yarn are)")


def _common(g: GgufFile, arch: str) -> dict:
    d = int(g.need(".embedding_length"))
    h = int(_scalar(g, ".attention.head_count"))
    vocab = g.get(".vocab_size") or len(g.get("tokenizer.ggml.tokens") or []) or g.tensor("token_embd.weight").shape[0]
    return dict(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=d,
        n_layers=int(g.need(".block_count")),
        n_heads=h,
        n_kv_heads=int(_scalar(g, ".attention.head_count_kv", h)),
        head_dim=int(g.get(".attention.key_length") or d // h),
        intermediate_size=int(_scalar(g, ".feed_forward_length", 0) or 0),
        rms_norm_eps=_f32(g.get(".attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(g.get(".rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(g),
        max_position=int(g.get(".context_length", 4096)),
        tie_embeddings=not g.has("output.weight"),
        qkv_bias=g.has("blk.0.attn_q.bias"),
    )


def _moe_layers(g: GgufFile, n_layers: int) -> tuple:
    return tuple(l for l in range(n_layers) if g.has(f"blk.{l}.ffn_gate_inp.weight"))


def _experts(g: GgufFile, d: dict, width_key: str, norm_default: bool) -> dict:
    d.update(n_experts=int(g.need(".expert_count")), top_k=int(g.need(".expert_used_count")),
             moe_intermediate_size=int(g.get(width_key) or d["intermediate_size"]),
             moe_layers=_moe_layers(g, d["n_layers"]),
             norm_topk_prob=bool(g.get(".expert_weights_norm", norm_default)))
    gating = g.get(".expert_gating_func")
    if gating not in (None, 1):   # llama.cpp: 1 softmax, 2 sigmoid
        raise CheckpointError(f"{g.path}: expert gating function {gating} is not supported (softmax is)")
    return d


def _llama(g: GgufFile) -> dict:
    d = _common(g, "llama")
    if int(g.get(".expert_count", 0) or 0) > 0:   # Mixtral
        d["arch"] = "mixtral"
        _experts(g, d, ".expert_feed_forward_length", True)
        d.update(norm_topk_prob=True, intermediate_size=0)
    return d


def _qwen2moe(g: GgufFile) -> dict:
    d = _experts(g, _common(g, "qwen2_moe"), ".expert_feed_forward_length", False)
    shared = int(g.get(".expert_shared_feed_forward_length", 0) or 0)
    if shared == 0 and g.has(f"blk.{d['moe_layers'][0]}.ffn_gate_shexp.weight"):
        shared = g.tensor(f"blk.{d['moe_layers'][0]}.ffn_gate_shexp.weight").shape[0]
    d.update(n_shared_experts=1 if shared else 0, shared_intermediate_size=shared,
             shared_expert_gate=g.has(f"blk.{d['moe_layers'][0]}.ffn_gate_inp_shexp.weight"))
    return d


def _qwen3moe(g: GgufFile) -> dict:
    d = _experts(g, _common(g, "qwen3_moe"), ".expert_feed_forward_length", True)
    d.update(qk_norm="head")
    return d


def _olmoe(g: GgufFile) -> dict:
    d = _experts(g, _common(g, "olmoe"), ".expert_feed_forward_length", False)
    d.update(qk_norm="full", intermediate_size=0)
    return d


def _deepseek2(g: GgufFile) -> dict:
    d = _common(g, "deepseek_v2")
    rope = int(g.need(".rope.dimension_count"))
    # newer llama.cpp writes the absorbed-MLA sizes as key_length and the real ones as *_mla
    key = int(g.get(".attention.key_length_mla") or g.need(".attention.key_length"))
    value = int(g.get(".attention.value_length_mla") or g.need(".attention.value_length"))
    kv_lora = int(g.need(".attention.kv_lora_rank"))
    if not g.has("blk.0.attn_kv_b.weight"):
        raise CheckpointError(f"{g.path}: this DeepSeek GGUF stores attn_k_b/attn_v_b without attn_kv_b; "
                              "convert it from the Hugging Face checkpoint instead")
    _experts(g, d, ".expert_feed_forward_length", False)
    first_dense = int(g.get(".leading_dense_block_count", 0) or 0)
    groups, used = int(g.get(".expert_group_count", 1) or 1), int(g.get(".expert_group_used_count", 1) or 1)
    n_shared = int(g.get(".expert_shared_count", 0) or 0)
    d.update(attention="mla", q_lora_rank=int(g.get(".attention.q_lora_rank", 0) or 0), kv_lora_rank=kv_lora,
             qk_nope_head_dim=key - rope, qk_rope_head_dim=rope, v_head_dim=value,
             head_dim=key, moe_layers=tuple(l for l in d["moe_layers"] if l >= first_dense),
             topk_method="group_limited_greedy" if groups > 1 else "greedy", n_group=groups, topk_group=used,
             routed_scaling_factor=float(g.get(".expert_weights_scale", 1.0) or 1.0),
             n_shared_experts=n_shared, shared_intermediate_size=n_shared * d["moe_intermediate_size"])
    return d


ARCHES.update({"llama": ("llama", _llama), "qwen2moe": ("qwen2_moe", _qwen2moe), "qwen3moe": ("qwen3_moe", _qwen3moe),
               "olmoe": ("olmoe", _olmoe), "deepseek2": ("deepseek_v2", _deepseek2)})


def gguf_config(g: GgufFile) -> ModelConfig:
    """The ModelConfig of a GGUF file; CheckpointError for architectures we do not run."""
    entry = ARCHES.get(g.arch)
    if entry is None:
        raise CheckpointError(f"{g.path}: GGUF architecture {g.arch!r} is not supported; "
                              f"supported: {', '.join(sorted(ARCHES))}")
    try:
        kw = entry[1](g)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{g.path}: malformed GGUF metadata ({e})") from None
    return ModelConfig.from_dict(kw, source=str(g.path))
