"""Model families, one small file each. Adding a family = adding a file and a line here."""
from efengine.errors import ConfigError

from . import deepseek_v2, llama, mixtral, olmoe, qwen2_moe, qwen3_moe
from .base import Family, expected_tensors, expert_shapes, hf_name

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (llama, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2)}


def by_hf_architecture(arch: str) -> Family:
    for f in FAMILIES.values():
        if arch in f.hf_architectures:
            return f
    supported = ", ".join(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise ConfigError(f"architecture {arch!r} is not supported; supported: {supported}")


def by_name(name: str) -> Family:
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "Family", "by_hf_architecture", "by_name", "expected_tensors", "expert_shapes", "hf_name"]
