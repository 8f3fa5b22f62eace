"""GGUF checkpoints: metadata, and tensors in our canonical names, exact where our types allow.

GGUF lists a tensor's dimensions innermost first; everything here uses numpy order [rows, cols]
(a weight W is [N outputs, K inputs], as in quant.py). Parsing is the `gguf` package's reader
(a memory map); this module only interprets what it returns.

Exact mappings onto our stored types (no float round trip, bit-for-bit the same numbers):
  Q4_1  block of 32: d, m (fp16), 16 bytes of codes  w = q*d + m   -> q4 group 32, s=d, m=m
  Q4_0  block of 32: d (fp16), 16 bytes of codes     w = (q-8)*d   -> q4 group 32, s=d, m=-8d
  Q8_0  block of 32: d (fp16), 32 int8 codes         w = q*d       -> q8 group 32, s=d
  F32, F16, BF16                                                   -> f32, f16, bf16
GGUF packs a Q4 block as element j in the low nibble of byte j and element j+16 in its high
nibble; q4 packs elements 2j and 2j+1 into byte j, so the codes are re-packed, never re-derived.
Every other type (K-quants, Q5_*, IQ*) is dequantized by the gguf package and requantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from efengine import quant
from efengine.errors import CheckpointError

try:
    import gguf
    from gguf import GGMLQuantizationType as GT
except ImportError as e:  # pragma: no cover - gguf is a declared dependency
    raise CheckpointError("reading GGUF files needs the 'gguf' package: pip install gguf") from e

GGUF_GROUP = 32
NATIVE = {GT.Q4_0: "q4", GT.Q4_1: "q4", GT.Q8_0: "q8", GT.F32: "f32", GT.F16: "f16", GT.BF16: "bf16"}
# For "native" precision on a type we cannot hold exactly: the closest type that loses nothing
# more than the source already lost (4-bit-ish -> q4, 5/6-bit -> q8).
NEAREST = {GT.Q2_K: "q4", GT.Q3_K: "q4", GT.Q4_K: "q4", GT.IQ4_NL: "q4", GT.IQ4_XS: "q4",
           GT.Q5_0: "q8", GT.Q5_1: "q8", GT.Q5_K: "q8", GT.Q6_K: "q8"}


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a GGUF file (or one expert's slice of a stacked expert tensor).

    data: the raw GGUF array as the gguf reader gives it (a memmap view): [rows, bytes per row]
    for block types, [rows, cols] for float types. rows: optional row order to apply (undoes
    llama.cpp's rotary permutation of q and k); rows move whole, so exactness is kept.
    """
    name: str
    gtype: GT
    shape: tuple          # numpy order, e.g. (N, K)
    data: np.ndarray
    rows: np.ndarray | None = None

    @property
    def type_name(self) -> str:
        return self.gtype.name

    def _raw(self) -> np.ndarray:
        d = self.data
        if d.ndim == 1 and len(self.shape) == 2:
            d = d.reshape(self.shape[0], -1)
        return d if self.rows is None else d[self.rows]

    def float32(self) -> np.ndarray:
        """Dequantized by the gguf package (its reference), shaped like the tensor."""
        try:
            w = gguf.quants.dequantize(np.ascontiguousarray(self._raw()), self.gtype)
        except NotImplementedError:
            raise CheckpointError(f"GGUF tensor {self.name}: type {self.type_name} cannot be dequantized "
                                  "by the installed gguf package; upgrade it (pip install -U gguf)") from None
        return np.asarray(w, np.float32).reshape(self.shape)

    def native_type(self) -> tuple[str, int] | None:
        """(our type, group) that holds this tensor exactly, or None."""
        t = NATIVE.get(self.gtype)
        if t is None or (t in quant.QUANT_TYPES and len(self.shape) != 2):
            return None
        return t, (GGUF_GROUP if t in quant.QUANT_TYPES else quant.DEFAULT_GROUP)

    def nearest_type(self) -> tuple[str, int]:
        """What "native" precision means for this tensor: exact if possible, else the closest."""
        nt = self.native_type()
        if nt is not None:
            return nt
        t = NEAREST.get(self.gtype, "f16")
        if t in quant.QUANT_TYPES and len(self.shape) != 2:
            t = "f32"
        return t, GGUF_GROUP if t in quant.QUANT_TYPES else quant.DEFAULT_GROUP

    def native_bytes(self) -> np.ndarray:
        """Our stored bytes for native_type(), re-packed from the GGUF blocks without rounding."""
        nt = self.native_type()
        if nt is None:
            raise CheckpointError(f"GGUF tensor {self.name}: {self.type_name} has no exact counterpart")
        qtype, group = nt
        raw = np.ascontiguousarray(self._raw())
        if qtype in quant.FLOAT_TYPES:
            return raw.reshape(-1).view(np.uint8)
        n, k = self.shape
        blocks = raw.reshape(n, k // GGUF_GROUP, -1)
        out = np.zeros(quant.nbytes(qtype, self.shape, group), np.uint8)
        v = quant.views(out, qtype, self.shape, group)
        d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]
        if qtype == "q8":
            v["q"][...] = blocks[:, :, 2:].copy().view(np.int8).reshape(n, k)
            v["s"][...] = d
            return out
        if self.gtype == GT.Q4_1:
            m, qs = blocks[:, :, 2:4].copy().view(np.float16)[..., 0], blocks[:, :, 4:]
        else:
            # -8*d is exact in fp16 (a power-of-two scale) unless it overflows, checked below
            m, qs = (d.astype(np.float32) * -8.0).astype(np.float16), blocks[:, :, 2:]
            bad = np.isfinite(d) & ~np.isfinite(m)
            if bad.any():
                raise CheckpointError(f"GGUF tensor {self.name}: a Q4_0 scale is too large for an exact q4 copy")
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(n, k)   # element order restored
        v["q"][...] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        v["s"][...], v["m"][...] = d, m
        return out

    def encode(self, qtype: str, group: int) -> np.ndarray:
        """Stored bytes in (qtype, group): exact re-pack when that is the native mapping."""
        nt = self.native_type()
        if nt is not None and nt[0] == qtype and (qtype in quant.FLOAT_TYPES or nt[1] == group):
            return self.native_bytes()
        return quant.quantize(self.float32(), qtype, group)

    def expert(self, e: int) -> "GgufTensor":
        """Expert e of a stacked [E, N, K] expert tensor."""
        return GgufTensor(f"{self.name}[{e}]", self.gtype, self.shape[1:], self.data[e], None)

    def reshaped(self, shape: tuple) -> "GgufTensor":
        if int(np.prod(shape)) != int(np.prod(self.shape)):
            raise CheckpointError(f"GGUF tensor {self.name}: shape {self.shape} cannot become {shape}")
        data = self.data.reshape(-1) if len(shape) == 1 else self.data
        return GgufTensor(self.name, self.gtype, tuple(shape), data, self.rows)


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation for interleaved rotary.

    llama.cpp's converter stores each head's rows as (pair, half) where HF has (half, pair), so
    that adjacent rows rotate together. Reading row p of the GGUF at HF row r gives back HF's
    half-split layout, which our rotary (NeoX style, like HF) expects.
    """
    hd = n_rows // n_head
    # GGUF row index of each HF row: HF (h, half, i) sits at GGUF (h, i, half)
    h, half, i = np.meshgrid(np.arange(n_head), np.arange(2), np.arange(hd // 2), indexing="ij")
    return (h * hd + i * 2 + half).reshape(-1)


class GgufFile:
    """A GGUF file opened for conversion: .kv metadata and .tensor(name) in numpy order."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except Exception as e:  # noqa: BLE001 - the gguf parser raises bare ValueErrors and friends
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        self.kv, self.undecodable = {}, set()
        for k, f in self.reader.fields.items():
            if k.startswith("GGUF."):
                continue
            try:
                self.kv[k] = f.contents()
            except Exception:  # noqa: BLE001 - e.g. strings that are not UTF-8; fatal only where needed
                self.kv[k] = None
                self.undecodable.add(k)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.kv.get("general.architecture")
        if not isinstance(self.arch, str):
            raise CheckpointError(f"{path}: GGUF metadata lacks general.architecture")

    def get(self, key: str, default=None):
        """Metadata value; keys starting with '.' are relative to the architecture ('.block_count')."""
        if key.startswith("."):
            key = self.arch + key
        v = self.kv.get(key)
        return default if v is None else v

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            full = self.arch + key if key.startswith(".") else key
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {full}")
        return v

    def names(self) -> list[str]:
        return list(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def tensor(self, name: str) -> GgufTensor:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path}: GGUF has no tensor {name!r}")
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))
        # the gguf reader drops trailing 1-sized dims from the numpy view; keep the declared shape
        return GgufTensor(name, GT(int(t.tensor_type)), shape, t.data)
