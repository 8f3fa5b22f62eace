"""Test helpers shared by the offload tests (CPU and GPU)."""
from __future__ import annotations

import numpy as np


def greedy_logits(model, steps: int):
    """Prefill 9 tokens, then `steps` greedy decode steps: all logits [9 + steps, V]."""
    cache = model.new_cache(32)
    out = [model.forward(np.array([5, 17, 3, 99, 42, 8, 64, 1, 23]), cache)]
    for _ in range(steps):
        out.append(model.forward(np.array([int(out[-1][-1].argmax())]), cache))
    return np.concatenate(out)


class HostBlobs:
    """A device-resident weight source whose expert blobs come from host memory (as from a mapped
    .ef), so the offload runtime really copies them host -> device. Needs cupy."""

    def __init__(self, src):
        self.src, self.blobs = src, {}

    def __getattr__(self, name):
        return getattr(self.src, name)

    def expert_blob(self, layer, e):
        import cupy as cp
        if (layer, e) not in self.blobs:
            self.blobs[layer, e] = cp.asnumpy(self.src.expert_blob(layer, e))
        return self.blobs[layer, e]
