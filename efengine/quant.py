"""Reference quantizers: numpy, deterministic, shared by the converter and every backend.

Stored types (W is a weight matrix [N, K]: N output rows, K inputs; groups run along K):
  f32, f16, bf16  passthrough (bf16 kept as raw uint16 bits)
  q8   symmetric int8:  w = q * s            q int8  [N, Kp],    s f16 [N, G]
  q4   affine 4-bit:    w = q * s + m        q uint8 [N, Kp/2],  s, m f16 [N, G]
       two codes a byte, element 2j in the low nibble, 2j+1 in the high one.
Kp is K rounded up to a whole number of groups (zero padded), G = Kp / group.
q4 with group 32 holds GGUF Q4_0 and Q4_1 blocks exactly, q8 with group 32 holds Q8_0.

A quantized tensor is one contiguous region: parts q, s, m in that order, each starting on a
256-byte boundary so kernels can read them with aligned vector loads.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

PART_ALIGN = 256
QUANT_TYPES = ("q4", "q8")
FLOAT_TYPES = ("f32", "f16", "bf16")
TYPES = QUANT_TYPES + FLOAT_TYPES
DEFAULT_GROUP = 64
_NP = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Part:
    name: str       # "q", "s", "m" or "w" for float types
    offset: int     # bytes from the tensor's start
    shape: tuple
    dtype: type

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def layout(qtype: str, shape, group: int = DEFAULT_GROUP) -> tuple[list[Part], int]:
    """Parts of a stored tensor and its total size in bytes."""
    shape = tuple(int(d) for d in shape)
    if qtype in FLOAT_TYPES:
        p = Part("w", 0, shape, _NP[qtype])
        return [p], p.nbytes
    if qtype not in QUANT_TYPES:
        raise ConfigError(f"unknown tensor type {qtype!r}; known: {', '.join(TYPES)}")
    if len(shape) != 2:
        raise ConfigError(f"{qtype} needs a 2-D weight, got shape {shape}")
    if group <= 0 or group % 2:
        raise ConfigError(f"group size must be a positive even number, got {group}")
    n, k = shape
    kp = _align(k, group)
    g = kp // group
    if qtype == "q4":
        specs = [("q", (n, kp // 2), np.uint8), ("s", (n, g), np.float16), ("m", (n, g), np.float16)]
    else:
        specs = [("q", (n, kp), np.int8), ("s", (n, g), np.float16)]
    parts, off = [], 0
    for name, shp, dt in specs:
        off = _align(off, PART_ALIGN)
        parts.append(Part(name, off, shp, dt))
        off += parts[-1].nbytes
    return parts, off


def nbytes(qtype: str, shape, group: int = DEFAULT_GROUP) -> int:
    return layout(qtype, shape, group)[1]


def views(buf: np.ndarray, qtype: str, shape, group: int = DEFAULT_GROUP) -> dict[str, np.ndarray]:
    """Zero-copy numpy views of each part inside `buf` (uint8, at least nbytes long)."""
    parts, total = layout(qtype, shape, group)
    if buf.nbytes < total:
        raise ValueError(f"buffer of {buf.nbytes} bytes is smaller than the {total} a {qtype} {tuple(shape)} needs")
    out = {}
    for p in parts:
        out[p.name] = buf[p.offset:p.offset + p.nbytes].view(p.dtype).reshape(p.shape)
    return out


# ---- float conversions ---------------------------------------------------------------------

def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bf16 bits (uint16), NaN kept NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---- quantize / dequantize -----------------------------------------------------------------

def _grouped(w: np.ndarray, group: int) -> np.ndarray:
    """[N, K] float32 -> [N, G, group], zero padded along K."""
    n, k = w.shape
    kp = _align(k, group)
    if kp != k:
        w = np.concatenate([w, np.zeros((n, kp - k), np.float32)], axis=1)
    return w.reshape(n, kp // group, group)


def quantize(w: np.ndarray, qtype: str, group: int = DEFAULT_GROUP, err: list | None = None) -> np.ndarray:
    """Any float array -> the stored bytes (uint8, length nbytes(qtype, shape, group)).

    err: for q4/q8, a one-element list to which the squared error ||dequantize(result) - w||^2 is
    added, computed on the fly with the same float32 operations dequantize uses (no second pass).
    """
    w = np.asarray(w)
    parts, total = layout(qtype, w.shape, group)
    out = np.zeros(total, np.uint8)
    v = views(out, qtype, w.shape, group)
    if qtype == "f32":
        v["w"][...] = w.astype(np.float32)
    elif qtype == "f16":
        v["w"][...] = w.astype(np.float32).astype(np.float16)
    elif qtype == "bf16":
        v["w"][...] = w.view(np.uint16) if w.dtype == np.uint16 else f32_to_bf16(w.astype(np.float32))
    elif qtype == "q8":
        q, s = quantize_q8(w.astype(np.float32, copy=False), group, err)
        v["q"][...], v["s"][...] = q, s
    else:
        q, s, m = quantize_q4(w.astype(np.float32, copy=False), group, err)
        v["q"][...], v["s"][...], v["m"][...] = q, s, m
    return out


# Rows are quantized in chunks of about _CHUNK elements: the temporaries then stay in cache and
# are not fresh page-faulted allocations, which makes a full matrix ~5x faster. Every operation is
# per group, so the bytes do not depend on the chunk size.
_CHUNK = 1 << 18


def _row_steps(n: int, k: int):
    step = max(1, _CHUNK // max(k, 1))
    for r0 in range(0, n, step):
        yield r0, min(n, r0 + step)


def _add_error(err: list | None, rec: np.ndarray, g: np.ndarray, k: int) -> None:
    """err[0] += ||rec - g||^2 over the first k columns (the rest is padding); rec is overwritten."""
    if err is None:
        return
    rec -= g
    d = rec.reshape(rec.shape[0], -1)[:, :k]
    d = d.reshape(-1) if d.flags.c_contiguous else d.ravel()
    err[0] += float(np.dot(d, d))


def quantize_q8(w: np.ndarray, group: int, err: list | None = None):
    """float32 [N, K] -> codes int8 [N, Kp], scales f16 [N, G]."""
    n, k = w.shape
    kp = _align(k, group)
    q, s = np.empty((n, kp), np.int8), np.empty((n, kp // group), np.float16)
    for r0, r1 in _row_steps(n, kp):
        q[r0:r1], s[r0:r1] = _q8_rows(w[r0:r1], group, err)
    return q, s


def _q8_rows(w: np.ndarray, group: int, err: list | None):
    g = _grouped(w, group)
    amax = np.abs(g).max(axis=2)
    s = (amax / np.float32(127.0)).astype(np.float16)
    sf = s.astype(np.float32)
    inv = np.divide(np.float32(1.0), sf, out=np.zeros_like(sf), where=sf > 0)
    x = g * inv[..., None]
    np.rint(x, out=x)
    np.clip(x, -127, 127, out=x)
    q = x.astype(np.int8).reshape(w.shape[0], -1)
    if err is not None:
        x *= sf[..., None]                    # = dequantize: codes * scale
        _add_error(err, x, g, w.shape[1])
    return q, s


def quantize_q4(w: np.ndarray, group: int, err: list | None = None):
    """float32 [N, K] -> packed codes uint8 [N, Kp/2], scales and minimums f16 [N, G]."""
    n, k = w.shape
    kp = _align(k, group)
    packed = np.empty((n, kp // 2), np.uint8)
    s, m = np.empty((n, kp // group), np.float16), np.empty((n, kp // group), np.float16)
    for r0, r1 in _row_steps(n, kp):
        packed[r0:r1], s[r0:r1], m[r0:r1] = _q4_rows(w[r0:r1], group, err)
    return packed, s, m


def _q4_rows(w: np.ndarray, group: int, err: list | None):
    g = _grouped(w, group)
    lo, hi = g.min(axis=2), g.max(axis=2)
    # Scale and offset are rounded to fp16 first and the codes chosen against the rounded
    # values, so dequantization reproduces exactly what the error report measured.
    m = lo.astype(np.float16)
    s = ((hi - m.astype(np.float32)) / np.float32(15.0)).astype(np.float16)
    sf, mf = s.astype(np.float32), m.astype(np.float32)
    inv = np.divide(np.float32(1.0), sf, out=np.zeros_like(sf), where=sf > 0)
    x = g - mf[..., None]
    x *= inv[..., None]
    np.rint(x, out=x)
    np.clip(x, 0, 15, out=x)
    q = x.astype(np.uint8).reshape(w.shape[0], -1)
    if err is not None:
        x *= sf[..., None]                    # = dequantize: codes * scale + min
        x += mf[..., None]
        _add_error(err, x, g, w.shape[1])
    return q[:, 0::2] | (q[:, 1::2] << 4), s, m


def unpack_q4(packed: np.ndarray) -> np.ndarray:
    """uint8 [N, Kp/2] -> codes uint8 [N, Kp]."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    q[:, 0::2] = packed & 0x0F
    q[:, 1::2] = packed >> 4
    return q


