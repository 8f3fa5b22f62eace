"""A full-size synthetic model made directly on the GPU (for `efengine bench`).

Writing a 25 GB random .ef and reading it back takes minutes; speed does not depend on the
values, so the bench builds the stored bytes of every tensor and expert with random kernels on
the device instead: same shapes, same stored types and layout as `efconvert --random` writes.
Values are scaled like a trained model's (weights ~ 1/sqrt(K)) so activations stay finite.

DeviceRandomSource is a weight source (config, tensors, has, raw, load, expert_layout,
blob_nbytes, expert_layers, n_experts, expert_blob) whose raw() and expert_blob() return device
arrays, which the cupy backend takes as they are.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

from .. import quant
from ..config import ModelConfig
from ..errors import ConfigError
from ..format import TensorInfo, expert_layout
from .gpu_kernels import cdiv, cupy, f32, i64, launch, u64
from .gpu_weights import ExpertLayout, ExpertPool


def _fill_f16(addr: int, n: int, seed: int, lo: float, hi: float) -> None:
    launch("misc", "fill_random_f16", (min(cdiv(n, 256), 65536),), (256,),
           (u64(addr), i64(n), np.uint32(seed), f32(lo), f32(hi)))


def _fill_f32(addr: int, n: int, seed: int, lo: float, hi: float) -> None:
    launch("misc", "fill_random_f32", (min(cdiv(n, 256), 65536),), (256,),
           (u64(addr), i64(n), np.uint32(seed), f32(lo), f32(hi)))


def fill_tensor(base: int, qtype: str, shape, group: int, seed: int, amp: float) -> None:
    """Random stored bytes of a tensor at `base` (within `buf`): values ~ uniform(-amp, amp)."""
    parts, total = quant.layout(qtype, shape, group)
    off = {p.name: p for p in parts}
    if qtype == "f32":
        _fill_f32(base, total // 4, seed, -amp, amp)
    elif qtype in ("f16", "bf16"):
        _fill_f16(base, total // 2, seed, -amp, amp)    # bf16 bits of fp16 values: finite, any scale
    else:
        _fill_u32_range(base, total, seed)
        s, n = off["s"], int(np.prod(off["s"].shape))
        if qtype == "q4":
            _fill_f16(base + s.offset, n, seed + 1, 1.8 * amp / 15, 2.2 * amp / 15)
            _fill_f16(base + off["m"].offset, n, seed + 2, -1.1 * amp, -0.9 * amp)
        else:
            _fill_f16(base + s.offset, n, seed + 1, 0.9 * amp / 127, 1.1 * amp / 127)


def _fill_u32_range(base: int, nbytes: int, seed: int) -> None:
    n = nbytes // 4
    launch("misc", "fill_random_u32", (min(cdiv(n, 256), 65536),), (256,), (u64(base), i64(n), np.uint32(seed)))


class DeviceRandomSource:
    """Weight source of `cfg` with random stored bytes made on the device (see module doc)."""

    def __init__(self, cfg: ModelConfig, experts: str = "q4", dense: str = "q8", embed: str | None = None,
                 group: int = quant.DEFAULT_GROUP, seed: int = 0):
        import efmodels
        from efmodels.base import DENSE, EMBED, EXPERTS, NORM, ROUTER
        for t in (experts, dense, embed or dense):
            if t not in quant.TYPES:
                raise ConfigError(f"unknown tensor type {t!r}; known: {', '.join(quant.TYPES)}")
        self.config, self.group, self.seed = cfg, group, seed
        prec = {EXPERTS: experts, DENSE: dense, EMBED: embed or dense, NORM: "f32", ROUTER: "f32"}
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, cls in efmodels.expected_tensors(cfg):
            qt = prec[cls] if len(shape) == 2 else "f32"
            self.tensors[name] = TensorInfo(name, qt, tuple(shape), group, 0, quant.nbytes(qt, shape, group))
        self.expert_layers = list(cfg.moe_layers)
        self.n_experts = cfg.n_experts
        if cfg.is_moe:
            specs = {p: (experts, s, group) for p, s in efmodels.expert_shapes(cfg).items()}
            self.expert_layout, self.blob_nbytes = expert_layout(specs)
        self._made: dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def _seed(self, name: str) -> int:
        return (zlib.crc32(f"{name}/{self.seed}".encode()) & 0x7FFFFFFF) | 1

    def raw(self, name: str):
        """Device bytes of a matrix (made on first use)."""
        t = self.tensors[name]
        buf = self._made.get(name)
        if buf is None:
            buf = cupy.empty(t.nbytes, dtype=cupy.uint8)
            amp = 1.0 if name == "token_embd.weight" else math.sqrt(3.0 / t.shape[-1])
            fill_tensor(int(buf.data.ptr), t.type, t.shape, t.group, self._seed(name), amp)
            self._made[name] = buf
        return buf

    def load(self, name: str) -> np.ndarray:
        """float32 on the host: 1-D tensors (norm weights ~ 1, biases ~ 0); matrices dequantized
        from their device bytes (for the numpy reference on small shapes)."""
        t = self.tensors[name]
        rng = np.random.default_rng(self._seed(name))
        if name.endswith(".bias"):
            return rng.uniform(-0.1, 0.1, t.shape).astype(np.float32)
        if len(t.shape) == 1:
            return rng.uniform(0.9, 1.1, t.shape).astype(np.float32)
        return quant.dequantize(cupy.asnumpy(self.raw(name)), t.type, t.shape, t.group)

    def expert_weights(self, layer: int, e: int) -> dict[str, np.ndarray]:
        blob = cupy.asnumpy(self.expert_blob(layer, e))
        return {p: quant.dequantize(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group)
                for p, t in self.expert_layout.items()}

    def fill_blob(self, base: int, layer: int, e: int) -> None:
        for p, t in self.expert_layout.items():
            fill_tensor(base + t.offset, t.type, t.shape, t.group,
                        self._seed(f"{layer}.{e}.{p}"), math.sqrt(3.0 / t.shape[1]))

    def expert_blob(self, layer: int, e: int):
        blob = cupy.zeros(self.blob_nbytes, dtype=cupy.uint8)
        self.fill_blob(int(blob.data.ptr), layer, e)
        return blob

    def pool(self) -> ExpertPool:
        """Every expert resident in its own slot of a new pool."""
        cfg = self.config
        pool = ExpertPool(ExpertLayout(self.expert_layout, self.blob_nbytes),
                          len(self.expert_layers) * self.n_experts, cfg.n_layers, self.n_experts)
        for i, l in enumerate(self.expert_layers):
            for e in range(self.n_experts):
                slot = i * self.n_experts + e
                self.fill_blob(pool.base + slot * pool.stride, l, e)
                pool.assign(l, e, slot)
        return pool
