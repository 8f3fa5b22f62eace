"""Qwen2-MoE / Qwen1.5-MoE: qkv bias, a shared expert scaled by sigmoid(x @ gate), no top-k renorm."""
from .base import LLAMA_NAMES, MLP_EXPERTS, Family, common_hf, first, sparse_layers


def _config(c: dict) -> dict:
    d = common_hf(c, "qwen2_moe")
    shared = int(c.get("shared_expert_intermediate_size") or 0)
    d.update(qkv_bias=True, n_experts=int(first(c, "num_experts", "num_local_experts")), top_k=int(c["num_experts_per_tok"]),
             moe_intermediate_size=int(c["moe_intermediate_size"]),
             moe_layers=sparse_layers(c, d["n_layers"]), norm_topk_prob=bool(c.get("norm_topk_prob", False)),
             n_shared_experts=1 if shared else 0, shared_intermediate_size=shared, shared_expert_gate=bool(shared))
    return d


FAMILY = Family(
    name="qwen2_moe",
    hf_architectures=("Qwen2MoeForCausalLM",),
    hf_config=_config,
    hf_names={**LLAMA_NAMES,
              "blk.{l}.ffn_gate_shexp.weight": "model.layers.{l}.mlp.shared_expert.gate_proj.weight",
              "blk.{l}.ffn_up_shexp.weight": "model.layers.{l}.mlp.shared_expert.up_proj.weight",
              "blk.{l}.ffn_down_shexp.weight": "model.layers.{l}.mlp.shared_expert.down_proj.weight",
              "blk.{l}.ffn_gate_inp_shexp.weight": "model.layers.{l}.mlp.shared_expert_gate.weight"},
    hf_expert_names=MLP_EXPERTS,
    gguf_architectures=("qwen2moe",),
)
