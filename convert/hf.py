"""Hugging Face checkpoint folders: config.json, safetensors shards, tokenizer files.

Safetensors are parsed here rather than through the safetensors package: numpy has no bfloat16,
and reading row ranges with pread keeps memory bounded by what one step needs (a memory map would
leave every page touched resident, so RSS would grow to the size of the checkpoint).
Layout of a .safetensors file: u64 header length N, N bytes of JSON
  {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
then the data; offsets count from the first byte after the header.
"""
from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path
from typing import Callable

import numpy as np

import efmodels
from efengine.config import ModelConfig
from efengine.errors import CheckpointError, ConfigError

# safetensors dtype -> numpy dtype of the raw values (bf16 kept as its uint16 bits)
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
OTHER_DTYPES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
MAX_HEADER = 100 << 20
# Files that make one .ef the whole model; embedded under their own names.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


class SafetensorsFile:
    """One .safetensors file, header validated on open; data read with pread on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                if n is None or n > min(self.size - 8, MAX_HEADER):
                    raise CheckpointError(f"{self.path}: truncated or not a safetensors file "
                                          f"({self.size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
            assert isinstance(header, dict)
        except (UnicodeDecodeError, json.JSONDecodeError, AssertionError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not valid JSON)") from None
        self.data_start = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {name: self._check(name, e) for name, e in header.items()}
        self._fd = None
        self._lock = threading.Lock()

    def _open(self) -> int:
        """The file descriptor, opened once (reads from several threads share it with pread)."""
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def _check(self, name: str, e) -> tuple[str, tuple, int]:
        """(dtype, shape, absolute offset) of a header entry, or a CheckpointError."""
        try:
            dtype, shape, (b, end) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            b, end = int(b), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: corrupt header entry for tensor {name}: {e!r}") from None
        item = np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES else OTHER_DTYPES.get(dtype)
        if item is None:
            raise CheckpointError(f"{self.path}: tensor {name} has unknown dtype {dtype!r}")
        if end - b != int(np.prod(shape, dtype=np.int64)) * item or b < 0:
            raise CheckpointError(f"{self.path}: tensor {name}: data_offsets {b}..{end} do not fit "
                                  f"{dtype} {list(shape)}")
        if self.data_start + end > self.size:
            raise CheckpointError(f"{self.path}: truncated: tensor {name} needs bytes up to "
                                  f"{self.data_start + end}, the file has {self.size}")
        return dtype, shape, self.data_start + b

    def read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        """Rows r0..r1 of the tensor seen as 2-D [rows, last dim], raw dtype (bf16 as uint16)."""
        dtype, shape, off = self.entries[name]
        if dtype not in DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} is {dtype}; weights must be F32, F16 or BF16")
        cols = shape[-1] if shape else 1
        out = np.empty((r1 - r0, cols), DTYPES[dtype])
        want = out.nbytes
        pos = off + r0 * cols * out.itemsize
        try:
            fd, mv, got = self._open(), memoryview(out.reshape(-1).view(np.uint8)), 0
            while got < want:
                n = os.preadv(fd, [mv[got:]], pos + got)
                if n <= 0:
                    raise CheckpointError(f"{self.path}: truncated while reading tensor {name}")
                got += n
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {name} ({e.strerror})") from None
        return out

    def advise(self, name: str, r0: int, r1: int) -> None:
        """Ask the kernel to start reading rows r0..r1 now (they are needed next)."""
        dtype, shape, off = self.entries[name]
        row = (shape[-1] if shape else 1) * np.dtype(DTYPES.get(dtype, np.uint8)).itemsize
        try:
            os.posix_fadvise(self._open(), off + r0 * row, (r1 - r0) * row, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            pass                  # only a hint

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_json(path: Path, what: str, error=CheckpointError) -> dict:
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: {what} must hold a JSON object")
    return d


def dense_message(src, arch: str) -> str:
    return (f"{src}: {arch} is a dense model (no experts); efconvert converts Mixture-of-Experts "
            f"checkpoints. A dense Llama converts from its GGUF file instead: efconvert MODEL.gguf OUT.ef "
            f"[--moefy E --top-k K]")


def model_config(hf: dict, src) -> tuple[efmodels.Family, ModelConfig]:
    """The family and normalized config of an HF config.json dict."""
    archs = hf.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError(f"{src}/config.json has no 'architectures' list naming the model class")
    arch = archs[0]
    try:
        family = efmodels.by_hf_architecture(arch)
    except ConfigError as e:
        if not any(hf.get(k) for k in EXPERT_KEYS):
            raise ConfigError(dense_message(src, arch) + f". Supported: {str(e).split('supported: ')[-1]}") from None
        raise ConfigError(f"{src}: {e}") from None
    try:
        cfg = ModelConfig(**family.hf_config(hf))
    except KeyError as e:
        raise ConfigError(f"{src}/config.json lacks {e.args[0]!r} (needed by {arch})") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{src}/config.json has a malformed value: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{src}/config.json: {e}") from None
    if not cfg.is_moe:
        raise ConfigError(dense_message(src, arch))
    return family, cfg


class Checkpoint:
    """An HF model folder: its config, every tensor across shards, and the files to embed."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: not a folder (expected an HF model folder with config.json)")
        self.hf_config = read_json(self.folder / "config.json", "config.json", ConfigError)
        self.family, self.config = model_config(self.hf_config, self.folder)
        self.shards = [SafetensorsFile(p) for p in self._shard_paths()]
        self.where: dict[str, SafetensorsFile] = {}
        for sh in self.shards:
            for name in sh.entries:
                if name in self.where:
                    raise CheckpointError(f"{self.folder}: tensor {name} appears in both "
                                          f"{self.where[name].path.name} and {sh.path.name}")
                self.where[name] = sh
        self._check_index()

    def _shard_paths(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = read_json(index, "model.safetensors.index.json").get("weight_map")
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.weight_map = wm
            names = sorted(set(wm.values()))
            for n in names:
                if not (self.folder / n).is_file():
                    raise CheckpointError(f"{index}: shard {n} is missing from {self.folder}")
            return [self.folder / n for n in names]
        self.weight_map = None
        paths = sorted(self.folder.glob("*.safetensors"))
        if not paths:
            bins = sorted(p.name for p in self.folder.glob("*.bin"))
            hint = f" (found {', '.join(bins[:3])}: PyTorch .bin checkpoints are not supported)" if bins else ""
            raise CheckpointError(f"{self.folder}: no .safetensors files{hint}")
        return paths

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        for name, shard in self.weight_map.items():
            sh = self.where.get(name)
            if sh is None or sh.path.name != shard:
                raise CheckpointError(f"{self.folder}: the index puts tensor {name} in {shard}, "
                                      f"but that shard does not hold it")

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple:
        return self.where[name].entries[name][1]

    def dtype(self, name: str) -> str:
        return self.where[name].entries[name][0]

    def nbytes(self, name: str) -> int:
        dt = self.dtype(name)
        item = np.dtype(DTYPES[dt]).itemsize if dt in DTYPES else OTHER_DTYPES[dt]
        return int(np.prod(self.shape(name), dtype=np.int64)) * item

    def read_rows(self, name: str, r0: int, r1: int) -> np.ndarray:
        return self.where[name].read_rows(name, r0, r1)

    def advise(self, name: str, r0: int, r1: int) -> None:
        self.where[name].advise(name, r0, r1)

    def aux_files(self) -> dict[str, Path]:
        """Tokenizer, chat template and generation files present in the folder."""
        return {n: self.folder / n for n in AUX_FILES if (self.folder / n).is_file()}

    def close(self) -> None:
        for sh in self.shards:
            sh.close()


def _token(v):
    """A special token as written in tokenizer_config.json: a string or an AddedToken dict."""
    return v.get("content") if isinstance(v, dict) else v


def _json_file(files: dict[str, bytes], name: str) -> dict:
    if name not in files:
        return {}
    try:
        d = json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{name} must hold a JSON object")
    return d


def tokenizer_meta(files: dict[str, bytes], hf_config: dict) -> dict:
    """Chat template and special tokens, from the tokenizer files embedded in the .ef.

    The files themselves are embedded too; this is the summary an engine reads without parsing them.
    """
    tc = _json_file(files, "tokenizer_config.json")
    stm = _json_file(files, "special_tokens_map.json")
    gen = _json_file(files, "generation_config.json")
    template = tc.get("chat_template")
    if template is None and "chat_template.jinja" in files:
        template = files["chat_template.jinja"].decode("utf-8", errors="replace")
    if template is None and "chat_template.json" in files:
        template = _json_file(files, "chat_template.json").get("chat_template")
    kind = "tokenizer.json" if "tokenizer.json" in files else "sentencepiece" if "tokenizer.model" in files else None
    special = {k: _token(tc.get(k, stm.get(k))) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    added = tc.get("added_tokens_decoder") or {}
    specials = sorted({str(v.get("content")) for v in added.values() if isinstance(v, dict) and v.get("special")})
    return {"kind": kind, "chat_template": template, **special,
            "add_bos_token": tc.get("add_bos_token"), "add_eos_token": tc.get("add_eos_token"),
            "bos_token_id": gen.get("bos_token_id", hf_config.get("bos_token_id")),
            "eos_token_id": gen.get("eos_token_id", hf_config.get("eos_token_id")),
            "special_tokens": specials}


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values (bf16 as uint16 bits) -> float32, exact."""
    if dtype == "BF16":
        out = np.empty(raw.shape, np.float32)
        np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)   # one pass, 5x astype+shift
        return out
    return raw.astype(np.float32, copy=False)


def save_safetensors(path, specs: dict, produce: Callable[[str], np.ndarray],
                     metadata: dict | None = None) -> Path:
    """Write a .safetensors file tensor by tensor: specs name -> (dtype, shape), produce(name) ->
    the raw values (bf16 as uint16), or a list of consecutive pieces of them (to bound memory).
    Used by the benchmark and by tests that need odd files."""
    header, off = {}, 0
    for name, (dtype, shape) in specs.items():
        nb = int(np.prod(shape, dtype=np.int64)) * (np.dtype(DTYPES[dtype]).itemsize if dtype in DTYPES
                                                    else OTHER_DTYPES[dtype])
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [off, off + nb]}
        off += nb
    if metadata:
        header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, (dtype, shape) in specs.items():
            data = produce(name)
            n = 0
            for chunk in (data if isinstance(data, (list, tuple)) else [data]):
                chunk = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
                f.write(memoryview(chunk))
                n += chunk.nbytes
            if n != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ValueError(f"{name}: produced {n} bytes for {dtype} {list(shape)}")
    return Path(path)


def save_arrays(path, arrays: dict[str, tuple[str, np.ndarray]], metadata: dict | None = None) -> Path:
    """save_safetensors for arrays already in memory: name -> (dtype, raw values)."""
    return save_safetensors(path, {n: (dt, a.shape) for n, (dt, a) in arrays.items()},
                            lambda n: arrays[n][1], metadata)
