"""Llama (LlamaForCausalLM and the GGUF "llama" architecture): dense GQA attention, SwiGLU FFN.

Also the family of MoE-fied Llama models (efconvert --moefy): the same attention, every FFN split
into equal experts whose chosen outputs are summed with weight one (moe_weighting "ones"), so that
choosing every expert gives back the dense model exactly.
"""
from efengine.errors import ConfigError

from .base import LLAMA_NAMES, Family, common_hf

# Weights of a MoE-fied model live under these names when written back to a HF-style folder.
MOEFY_EXPERTS = {
    "gate": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
    "up": "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
    "down": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
}


def _config(c: dict) -> dict:
    if c.get("mlp_bias"):
        raise ConfigError("Llama with mlp_bias is not supported")
    d = common_hf(c, "llama")
    d.update(qkv_bias=bool(c.get("attention_bias", False)))
    return d


FAMILY = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    hf_config=_config,
    hf_names=LLAMA_NAMES,
    hf_expert_names=MOEFY_EXPERTS,
    gguf_architectures=("llama",),
    notes="dense Llama; MoE-fied variants carry moe_weighting='ones'",
)
