"""The .ef file: one file holds a whole model (weights, config, tokenizer, chat template).

Layout (little endian):
  0   8 bytes  magic b"EFENGINE"
  8   u32      format version (VERSION)
  12  u32      flags (0)
  16  u64      header length in bytes
  24  u64      data offset (a multiple of ALIGN)
  32  ...      header: UTF-8 JSON, then spaces up to the data offset
  data         every tensor, file and expert blob starts on an ALIGN boundary

Header JSON:
  arch, config      the architecture family and its normalized hyper-parameters (config.py)
  meta              free-form: source, quantization, measured error, tokenizer settings
  tensors           name -> {type, shape, group, offset, nbytes, crc32}     (dense, per tensor)
  experts           {layers, count, blob_nbytes, offset, layout, crc32[layer][expert]}
                    blob of (i-th MoE layer, expert e) at offset + (i*count + e) * blob_nbytes;
                    layout: gate/up/down -> {type, shape, group, offset, nbytes} inside a blob
  files             name -> {offset, nbytes, crc32}: tokenizer.json, tokenizer.model, ...

One contiguous aligned blob per expert lets one DMA move one expert and makes the GPU cache a
pool of equal slots. The header is written twice: once with space reserved before the data,
and again at the end with checksums and late metadata; the file appears only once complete.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import quant
from .errors import FormatError

MAGIC = b"EFENGINE"
VERSION = 1
ALIGN = 4096
PREFIX = struct.Struct("<8sIIQQ")
HEADER_SLACK = 1 << 20   # room for metadata only known at the end (quantization error report)
EXPERT_PARTS = ("gate", "up", "down")


def align(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def crc32(buf) -> str:
    """Checksum as 8 hex digits; chunked so huge memmaps are not copied."""
    mv = memoryview(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    c, step = 0, 1 << 26
    for i in range(0, len(mv), step):
        c = zlib.crc32(mv[i:i + step], c)
    return f"{c & 0xFFFFFFFF:08x}"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str
    shape: tuple
    group: int
    offset: int          # absolute in the file (dense) or inside the blob (expert parts)
    nbytes: int

    def to_json(self) -> dict:
        return {"type": self.type, "shape": list(self.shape), "group": self.group,
                "offset": self.offset, "nbytes": self.nbytes}


def expert_layout(specs: dict[str, tuple[str, tuple, int]]) -> tuple[dict[str, TensorInfo], int]:
    """gate/up/down -> (type, shape, group) => their places inside one blob, and its size."""
    out, off = {}, 0
    for part in EXPERT_PARTS:
        qtype, shape, group = specs[part]
        off = quant._align(off, quant.PART_ALIGN)
        n = quant.nbytes(qtype, shape, group)
        out[part] = TensorInfo(part, qtype, tuple(shape), group, off, n)
        off += n
    return out, align(off)


# ---- writing --------------------------------------------------------------------------------

class Writer:
    """Streams a .ef file: plan every tensor first, then write them in any order.

    with Writer(path, arch, config, meta) as w:
        w.plan_tensor(name, qtype, shape, group); w.plan_experts(layers, count, specs); w.plan_file(n, size)
        w.begin()
        w.write_tensor(name, bytes); w.write_expert(i, e, blob); w.write_file(name, bytes)
        w.meta[...] = ...                      # late metadata allowed until close
    The target appears (atomic rename) only when every planned piece was written.
    """

    def __init__(self, path, arch: str, config: dict, meta: dict | None = None):
        self.path = Path(path)
        self.arch, self.config, self.meta = arch, dict(config), dict(meta or {})
        self.tensors: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        self.experts: dict | None = None
        self._f = None
        self._tmp = None
        self._pending: set = set()

    # planning
    def plan_tensor(self, name: str, qtype: str, shape, group: int = quant.DEFAULT_GROUP) -> None:
        if name in self.tensors:
            raise ValueError(f"tensor {name} planned twice")
        n = quant.nbytes(qtype, shape, group)
        self.tensors[name] = {"type": qtype, "shape": [int(s) for s in shape], "group": int(group),
                              "offset": 0, "nbytes": n, "crc32": ""}

    def plan_file(self, name: str, nbytes: int) -> None:
        self.files[name] = {"offset": 0, "nbytes": int(nbytes), "crc32": ""}

    def plan_experts(self, layers, count: int, specs: dict[str, tuple[str, tuple, int]]) -> int:
        lay, blob = expert_layout(specs)
        self.experts = {"layers": [int(l) for l in layers], "count": int(count), "blob_nbytes": blob,
                        "offset": 0, "layout": {k: v.to_json() for k, v in lay.items()},
                        "crc32": [[""] * count for _ in layers]}
        return blob

    def _header_bytes(self) -> bytes:
        h = {"format": "efengine", "version": VERSION, "arch": self.arch, "config": self.config,
             "meta": self.meta, "tensors": self.tensors, "experts": self.experts, "files": self.files}
        return json.dumps(h, separators=(",", ":"), sort_keys=False).encode()

    def begin(self) -> None:
        """Assign offsets, create the temporary file at full size, write the provisional header."""
        # Offsets must be final before the header is sized; use a large placeholder offset so
        # the header measured here is no shorter than the final one.
        self.data_offset = align(PREFIX.size + len(self._header_bytes()) + HEADER_SLACK)
        off = self.data_offset
        for t in list(self.tensors.values()) + list(self.files.values()):
            t["offset"] = off
            off = align(off + t["nbytes"])
        if self.experts:
            self.experts["offset"] = off
            off += len(self.experts["layers"]) * self.experts["count"] * self.experts["blob_nbytes"]
        self.total = off
        self.path.parent.mkdir(parents=True, exist_ok=True) if not self.path.parent.exists() else None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".part", dir=self.path.parent)
        self._tmp = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(fd, 0o666 & ~umask)      # mkstemp makes 0600; the model file is an ordinary file
        self._f = os.fdopen(fd, "r+b")
        self._f.truncate(self.total)
        self._pending = set(self.tensors) | {("file", n) for n in self.files}
        if self.experts:
            self._pending |= {(i, e) for i in range(len(self.experts["layers"]))
                              for e in range(self.experts["count"])}
        self._write_header()

    def _write_header(self) -> None:
        hb = self._header_bytes()
        if PREFIX.size + len(hb) > self.data_offset:
            raise FormatError(f"{self.path}: header grew past its reserved space ({len(hb)} bytes)")
        self._f.seek(0)
        self._f.write(PREFIX.pack(MAGIC, VERSION, 0, len(hb), self.data_offset))
        self._f.write(hb)
        self._f.write(b" " * (self.data_offset - PREFIX.size - len(hb)))

    def _put(self, offset: int, expect: int, data, what: str) -> str:
        buf = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if buf.nbytes > expect:
            raise ValueError(f"{what}: {buf.nbytes} bytes given, {expect} planned")
        self._f.seek(offset)
        self._f.write(memoryview(buf))
        return crc32(buf) if buf.nbytes == expect else crc32(np.concatenate([buf, np.zeros(expect - buf.nbytes, np.uint8)]))

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        t = self.tensors[name]
        t["crc32"] = self._put(t["offset"], t["nbytes"], data, f"tensor {name}")
        self._pending.discard(name)

    def write_file(self, name: str, data: bytes) -> None:
        t = self.files[name]
        t["crc32"] = self._put(t["offset"], t["nbytes"], np.frombuffer(data, np.uint8), f"file {name}")
        self._pending.discard(("file", name))

    def expert_offset(self, i: int, e: int) -> int:
        x = self.experts
        return x["offset"] + (i * x["count"] + e) * x["blob_nbytes"]

    def write_expert(self, i: int, e: int, blob: np.ndarray, crc: str | None = None) -> None:
        """Blob of the i-th MoE layer's expert e (at most blob_nbytes; the rest stays zero)."""
        x = self.experts
        if crc is None:
            crc = self._put(self.expert_offset(i, e), x["blob_nbytes"], blob, f"expert {i}.{e}")
        else:
            self._f.seek(self.expert_offset(i, e))
            self._f.write(memoryview(np.ascontiguousarray(blob).reshape(-1).view(np.uint8)))
        x["crc32"][i][e] = crc
        self._pending.discard((i, e))

    def close(self) -> Path:
        if self._pending:
            missing = sorted(map(str, self._pending))[:5]
            raise FormatError(f"{self.path}: {len(self._pending)} planned pieces never written, e.g. {missing}")
        self._write_header()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        if et is None:
            try:
                self.close()
            except BaseException:
                self.abort()       # a failed close (pieces never written, disk full) leaves no file
                raise
        else:
            self.abort()
        return False


