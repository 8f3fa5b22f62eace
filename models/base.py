"""What a model family is, as data: config translation and tensor names.

Canonical tensor names follow llama.cpp's GGUF names ("blk.{l}.attn_q.weight") so that a GGUF file
maps onto them directly. A family gives, per canonical name, the Hugging Face name template; which
tensors a given model has follows from its ModelConfig flags (expected_tensors), never from an
architecture `if` chain.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from efengine.config import ModelConfig
from efengine.errors import ConfigError

# tensor classes, each with its own precision in efconvert (--experts / --dense)
EXPERTS, DENSE, EMBED, NORM, ROUTER = "experts", "dense", "embed", "norm", "router"


@dataclass(frozen=True)
class Family:
    name: str
    hf_architectures: tuple
    hf_config: Callable[[dict], dict]      # HF config.json -> ModelConfig keyword arguments
    hf_names: dict                         # canonical template -> HF template ({l}: layer)
    hf_expert_names: dict                  # "gate"/"up"/"down" -> HF template ({l}, {e})
    gguf_architectures: tuple = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)


def rope_from_hf(c: dict) -> tuple[float, dict | None]:
    """rope theta and scaling from either transformers 4 (rope_theta, rope_scaling) or 5 keys."""
    params = dict(c.get("rope_parameters") or {})
    scaling = c.get("rope_scaling") or None
    theta = float(c.get("rope_theta", params.get("rope_theta", 10000.0)))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        scaling.pop("type", None)
        if kind == "default":
            scaling = None
    return theta, scaling


def common_hf(c: dict, arch: str) -> dict:
    """The keys every supported family spells the same way."""
    try:
        d, h = int(c["hidden_size"]), int(c["num_attention_heads"])
        theta, scaling = rope_from_hf(c)
        return dict(
            arch=arch,
            vocab_size=int(c["vocab_size"]),
            hidden_size=d,
            n_layers=int(c["num_hidden_layers"]),
            n_heads=h,
            n_kv_heads=int(c.get("num_key_value_heads") or h),
            head_dim=int(c.get("head_dim") or d // h),
            intermediate_size=int(c.get("intermediate_size") or 0),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(c.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed value: {e}") from None


def first(c: dict, *keys):
    """The first of several spellings a key has had across transformers versions."""
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    raise ConfigError(f"config.json lacks {keys[0]!r}")


def sparse_layers(c: dict, n_layers: int) -> tuple:
    """Qwen-style placement: decoder_sparse_step and mlp_only_layers."""
    step = int(c.get("decoder_sparse_step", 1) or 1)
    dense = set(c.get("mlp_only_layers") or [])
    return tuple(l for l in range(n_layers) if l not in dense and (l + 1) % step == 0)


# standard Llama-style names shared by most families
LLAMA_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{l}.attn_norm.weight": "model.layers.{l}.input_layernorm.weight",
    "blk.{l}.ffn_norm.weight": "model.layers.{l}.post_attention_layernorm.weight",
    "blk.{l}.attn_q.weight": "model.layers.{l}.self_attn.q_proj.weight",
    "blk.{l}.attn_k.weight": "model.layers.{l}.self_attn.k_proj.weight",
    "blk.{l}.attn_v.weight": "model.layers.{l}.self_attn.v_proj.weight",
    "blk.{l}.attn_q.bias": "model.layers.{l}.self_attn.q_proj.bias",
    "blk.{l}.attn_k.bias": "model.layers.{l}.self_attn.k_proj.bias",
    "blk.{l}.attn_v.bias": "model.layers.{l}.self_attn.v_proj.bias",
    "blk.{l}.attn_output.weight": "model.layers.{l}.self_attn.o_proj.weight",
    "blk.{l}.attn_q_norm.weight": "model.layers.{l}.self_attn.q_norm.weight",
    "blk.{l}.attn_k_norm.weight": "model.layers.{l}.self_attn.k_norm.weight",
    "blk.{l}.ffn_gate.weight": "model.layers.{l}.mlp.gate_proj.weight",
    "blk.{l}.ffn_up.weight": "model.layers.{l}.mlp.up_proj.weight",
    "blk.{l}.ffn_down.weight": "model.layers.{l}.mlp.down_proj.weight",
    "blk.{l}.ffn_gate_inp.weight": "model.layers.{l}.mlp.gate.weight",
}
MLP_EXPERTS = {
    "gate": "model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
    "up": "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
    "down": "model.layers.{l}.mlp.experts.{e}.down_proj.weight",
}


def expected_tensors(cfg: ModelConfig) -> list[tuple[str, tuple, str]]:
    """Every dense tensor a model with this config has: (canonical name, shape, class).

    Routed experts are not listed: they are stored as blobs (see expert_shapes).
    """
    D, V = cfg.hidden_size, cfg.vocab_size
    out = [("token_embd.weight", (V, D), EMBED), ("output_norm.weight", (D,), NORM)]
    if not cfg.tie_embeddings:
        out.append(("output.weight", (V, D), DENSE))
    H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    for l in range(cfg.n_layers):
        b = f"blk.{l}."
        out += [(b + "attn_norm.weight", (D,), NORM), (b + "ffn_norm.weight", (D,), NORM)]
        if cfg.attention == "mla":
            qd = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
            if cfg.q_lora_rank:
                out += [(b + "attn_q_a.weight", (cfg.q_lora_rank, D), DENSE),
                        (b + "attn_q_a_norm.weight", (cfg.q_lora_rank,), NORM),
                        (b + "attn_q_b.weight", (H * qd, cfg.q_lora_rank), DENSE)]
            else:
                out.append((b + "attn_q.weight", (H * qd, D), DENSE))
            out += [(b + "attn_kv_a_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D), DENSE),
                    (b + "attn_kv_a_norm.weight", (cfg.kv_lora_rank,), NORM),
                    (b + "attn_kv_b.weight", (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), DENSE),
                    (b + "attn_output.weight", (D, H * cfg.v_head_dim), DENSE)]
        else:
            out += [(b + "attn_q.weight", (H * hd, D), DENSE), (b + "attn_k.weight", (KV * hd, D), DENSE),
                    (b + "attn_v.weight", (KV * hd, D), DENSE), (b + "attn_output.weight", (D, H * hd), DENSE)]
            if cfg.qkv_bias:
                out += [(b + "attn_q.bias", (H * hd,), NORM), (b + "attn_k.bias", (KV * hd,), NORM),
                        (b + "attn_v.bias", (KV * hd,), NORM)]
            if cfg.qk_norm == "head":
                out += [(b + "attn_q_norm.weight", (hd,), NORM), (b + "attn_k_norm.weight", (hd,), NORM)]
            elif cfg.qk_norm == "full":
                out += [(b + "attn_q_norm.weight", (H * hd,), NORM), (b + "attn_k_norm.weight", (KV * hd,), NORM)]
        if cfg.is_moe_layer(l):
            out.append((b + "ffn_gate_inp.weight", (cfg.n_experts, D), ROUTER))
            if cfg.n_shared_experts:
                S = cfg.shared_intermediate_size
                out += [(b + "ffn_gate_shexp.weight", (S, D), DENSE), (b + "ffn_up_shexp.weight", (S, D), DENSE),
                        (b + "ffn_down_shexp.weight", (D, S), DENSE)]
                if cfg.shared_expert_gate:
                    out.append((b + "ffn_gate_inp_shexp.weight", (1, D), ROUTER))
        else:
            F = cfg.intermediate_size
            out += [(b + "ffn_gate.weight", (F, D), DENSE), (b + "ffn_up.weight", (F, D), DENSE),
                    (b + "ffn_down.weight", (D, F), DENSE)]
    return out


def expert_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Shapes of one routed expert's matrices: gate/up [I, D], down [D, I]."""
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    return {"gate": (I, D), "up": (I, D), "down": (D, I)}


def hf_name(family: Family, canonical: str) -> str:
    """HF name of a canonical tensor ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn...')."""
    parts = canonical.split(".")
    if parts[0] == "blk":
        tmpl = "blk.{l}." + ".".join(parts[2:])
        return family.hf_names[tmpl].format(l=parts[1])
    return family.hf_names[canonical]
