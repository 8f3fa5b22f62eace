"""Host tiers: where expert blobs are read from before a copy moves them to the device.

Legend: L MoE layers (MoE order i = 0..L-1; `layers[i]` is the model's layer number), E experts.

HostStore(source) serves one contiguous blob per expert:
  - from the memory-mapped .ef (EfFile.expert_blob: no copy; the page cache is the tier), or
  - from a RAM tier of `host_bytes` (LRU over blobs; all of them when RAM allows). Its buffer
    comes from `alloc(nbytes)`: numpy memory here, pinned memory on CUDA (pass
    cupyx.empty_pinned-style allocator) so copies run at full PCIe speed.
Sources without stored blobs (in-memory test models) are packed as float32 gate|up|down.
`decode(blob)` turns a blob back into {gate, up, down} float32 exactly as EfFile does.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import numpy as np

from .. import quant
from ..errors import ConfigError

PARTS = ("gate", "up", "down")


class HostStore:
    def __init__(self, source, *, host_bytes: int = 0,
                 alloc: Callable[[int], np.ndarray] | None = None):
        cfg = source.config
        self.source = source
        self.layers = tuple(getattr(source, "expert_layers", None) or cfg.moe_layers)
        if not self.layers:
            raise ConfigError("offload: the model has no MoE layers, there are no experts to offload")
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.L, self.E, self.A = len(self.layers), int(cfg.n_experts), int(cfg.top_k)
        self.packed = not hasattr(source, "expert_blob")
        if self.packed:
            w = source.expert_weights(self.layers[0], 0)
            self.shapes = {p: tuple(w[p].shape) for p in PARTS}
            self.blob_nbytes = sum(int(np.prod(s)) * 4 for s in self.shapes.values())
        else:
            self.layout = source.expert_layout
            self.blob_nbytes = int(source.blob_nbytes)
        n = int(host_bytes) // self.blob_nbytes if host_bytes else 0
        self.ram_slots = min(n, self.L * self.E)
        self.ram = None
        if self.ram_slots:
            alloc = alloc or (lambda nbytes: np.empty(nbytes, dtype=np.uint8))
            self.ram = alloc(self.ram_slots * self.blob_nbytes).reshape(self.ram_slots, self.blob_nbytes)
            self.ram_map: OrderedDict[int, int] = OrderedDict()     # flat id -> RAM slot
        self.reads = 0                                              # blobs read from the source

    @property
    def n_experts_total(self) -> int:
        return self.L * self.E

    def blob(self, i: int, e: int) -> np.ndarray:
        """uint8 [blob_nbytes] of expert e of MoE layer i (a view: do not write to it)."""
        if self.ram is None:
            return self._read(i, e)
        f = i * self.E + e
        slot = self.ram_map.get(f)
        if slot is not None:
            self.ram_map.move_to_end(f)
            return self.ram[slot]
        if len(self.ram_map) < self.ram_slots:
            slot = len(self.ram_map)
        else:
            _, slot = self.ram_map.popitem(last=False)
        self.ram[slot] = self._read(i, e)
        self.ram_map[f] = slot
        return self.ram[slot]

    def _read(self, i: int, e: int) -> np.ndarray:
        self.reads += 1
        layer = self.layers[i]
        if not self.packed:
            return self.source.expert_blob(layer, e)
        w = self.source.expert_weights(layer, e)
        return np.concatenate([np.ascontiguousarray(w[p], dtype=np.float32).reshape(-1) for p in PARTS]).view(np.uint8)

    def decode(self, blob: np.ndarray) -> dict[str, np.ndarray]:
        """{gate [I, D], up [I, D], down [D, I]} float32 from a blob (the same bits EfFile gives)."""
        if self.packed:
            out, o = {}, 0
            f = np.asarray(blob).view(np.float32)
            for p in PARTS:
                n = int(np.prod(self.shapes[p]))
                out[p] = f[o:o + n].reshape(self.shapes[p])
                o += n
            return out
        return {p: quant.dequantize(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group)
                for p, t in self.layout.items()}

    def warm(self, progress: Callable[[int], None] | None = None) -> None:
        """Fill the RAM tier in expert order (up to its size)."""
        for f in range(min(self.ram_slots, self.L * self.E)):
            self.blob(f // self.E, f % self.E)
            if progress:
                progress(f)


class NullStore:
    """A store without bytes (timed trace replay: only sizes and timing matter)."""

    packed = True
    has_bytes = False

    def __init__(self, n_layers: int, n_experts: int, top_k: int, blob_nbytes: int):
        self.L, self.E, self.A, self.blob_nbytes = n_layers, n_experts, top_k, int(blob_nbytes)
        self.layers = tuple(range(n_layers))
        self.index = {l: l for l in self.layers}
        self.reads = 0

    def blob(self, i: int, e: int):
        return None