# ---- reading --------------------------------------------------------------------------------

class EfFile:
    """A memory-mapped .ef file, validated on open (everything read later is inside the file)."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
        except OSError as e:
            raise FormatError(f"{path}: cannot open ({e.strerror})") from None
        if size < PREFIX.size:
            raise FormatError(f"{path}: not a .ef file (only {size} bytes)")
        self.mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        magic, version, _, hlen, data_off = PREFIX.unpack(bytes(self.mm[:PREFIX.size]))
        if magic != MAGIC:
            raise FormatError(f"{path}: not a .ef file (magic {magic!r}, expected {MAGIC!r})")
        if version > VERSION:
            raise FormatError(f"{path}: .ef format version {version} is newer than this efengine reads "
                              f"(up to {VERSION}); upgrade efengine")
        if version < 1:
            raise FormatError(f"{path}: invalid .ef format version {version}")
        if PREFIX.size + hlen > size or data_off > size or PREFIX.size + hlen > data_off:
            raise FormatError(f"{path}: truncated or corrupt header (header {hlen} bytes, file {size})")
        try:
            h = json.loads(bytes(self.mm[PREFIX.size:PREFIX.size + hlen]).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{path}: header is not valid JSON ({e})") from None
        self.size = size
        self.header = h
        self._validate(h)
        self.arch = h["arch"]
        self.meta = h.get("meta", {})
        self._config = None

    def _fail(self, what: str):
        raise FormatError(f"{self.path}: {what}")

    def _check_range(self, what: str, off, n) -> None:
        if not isinstance(off, int) or not isinstance(n, int) or off < 0 or n < 0:
            self._fail(f"{what}: bad offset/size {off!r}/{n!r}")
        if off % ALIGN:
            self._fail(f"{what}: offset {off} is not {ALIGN}-aligned")
        if off + n > self.size:
            self._fail(f"{what}: bytes {off}..{off + n} lie outside the file ({self.size} bytes): truncated?")

    def _check_tensor(self, what: str, t: dict, absolute: bool = True) -> TensorInfo:
        try:
            info = TensorInfo(what, t["type"], tuple(int(d) for d in t["shape"]), int(t["group"]),
                              int(t["offset"]), int(t["nbytes"]))
        except (KeyError, TypeError, ValueError):
            self._fail(f"tensor {what}: malformed entry {t!r}")
        if info.type not in quant.TYPES:
            self._fail(f"tensor {what}: unknown type {info.type!r}")
        try:
            need = quant.nbytes(info.type, info.shape, info.group)
        except Exception as e:  # noqa: BLE001 - any layout failure means a corrupt entry
            self._fail(f"tensor {what}: {e}")
        if need != info.nbytes:
            self._fail(f"tensor {what}: {info.nbytes} bytes recorded, {need} needed for {info.type} {info.shape}")
        if absolute:
            self._check_range(f"tensor {what}", info.offset, info.nbytes)
        return info

    def _validate(self, h: dict) -> None:
        for key in ("arch", "config", "tensors", "files"):
            if key not in h:
                self._fail(f"header lacks {key!r}")
        self.tensors = {n: self._check_tensor(n, t) for n, t in h["tensors"].items()}
        self.files = {}
        for n, f in h["files"].items():
            self._check_range(f"file {n}", f.get("offset"), f.get("nbytes"))
            self.files[n] = f
        x = h.get("experts")
        self.expert_layers: list[int] = []
        if x:
            try:
                self.expert_layers = [int(l) for l in x["layers"]]
                self.n_experts, self.blob_nbytes, self.experts_offset = int(x["count"]), int(x["blob_nbytes"]), int(x["offset"])
                layout = x["layout"]
            except (KeyError, TypeError, ValueError):
                self._fail("malformed experts table")
            self.expert_layout = {p: self._check_tensor(f"expert.{p}", layout[p], absolute=False)
                                  for p in EXPERT_PARTS}
            for p in self.expert_layout.values():
                if p.offset + p.nbytes > self.blob_nbytes:
                    self._fail(f"expert part {p.name} lies outside its blob")
            self._check_range("expert blobs", self.experts_offset,
                              len(self.expert_layers) * self.n_experts * self.blob_nbytes)
            if self.blob_nbytes % ALIGN:
                self._fail(f"expert blob size {self.blob_nbytes} is not {ALIGN}-aligned")
            self._layer_index = {l: i for i, l in enumerate(self.expert_layers)}

    # accessors
    @property
    def config(self):
        if self._config is None:
            from .config import ModelConfig
            self._config = ModelConfig.from_dict(self.header["config"], source=str(self.path))
        return self._config

    def has(self, name: str) -> bool:
        return name in self.tensors

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors.get(name)
        if t is None:
            self._fail(f"no tensor {name!r}")
        return self.mm[t.offset:t.offset + t.nbytes]

    def load(self, name: str) -> np.ndarray:
        t = self.tensors[name] if name in self.tensors else self._fail(f"no tensor {name!r}")
        return quant.dequantize(self.raw(name), t.type, t.shape, t.group)

    def file(self, name: str) -> bytes | None:
        f = self.files.get(name)
        return None if f is None else bytes(self.mm[f["offset"]:f["offset"] + f["nbytes"]])

    def expert_offset(self, layer: int, e: int) -> int:
        i = self._layer_index[layer]
        return self.experts_offset + (i * self.n_experts + e) * self.blob_nbytes

    def expert_blob(self, layer: int, e: int) -> np.ndarray:
        o = self.expert_offset(layer, e)
        return self.mm[o:o + self.blob_nbytes]

    def expert_weights(self, layer: int, e: int) -> dict[str, np.ndarray]:
        """gate [I, D], up [I, D], down [D, I] of one expert, dequantized to float32."""
        blob = self.expert_blob(layer, e)
        return {p: quant.dequantize(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group)
                for p, t in self.expert_layout.items()}

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Names of every piece whose checksum does not match (empty: the file is intact)."""
        bad = []
        for n, t in self.tensors.items():
            if crc32(self.raw(n)) != self.header["tensors"][n]["crc32"]:
                bad.append(n)
            progress and progress(t.nbytes)
        for n, f in self.files.items():
            if crc32(self.mm[f["offset"]:f["offset"] + f["nbytes"]]) != f["crc32"]:
                bad.append(f"file {n}")
            progress and progress(f["nbytes"])
        for i, l in enumerate(self.expert_layers):
            for e in range(self.n_experts):
                if crc32(self.expert_blob(l, e)) != self.header["experts"]["crc32"][i][e]:
                    bad.append(f"expert {l}.{e}")
                progress and progress(self.blob_nbytes)
        return bad

    def close(self) -> None:
        # Views handed out keep the mapping alive; dropping our reference is all that is safe.
        self.mm = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
