"""Weights on the GPU in their stored (quantized) form, and the expert slot pool.

Legend: N / K a matrix's outputs / inputs, Kp K padded to whole groups, L layers,
E routed experts per layer, I expert width, D hidden.

GpuWeight      one dense matrix [N, K] in its stored bytes (quant.py layout) on the device
ExpertLayout   where gate / up / down and their q / s / m parts sit inside one expert blob
ExpertHandle   one resident expert (a blob address + layout): what cupy's expert_ffn takes
ExpertPool     equal-sized slots of expert blobs + a device slot table [L, E] int32 (-1 = not
               resident): the MoE kernels read the table, so routing never visits the host
PoolExperts    the ExpertProvider that serves every expert from a fully resident pool
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import quant
from ..errors import ConfigError, FormatError
from ..experts import ExpertProvider
from .gpu_kernels import WT, addr, cupy, i32, launch

FAST_GROUPS = (32, 64, 128, 256, 512, 1024)


def gshift_of(group: int) -> int:
    return (group // 32).bit_length() - 1


class GpuWeight:
    """A matrix [N, K] kept in its stored type on the device (kernels dequantize on the fly).

    Quantized matrices whose group the GEMV kernels cannot take (not 32 * 2^n) are widened to
    f16 once, at load, so every matrix has a fast path.
    """

    def __init__(self, qtype: str, shape, group: int, buf):
        if len(shape) != 2:
            raise ConfigError(f"GpuWeight needs a matrix, got shape {tuple(shape)}")
        parts, total = quant.layout(qtype, shape, group)
        if buf.dtype != np.uint8 or buf.size < total:
            raise FormatError(f"{qtype} {tuple(shape)} needs {total} bytes, got {buf.size} of {buf.dtype}")
        self.qtype, self.shape, self.group, self.buf = qtype, tuple(int(s) for s in shape), int(group), buf
        self.N, self.K = self.shape
        self.wt = WT[qtype]
        self.off = {p.name: p.offset for p in parts}
        self.nbytes = total
        if qtype in quant.QUANT_TYPES:
            self.Kp = quant._align(self.K, group)
            self.gshift = gshift_of(group)
        else:
            self.Kp, self.gshift = self.K, 0

    @property
    def quantized(self) -> bool:
        return self.qtype in quant.QUANT_TYPES

    def ptr(self, part: str) -> int:
        """Device address of part "q" / "s" / "m" ("q" is the weights themselves for float types)."""
        if self.quantized:
            return addr(self.buf) + self.off[part] if part in self.off else 0
        return addr(self.buf) if part == "q" else 0

    def f16(self, out=None):
        """The matrix as cupy float16 [N, K]: a view for f16, else dequantized into `out` (or a new
        array)."""
        if self.qtype == "f16" and out is None:
            return self.buf[: self.nbytes].view(cupy.float16).reshape(self.shape)
        if out is None:
            out = cupy.empty(self.shape, dtype=cupy.float16)
        elif out.shape != self.shape or out.dtype != cupy.float16 or not out.flags.c_contiguous:
            raise ConfigError(f"f16: out must be contiguous float16 {self.shape}")
        launch("misc", "dequant_f16", (self.N,), (256,),
               (i32(self.wt), self.buf, np.uint64(self.ptr("s")), np.uint64(self.ptr("m")),
                i32(self.K), i32(self.Kp), i32(self.group if self.quantized else 1), out))
        return out


def make_weight(qtype: str, shape, group: int, buf) -> GpuWeight:
    """A GpuWeight of stored bytes already on the device, widened to f16 when its group is odd."""
    w = GpuWeight(qtype, shape, group, buf)
    if w.quantized and group not in FAST_GROUPS:
        h = w.f16()
        return GpuWeight("f16", shape, 0, h.reshape(-1).view(cupy.uint8))
    return w


@dataclass(frozen=True)
class PartPlace:
    qtype: str
    shape: tuple
    group: int
    q: int      # byte offsets inside the blob
    s: int
    m: int

    @property
    def wt(self) -> int:
        return WT[self.qtype]

    @property
    def Kp(self) -> int:
        return quant._align(self.shape[1], self.group) if self.qtype in quant.QUANT_TYPES else self.shape[1]

    @property
    def gshift(self) -> int:
        return gshift_of(self.group) if self.qtype in quant.QUANT_TYPES else 0


class ExpertLayout:
    """gate / up [I, D] and down [D, I] inside one blob (from EfFile.expert_layout)."""

    def __init__(self, layout: dict, blob_nbytes: int):
        self.blob_nbytes = int(blob_nbytes)
        self.parts = {}
        for name in ("gate", "up", "down"):
            t = layout[name]
            parts, _ = quant.layout(t.type, t.shape, t.group)
            off = {p.name: t.offset + p.offset for p in parts}
            if t.type in quant.QUANT_TYPES and t.group not in FAST_GROUPS:
                raise ConfigError(f"expert {name}: group {t.group} is not one the GPU kernels take "
                                  f"({', '.join(map(str, FAST_GROUPS))}); reconvert with another --group")
            self.parts[name] = PartPlace(t.type, tuple(t.shape), int(t.group), off.get("q", off.get("w", t.offset)),
                                         off.get("s", 0), off.get("m", 0))
        g, u, d = self.parts["gate"], self.parts["up"], self.parts["down"]
        if (g.qtype, g.shape, g.group) != (u.qtype, u.shape, u.group):
            raise ConfigError("expert gate and up must share type, shape and group for the fused kernel")
        self.I, self.D = g.shape
        if d.shape != (self.D, self.I):
            raise FormatError(f"expert down has shape {d.shape}, expected {(self.D, self.I)}")

    @classmethod
    def of(cls, source) -> "ExpertLayout":
        return cls(source.expert_layout, source.blob_nbytes)


@dataclass
class ExpertHandle:
    """One resident expert: the device address of its blob (keep = what holds the memory)."""
    base: int
    layout: ExpertLayout
    keep: object = None
    _views: dict = field(default_factory=dict, repr=False)

    def weight(self, part: str) -> GpuWeight:
        """gate / up / down as a GpuWeight view of the blob."""
        w = self._views.get(part)
        if w is None:
            w = self._views[part] = self._view(part)
        return w

    def _view(self, part: str) -> GpuWeight:
        p = self.layout.parts[part]
        n = quant.nbytes(p.qtype, p.shape, p.group)      # the part's region starts with q
        mem = cupy.cuda.UnownedMemory(self.base + p.q, n, self.keep)
        buf = cupy.ndarray((n,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        return GpuWeight(p.qtype, p.shape, p.group, buf)


def upload_blob(blob):
    """Host (numpy / memmap) or device blob -> device uint8 array."""
    if cupy is not None and isinstance(blob, cupy.ndarray):
        return blob
    return cupy.asarray(np.ascontiguousarray(blob))


class ExpertPool:
    """n_slots equal slots of blob_nbytes on the device and the slot table [L, E] int32.

    `table` is what the MoE kernels read; `owner` mirrors it on the host (slot -> (layer, e)).
    Writers (an offload runtime) put a blob in a slot with `put` (or copy into `slot_array(i)`
    themselves on a copy stream) and then `assign` it.

    Run-ahead decode (ops/gpu_runahead.py, kernels/offload.cu) adds `host_map` (map_to_host): the
    same [L, E] map in page-locked host memory, which the device polls. There `unassign` clears an
    evicted expert's entry at once (before its slot can be overwritten), the copy engine publishes
    a new entry once the bytes land, and the device `table` is written only by the gate kernels.
    """

    def __init__(self, layout: ExpertLayout, n_slots: int, n_layers: int, n_experts: int):
        if n_slots < 1:
            raise ConfigError("an expert pool needs at least one slot")
        self.layout, self.n_slots, self.E = layout, int(n_slots), int(n_experts)
        self.stride = layout.blob_nbytes
        self.data = cupy.empty((self.n_slots, self.stride), dtype=cupy.uint8)
        self.table = cupy.full((n_layers, n_experts), -1, dtype=cupy.int32)
        self.err = cupy.zeros(1, dtype=cupy.int32)
        self.owner: dict[int, tuple[int, int]] = {}
        self.where: dict[tuple[int, int], int] = {}
        self.host_map: np.ndarray | None = None

    def map_to_host(self) -> np.ndarray:
        """Keep the slot map in page-locked host memory from now on (run-ahead decode)."""
        if self.host_map is None:
            import cupyx
            self.host_map = cupyx.empty_pinned(self.table.shape, dtype=np.int32)
            self.host_map[...] = self.table.get()
            self.progress = cupy.full(1, -1, dtype=cupy.int32)   # the gates' claim (offload.cu)
        return self.host_map

    def host_map_addr(self, layer: int, e: int = 0) -> int:
        return self.host_map.ctypes.data + (layer * self.E + e) * 4

    def unassign(self, slot: int) -> None:
        """An eviction (Prefetcher.load, before the copy into `slot` is queued): with a host map the
        device must stop finding the old expert there now, and the old expert is forgotten here, so
        the slot's next assign clears nothing: by then the old expert may have been copied again
        into another slot and published there by the copy stream, which the host learns only at a
        later poll (a -1 then would make its gate wait for a copy that has landed). Without a host
        map, assign clears it later."""
        if self.host_map is None:
            return
        old = self.owner.pop(slot, None)
        if old is not None and self.where.get(old) == slot:
            del self.where[old]
            self.host_map[old] = -1

    @property
    def base(self) -> int:
        return addr(self.data)

    def slot_array(self, slot: int):
        return self.data[slot]

    def put(self, slot: int, blob) -> None:
        self.data[slot, : blob.size] = upload_blob(blob).reshape(-1)

    def assign(self, layer: int, e: int, slot: int) -> None:
        """Point (layer, e) at slot (and unmap whatever held the slot before).

        Without a host map, eviction does not touch the pool (the previous holder's table entry is
        cleared here, one device write fewer per miss), so the previous holder may have been loaded
        again into another slot and assigned there first (its copy waited for out of order): then it
        stays mapped. With one, unassign forgot the previous holder at its eviction (see there)."""
        old = self.owner.pop(slot, None)
        mapped = self.host_map is not None
        if old is not None and self.where.get(old) == slot:
            del self.where[old]
            if mapped:
                self.host_map[old] = -1
            else:
                self.table[old[0], old[1]] = -1
        self.owner[slot] = (layer, e)
        self.where[(layer, e)] = slot
        if mapped:              # the copy stream published it already; this only repeats it
            self.host_map[layer, e] = slot
        else:
            self.table[layer, e] = slot

    def handle(self, layer: int, e: int) -> ExpertHandle:
        slot = self.where.get((layer, e))
        if slot is None:
            raise ConfigError(f"expert {e} of layer {layer} is not in the GPU pool")
        return ExpertHandle(self.base + slot * self.stride, self.layout, self.data)

    def check(self) -> None:
        """Raise if a kernel met an expert that was not resident (and clear the flag)."""
        err = int(self.err.get()[0])
        if err:
            self.err.fill(0)
            what = [m for bit, m in ((1, "an MoE kernel read an expert whose slot table entry is -1 (not resident)"),
                                     (2, "a run-ahead gate waited too long for an expert's copy"),
                                     (4, "a copy waited too long for a run-ahead gate's claim")) if err & bit]
            raise ConfigError("; ".join(what))

    @classmethod
    def resident(cls, source, layers=None) -> "ExpertPool":
        """Every expert of `source` (an EfFile-like weight source) in its own slot."""
        layers = list(source.expert_layers if layers is None else layers)
        cfg = source.config
        pool = cls(ExpertLayout.of(source), len(layers) * source.n_experts, cfg.n_layers, source.n_experts)
        for i, l in enumerate(layers):
            for e in range(source.n_experts):
                slot = i * source.n_experts + e
                pool.put(slot, source.expert_blob(l, e))
                pool.assign(l, e, slot)
        return pool


class PoolExperts(ExpertProvider):
    """ExpertProvider over a pool that already holds every expert the model will ask for."""

    def __init__(self, pool: ExpertPool):
        self.pool = pool
        self._layers: dict[int, dict | None] = {}     # layer_handles, made once a layer

    def begin_layer(self, layer: int, ids: np.ndarray):
        for e in np.unique(ids):
            yield int(e), self.pool.handle(layer, int(e))

    def layer_handles(self, layer: int) -> dict | None:
        """Every expert of the layer (a resident pool holds them all), or None if one is not.
        Made once a layer (the pool does not change under this provider): a prefill asks every layer."""
        if layer not in self._layers:
            where = self.pool.where
            self._layers[layer] = (None if any((layer, e) not in where for e in range(self.pool.E))
                                   else {e: self.pool.handle(layer, e) for e in range(self.pool.E)})
        return self._layers[layer]
