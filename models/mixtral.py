"""Mixtral (MixtralForCausalLM): GQA attention, every layer MoE, softmax top-2, renormalized."""
from .base import LLAMA_NAMES, Family, common_hf


def _config(c: dict) -> dict:
    d = common_hf(c, "mixtral")
    d.update(n_experts=int(c["num_local_experts"]), top_k=int(c["num_experts_per_tok"]),
             moe_intermediate_size=int(c["intermediate_size"]), intermediate_size=0,
             moe_layers=tuple(range(d["n_layers"])), norm_topk_prob=True)
    return d


FAMILY = Family(
    name="mixtral",
    hf_architectures=("MixtralForCausalLM",),
    hf_config=_config,
    hf_names={**LLAMA_NAMES, "blk.{l}.ffn_gate_inp.weight": "model.layers.{l}.block_sparse_moe.gate.weight"},
    hf_expert_names={
        "gate": "model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
        "up": "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
        "down": "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight",
    },
    gguf_architectures=("llama",),
)
