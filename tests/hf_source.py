"""An in-memory weight source over a Hugging Face safetensors folder (test double of EfFile).

Canonical names map to HF names through the family's table (efmodels.hf_name), so the model reads
exactly the tensors transformers reads, in float32, with no conversion step in between.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import efmodels
from efengine.config import ModelConfig


class HFSource:
    def __init__(self, folder):
        folder = Path(folder)
        hf = json.loads((folder / "config.json").read_text())
        self.family = efmodels.by_hf_architecture(hf["architectures"][0])
        self.config = ModelConfig(**self.family.hf_config(hf))
        self.sd: dict[str, np.ndarray] = {}
        for f in sorted(folder.glob("*.safetensors")):
            self.sd.update(load_file(f))
        self.expert_layers = list(self.config.moe_layers)
        self.n_experts = self.config.n_experts
        self.loaded: list[str] = []

    def _hf(self, name: str) -> str | None:
        try:
            return efmodels.hf_name(self.family, name)
        except KeyError:
            return None

    def has(self, name: str) -> bool:
        hf = self._hf(name)
        return hf is not None and hf in self.sd

    def load(self, name: str) -> np.ndarray:
        self.loaded.append(name)
        return self.sd[self._hf(name)].astype(np.float32)

    def expert_weights(self, layer: int, e: int) -> dict[str, np.ndarray]:
        names = self.family.hf_expert_names
        return {p: self.sd[names[p].format(l=layer, e=e)].astype(np.float32) for p in ("gate", "up", "down")}
