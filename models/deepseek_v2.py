"""DeepSeek-V2 / V2-Lite: MLA attention, shared experts, leading dense layers, grouped top-k."""
from efengine.errors import ConfigError

from .base import LLAMA_NAMES, MLP_EXPERTS, Family, common_hf


def _config(c: dict) -> dict:
    d = common_hf(c, "deepseek_v2")
    n, first, freq = d["n_layers"], int(c.get("first_k_dense_replace", 0)), int(c.get("moe_layer_freq", 1))
    method = c.get("topk_method", "greedy")
    if c.get("scoring_func", "softmax") != "softmax":
        raise ConfigError(f"DeepSeek-V2 scoring_func {c.get('scoring_func')!r} is not supported (softmax is)")
    inter = int(c["moe_intermediate_size"])
    d.update(attention="mla", q_lora_rank=int(c.get("q_lora_rank") or 0), kv_lora_rank=int(c["kv_lora_rank"]),
             qk_nope_head_dim=int(c["qk_nope_head_dim"]), qk_rope_head_dim=int(c["qk_rope_head_dim"]),
             v_head_dim=int(c["v_head_dim"]), head_dim=int(c["qk_nope_head_dim"]) + int(c["qk_rope_head_dim"]),
             n_experts=int(c["n_routed_experts"]), top_k=int(c["num_experts_per_tok"]),
             moe_intermediate_size=inter,
             moe_layers=tuple(l for l in range(first, n) if l % freq == 0),
             norm_topk_prob=bool(c.get("norm_topk_prob", False)), topk_method=method,
             n_group=int(c.get("n_group") or 1), topk_group=int(c.get("topk_group") or 1),
             routed_scaling_factor=float(c.get("routed_scaling_factor", 1.0)),
             n_shared_experts=int(c.get("n_shared_experts") or 0),
             shared_intermediate_size=inter * int(c.get("n_shared_experts") or 0))
    return d


FAMILY = Family(
    name="deepseek_v2",
    hf_architectures=("DeepseekV2ForCausalLM",),
    hf_config=_config,
    hf_names={**LLAMA_NAMES,
              "blk.{l}.attn_q_a.weight": "model.layers.{l}.self_attn.q_a_proj.weight",
              "blk.{l}.attn_q_a_norm.weight": "model.layers.{l}.self_attn.q_a_layernorm.weight",
              "blk.{l}.attn_q_b.weight": "model.layers.{l}.self_attn.q_b_proj.weight",
              "blk.{l}.attn_kv_a_mqa.weight": "model.layers.{l}.self_attn.kv_a_proj_with_mqa.weight",
              "blk.{l}.attn_kv_a_norm.weight": "model.layers.{l}.self_attn.kv_a_layernorm.weight",
              "blk.{l}.attn_kv_b.weight": "model.layers.{l}.self_attn.kv_b_proj.weight",
              "blk.{l}.ffn_gate_shexp.weight": "model.layers.{l}.mlp.shared_experts.gate_proj.weight",
              "blk.{l}.ffn_up_shexp.weight": "model.layers.{l}.mlp.shared_experts.up_proj.weight",
              "blk.{l}.ffn_down_shexp.weight": "model.layers.{l}.mlp.shared_experts.down_proj.weight"},
    hf_expert_names=MLP_EXPERTS,
    gguf_architectures=("deepseek2",),
)
