"""Qwen3-MoE: per-head RMSNorm on q and k, no shared expert, top-k renormalized by default."""
from .base import LLAMA_NAMES, MLP_EXPERTS, Family, common_hf, first, sparse_layers


def _config(c: dict) -> dict:
    d = common_hf(c, "qwen3_moe")
    d.update(qkv_bias=bool(c.get("attention_bias", False)), qk_norm="head",
             n_experts=int(first(c, "num_experts", "num_local_experts")), top_k=int(c["num_experts_per_tok"]),
             moe_intermediate_size=int(c["moe_intermediate_size"]),
             moe_layers=sparse_layers(c, d["n_layers"]), norm_topk_prob=bool(c.get("norm_topk_prob", True)))
    return d


FAMILY = Family(
    name="qwen3_moe",
    hf_architectures=("Qwen3MoeForCausalLM",),
    hf_config=_config,
    hf_names=LLAMA_NAMES,
    hf_expert_names=MLP_EXPERTS,
    gguf_architectures=("qwen3moe",),
)
