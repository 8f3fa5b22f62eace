"""Session fixtures shared by every test file: tiny checkpoints and their .ef files, built once.

  tiny_ckpt(name, dtype="float32", max_shard_size=None, tokenizer=True) -> Path of an HF folder
  tiny_ef(name, experts="f32", dense="f32", embed=None, dtype="float32", group=64) -> Path of a .ef
Names are tests/tiny_models.py's configs (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2,
deepseek_v2_grouped). Results are cached per session (per xdist worker); treat them as read-only
and copy a folder before changing it.
  rng -> a numpy Generator with a fresh seed per test (printed, so a failure can be replayed)
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import tiny_models


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    try:
        from tiny_tokenizer import write_tiny_tokenizer
    except ImportError:  # pragma: no cover - the shared helper is optional
        from efconvert.random_model import byte_tokenizer_files
        for name, data in byte_tokenizer_files(vocab_size).items():
            if name != "generation_config.json":
                (folder / name).write_bytes(data)
        return
    write_tiny_tokenizer(folder, vocab_size)


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ckpt")
    cache: dict[tuple, Path] = {}

    def make(name: str, dtype: str = "float32", max_shard_size=None, tokenizer: bool = True) -> Path:
        key = (name, dtype, max_shard_size, tokenizer)
        if key not in cache:
            out = root / f"{name}-{dtype}-{max_shard_size or 'single'}-{'tok' if tokenizer else 'notok'}"
            tiny_models.build(name, out, dtype=dtype, max_shard_size=max_shard_size)
            if tokenizer:
                _write_tokenizer(out, tiny_models.configs()[name][2]["vocab_size"])
            cache[key] = out
        return cache[key]
    return make


@pytest.fixture(scope="session")
def tiny_ef(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_ef")
    cache: dict[tuple, Path] = {}

    def make(name: str, experts: str = "f32", dense: str = "f32", embed: str | None = None,
             dtype: str = "float32", group: int = 64) -> Path:
        from efconvert.convert import convert_hf
        key = (name, experts, dense, embed, dtype, group)
        if key not in cache:
            out = root / f"{name}-{dtype}-{experts}-{dense}-{embed}-{group}.ef"
            cache[key] = convert_hf(tiny_ckpt(name, dtype=dtype), out, experts=experts, dense=dense,
                                    embed=embed, group=group, progress=False)
        return cache[key]
    return make
