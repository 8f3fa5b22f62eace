"""OLMoE: RMSNorm over the whole q and k projections (not per head), 64 experts top-8."""
from efengine.errors import ConfigError

from .base import LLAMA_NAMES, MLP_EXPERTS, Family, common_hf, first


def _config(c: dict) -> dict:
    if c.get("clip_qkv") is not None:
        raise ConfigError("OLMoE with clip_qkv is not supported")
    d = common_hf(c, "olmoe")
    d.update(qkv_bias=bool(c.get("attention_bias", False)), qk_norm="full",
             n_experts=int(first(c, "num_experts", "num_local_experts")), top_k=int(c["num_experts_per_tok"]),
             moe_intermediate_size=int(c["intermediate_size"]), intermediate_size=0,
             moe_layers=tuple(range(d["n_layers"])), norm_topk_prob=bool(c.get("norm_topk_prob", False)))
    return d


FAMILY = Family(
    name="olmoe",
    hf_architectures=("OlmoeForCausalLM",),
    hf_config=_config,
    hf_names=LLAMA_NAMES,
    hf_expert_names=MLP_EXPERTS,
    gguf_architectures=("olmoe",),
)
