"""ModelConfig: the normalized hyper-parameters every part of the engine reads.

Families in models/ translate their Hugging Face (or GGUF) config into this one shape; the forward
pass reads flags from here rather than branching on the architecture's name.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int                 # D
    n_layers: int                    # L
    n_heads: int                     # H
    n_kv_heads: int
    head_dim: int
    intermediate_size: int           # dense FFN width (dense layers); 0 when there are none
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # HF rope_scaling / rope_parameters when not "default"
    max_position: int = 4096
    tie_embeddings: bool = False
    # attention
    attention: str = "gqa"           # "gqa" or "mla" (DeepSeek multi-head latent attention)
    qkv_bias: bool = False
    qk_norm: str = ""                # "" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    q_lora_rank: int = 0             # MLA; 0 = q_proj without low rank
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # mixture of experts
    n_experts: int = 0               # E routed experts per MoE layer
    top_k: int = 0                   # K
    moe_intermediate_size: int = 0   # I of one routed expert
    moe_layers: tuple = ()           # indices of MoE layers; the others use a dense FFN
    norm_topk_prob: bool = False     # renormalize the top-k weights to sum to 1
    moe_weighting: str = "softmax"   # "softmax": router probabilities weight the experts;
                                     # "ones": every chosen expert has weight 1 (MoE-fied dense FFNs)
    topk_method: str = "greedy"      # "greedy" | "group_limited_greedy" (DeepSeek-V2)
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0        # shared experts, fused into one FFN of this many x width
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) scales the shared expert
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.attention not in ("gqa", "mla"):
            raise ConfigError(f"config: attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"config: {self.n_heads} heads are not a multiple of {self.n_kv_heads} kv heads")
        if self.moe_layers:
            if self.n_experts <= 0 or not 0 < self.top_k <= self.n_experts:
                raise ConfigError(f"config: top_k {self.top_k} must be in 1..n_experts ({self.n_experts})")
            if self.moe_intermediate_size <= 0:
                raise ConfigError("config: moe_intermediate_size must be positive")
        if self.moe_weighting not in ("softmax", "ones"):
            raise ConfigError(f"config: unsupported moe_weighting {self.moe_weighting!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"config: unsupported topk_method {self.topk_method!r}")
        if any(not 0 <= l < self.n_layers for l in self.moe_layers):
            raise ConfigError("config: moe_layers outside 0..n_layers-1")
        object.__setattr__(self, "moe_layers", tuple(int(l) for l in self.moe_layers))

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{source}: unknown config keys {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None
