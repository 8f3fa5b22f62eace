"""Device expert pools: n equal slots of blob bytes plus the slot table [layers, E] the kernels read.

SimDevicePool is the numpy stand-in for the GPU pool (efengine.ops.gpu_weights.ExpertPool), with
the same methods: put(slot, blob) (what a copy engine does), assign(layer, e, slot),
handle(layer, e), slot_array(slot), table, owner, where; plus unassign(slot), which the runtime
calls on eviction so the table never names a slot being overwritten. Layer numbers here are the
model's (as the MoE layer asks), not MoE indices.

Handles on numpy are the backend's ExpertWeights decoded from the slot's bytes: a wrong slot or a
slot overwritten too early gives wrong weights, so the lossless tests see the cache's mistakes.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError


class SimDevicePool:
    def __init__(self, store, n_slots: int, n_model_layers: int):
        self.store, self.n_slots, self.E = store, int(n_slots), store.E
        self.stride = store.blob_nbytes
        self.data = np.zeros((self.n_slots, self.stride), dtype=np.uint8) if getattr(store, "has_bytes", True) else None
        self.table = np.full((n_model_layers, self.E), -1, dtype=np.int32)
        self.owner: dict[int, tuple[int, int]] = {}
        self.where: dict[tuple[int, int], int] = {}
        self._handles: dict[int, object] = {}
        self.writes = 0

    def slot_array(self, slot: int) -> np.ndarray:
        return self.data[slot]

    def put(self, slot: int, blob) -> None:
        """Copy a host blob into a slot (runs on the copy engine's thread)."""
        self.writes += 1
        if self.data is not None:
            self.data[slot, : blob.size] = blob
        self._handles.pop(slot, None)

    def assign(self, layer: int, e: int, slot: int) -> None:
        self.unassign(slot)
        self.owner[slot] = (layer, e)
        self.where[(layer, e)] = slot
        self.table[layer, e] = slot

    def unassign(self, slot: int) -> None:
        old = self.owner.pop(slot, None)
        if old is not None:
            self.where.pop(old, None)
            self.table[old[0], old[1]] = -1
        self._handles.pop(slot, None)

    def handle(self, layer: int, e: int):
        slot = self.where.get((layer, e))
        if slot is None:
            raise ConfigError(f"expert {e} of layer {layer} is not in the device pool")
        h = self._handles.get(slot)
        if h is None:
            h = self._handles[slot] = self._decode(self.data[slot]) if self.data is not None else (layer, e)
        return h

    def _decode(self, blob: np.ndarray):
        from ..ops.numpy_backend import ExpertWeights
        w = self.store.decode(blob)
        return ExpertWeights(*(np.ascontiguousarray(w[p], dtype=np.float32) for p in ("gate", "up", "down")))


def unassign(pool, slot: int) -> None:
    """Clear a slot's table entry on any pool (the GPU ExpertPool clears it on its next assign)."""
    if hasattr(pool, "unassign"):
        pool.unassign(slot)
