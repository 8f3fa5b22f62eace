"""Named shapes of real MoE models, as the HF config.json they ship with (hyper-parameters only).

`efconvert --random SHAPE` writes a .ef of one of these with random weights, so offload benchmarks
run at full size without downloading anything. The dicts go through the same families as a real
checkpoint's config.json, so a shape is exactly what converting the real model would give.
"""
from __future__ import annotations

import copy

import numpy as np

import efmodels
from efengine.config import ModelConfig
from efengine.errors import ConfigError

from .hf import model_config

SHAPES: dict[str, dict] = {
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "qwen1.5-moe-a2.7b": dict(
        architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, hidden_size=2048, intermediate_size=5632,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=16, num_key_value_heads=16, num_experts=60, num_experts_per_tok=4,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1,
        moe_layer_freq=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=False, scoring_func="softmax", rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        max_position_embeddings=163840, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], attention_bias=False, rms_norm_eps=1e-6, rope_theta=1e6,
        max_position_embeddings=40960, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645),
    "olmoe-1b-7b": dict(
        architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=None, eos_token_id=50279),
}


def hf_config(name: str, layers: int | None = None) -> dict:
    """The config.json dict of a named shape, optionally truncated to `layers` layers."""
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known: {', '.join(SHAPES)} (see efconvert --list-shapes)")
    c = copy.deepcopy(SHAPES[name])
    if layers is not None:
        if layers < 1:
            raise ConfigError(f"--layers must be at least 1, got {layers}")
        c["num_hidden_layers"] = min(int(layers), c["num_hidden_layers"])
    return c


def shape_config(name: str, layers: int | None = None) -> tuple[efmodels.Family, ModelConfig, dict]:
    """Family, normalized config and HF config dict of a named shape."""
    c = hf_config(name, layers)
    family, cfg = model_config(c, f"shape {name}")
    return family, cfg, c


def n_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameter counts, routed experts included."""
    dense = sum(int(np.prod(s)) for _, s, _ in efmodels.expected_tensors(cfg))
    one = sum(int(np.prod(s)) for s in efmodels.expert_shapes(cfg).values())
    n_moe = len(cfg.moe_layers)
    return dense + n_moe * cfg.n_experts * one, dense + n_moe * cfg.top_k * one


def describe() -> list[str]:
    """One line per shape for --list-shapes."""
    lines = []
    for name in SHAPES:
        _, cfg, c = shape_config(name)
        total, active = n_params(cfg)
        lines.append(f"{name:20s} {c['architectures'][0]:24s} {cfg.n_layers:3d} layers  {cfg.n_experts:4d} experts "
                     f"top-{cfg.top_k}  {total / 1e9:6.2f}B params ({active / 1e9:.2f}B active)")
    return lines
