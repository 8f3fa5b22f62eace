"""Tiny GGUF files written at test time with the gguf package's own writer.

`from_hf` turns a tiny Hugging Face checkpoint (tests/tiny_models.py) into the GGUF llama.cpp's
converter would write for it: metadata through GGUFWriter's add_* methods (so key names come from
the gguf package, not from the code under test), experts stacked as [E, ...] tensors, and the q/k
rows of "llama" models permuted for interleaved rotary the way llama.cpp does it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as GT
from gguf import GGUFWriter, quants

# our family -> GGUF architecture
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "olmoe": "olmoe", "deepseek_v2": "deepseek2"}


def encode(w: np.ndarray, t: GT) -> np.ndarray:
    """What GGUFWriter.add_tensor takes for type t: float arrays, or bytes [rows, bytes per row]."""
    w = np.ascontiguousarray(w, np.float32)
    if t == GT.F32:
        return w
    if t == GT.F16:
        return w.astype(np.float16)
    return quants.quantize(w, t)


def add(wr: GGUFWriter, name: str, w: np.ndarray, t: GT = GT.F32) -> None:
    data = encode(w, t)
    wr.add_tensor(name, data, raw_dtype=None if t in (GT.F32, GT.F16) else t)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF half-split rotary -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(path: Path, arch: str, kv, tensors: dict[str, tuple[np.ndarray, GT]]) -> Path:
    """kv(writer) adds metadata; tensors: name -> (float32 values, type)."""
    wr = GGUFWriter(str(path), arch)
    kv(wr)
    for name, (w, t) in tensors.items():
        add(wr, name, w, t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return Path(path)


def _metadata(wr: GGUFWriter, family: str, cfg, hf: dict) -> None:
    wr.add_block_count(cfg.n_layers)
    wr.add_context_length(cfg.max_position)
    wr.add_embedding_length(cfg.hidden_size)
    wr.add_head_count(cfg.n_heads)
    wr.add_head_count_kv(cfg.n_kv_heads)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim != cfg.hidden_size // cfg.n_heads and cfg.attention == "gqa":
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
    if family == "mixtral":
        wr.add_feed_forward_length(cfg.moe_intermediate_size)
    elif cfg.intermediate_size:
        wr.add_feed_forward_length(cfg.intermediate_size)
    if cfg.n_experts:
        wr.add_expert_count(cfg.n_experts)
        wr.add_expert_used_count(cfg.top_k)
        if family != "mixtral":
            wr.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "qwen2_moe" and cfg.shared_intermediate_size:
        wr.add_expert_shared_feed_forward_length(cfg.shared_intermediate_size)
    if family == "deepseek_v2":
        wr.add_leading_dense_block_count(min(cfg.moe_layers))
        if cfg.q_lora_rank:
            wr.add_q_lora_rank(cfg.q_lora_rank)
        wr.add_kv_lora_rank(cfg.kv_lora_rank)
        wr.add_key_length(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        wr.add_value_length(cfg.v_head_dim)
        wr.add_rope_dimension_count(cfg.qk_rope_head_dim)
        wr.add_expert_shared_count(cfg.n_shared_experts)
        wr.add_expert_weights_scale(cfg.routed_scaling_factor)
        wr.add_expert_weights_norm(cfg.norm_topk_prob)
        if cfg.n_group > 1:
            wr.add_expert_group_count(cfg.n_group)
            wr.add_expert_group_used_count(cfg.topk_group)
    else:
        wr.add_rope_dimension_count(cfg.head_dim)


def from_hf(folder: Path, out: Path, types: dict | None = None, edit=None) -> Path:
    """GGUF of an HF checkpoint folder; types maps a tensor name suffix to a GGUF type (F32 default);
    edit(tensors) may change the name -> (values, type) dict before it is written."""
    import torch
    import transformers

    import json

    import efmodels
    from efengine.config import ModelConfig

    hf = json.loads((Path(folder) / "config.json").read_text())
    family = efmodels.by_hf_architecture(hf["architectures"][0])
    cfg = ModelConfig(**family.hf_config(hf))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arch = GGUF_ARCH[family.name]
    types = types or {}

    def pick(name: str, w: np.ndarray) -> GT:
        for suffix, t in types.items():
            if name.endswith(suffix) and w.ndim >= 2:
                return t
        return GT.F32

    tensors = {}
    for canon, shape, _ in efmodels.expected_tensors(cfg):
        w = _get(sd, efmodels.hf_name(family, canon))
        if arch == "llama" and canon.endswith(("attn_q.weight", "attn_k.weight")):
            w = permute(w, cfg.n_heads if "attn_q" in canon else cfg.n_kv_heads)
        if canon.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(-1)        # llama.cpp stores the shared-expert gate 1-D
        tensors[canon] = (w, pick(canon, w))
    for l in cfg.moe_layers:
        for part, stem in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
            tmpl = family.hf_expert_names[part]
            ws = []
            for e in range(cfg.n_experts):
                key = tmpl.format(l=l, e=e)
                alt = key.replace(".block_sparse_moe.", ".mlp.")
                ws.append(sd[key] if key in sd else sd[alt] if alt in sd else _fused(sd, tmpl, l, e, part, cfg))
            name = f"blk.{l}.{stem}_exps.weight"
            stacked = np.stack(ws)
            tensors[name] = (stacked, pick(name, stacked))
    if edit is not None:
        edit(tensors)
    return write(out, arch, lambda wr: _metadata(wr, family.name, cfg, hf), tensors)


def _get(sd: dict, name: str) -> np.ndarray:
    """transformers 5 renamed Mixtral's block_sparse_moe to mlp."""
    return sd[name] if name in sd else sd[name.replace(".block_sparse_moe.", ".mlp.")]


def _fused(sd: dict, tmpl: str, l: int, e: int, part: str, cfg) -> np.ndarray:
    """transformers 5 stores experts fused: experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]."""
    prefix = tmpl.split(".{e}.")[0].format(l=l)
    for p in (prefix, prefix.replace(".block_sparse_moe.", ".mlp.")):
        if p + ".gate_up_proj" in sd:
            I = cfg.moe_intermediate_size
            gu = sd[p + ".gate_up_proj"][e]
            return {"gate": gu[:I], "up": gu[I:], "down": sd[p + ".down_proj"][e]}[part]
    raise KeyError(f"no expert weights for layer {l} expert {e} ({tmpl})")
