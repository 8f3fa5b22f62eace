"""Tiny random Hugging Face checkpoints of every supported family, built at test time.

Sizes are chosen so every code path runs (GQA, several experts, shared experts, dense leading
layers, MLA with and without q low rank) while a forward pass takes milliseconds.
"""
from __future__ import annotations

from pathlib import Path

BASE = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False)


def configs() -> dict:
    """family name -> (transformers config class name, model class name, kwargs)."""
    return {
        "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                    dict(BASE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                      dict(BASE, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                           num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                           mlp_only_layers=[1], use_sliding_window=False)),
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                      dict(BASE, head_dim=32, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                           num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                           use_sliding_window=False)),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
                  dict(BASE, intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
        "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                        dict(BASE, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24,
                             n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1,
                             q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                             v_head_dim=16, topk_method="greedy", routed_scaling_factor=1.0, norm_topk_prob=False)),
        # the grouped variant of DeepSeek routing and q low rank
        "deepseek_v2_grouped": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                                dict(BASE, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=24,
                                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                     first_k_dense_replace=0, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                                     qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy",
                                     n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False)),
    }


def build(name: str, out: Path, *, seed: int = 0, dtype: str = "float32", max_shard_size=None) -> Path:
    """save_pretrained a tiny random model of `name` into `out` and return the folder."""
    import torch
    import transformers

    cfg_cls, model_cls, kw = configs()[name]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg).eval()
    # Random init leaves norms at 1 and biases at 0; perturb them so mistakes there show.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate" in pname and p.shape[0] <= 16:
                p.mul_(8.0)   # sharper routers, so routing differences are not ties
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    return Path(out)


def load_reference(folder: Path):
    """The transformers model saved in `folder`, float32, eval mode (the test reference)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