def dequantize(buf: np.ndarray, qtype: str, shape, group: int = DEFAULT_GROUP) -> np.ndarray:
    """Stored bytes -> float32 array of `shape`."""
    v = views(buf, qtype, shape, group)
    if qtype == "f32":
        return np.array(v["w"], np.float32)
    if qtype == "f16":
        return v["w"].astype(np.float32)
    if qtype == "bf16":
        return bf16_to_f32(v["w"]).reshape(shape)
    n, k = shape
    out = np.empty((n, k), np.float32)
    for r0, r1 in _row_steps(n, v["s"].shape[1] * group):
        part = {p: a[r0:r1] for p, a in v.items()}
        out[r0:r1] = _dequant_rows(part, qtype, group)[:, :k]
    return out


def _dequant_rows(v: dict, qtype: str, group: int) -> np.ndarray:
    n = v["s"].shape[0]
    s = v["s"].astype(np.float32)[..., None]
    if qtype == "q8":
        g = v["q"].astype(np.float32).reshape(n, -1, group)
        g *= s
    else:
        g = unpack_q4(v["q"]).astype(np.float32).reshape(n, -1, group)
        g *= s
        g += v["m"].astype(np.float32)[..., None]
    return g.reshape(n, -1)


def rel_rms(ref: np.ndarray, got: np.ndarray) -> float:
    """Relative RMS error ||got - ref|| / ||ref|| (0 for an all-zero reference matched exactly)."""
    ref = np.asarray(ref, np.float64)
    num = float(np.sqrt(np.mean((np.asarray(got, np.float64) - ref) ** 2)))
    den = float(np.sqrt(np.mean(ref ** 2)))
    return num / den if den > 0 else num
