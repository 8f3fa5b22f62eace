"""Tiny .ef models with a tokenizer, for the Engine and CLI tests (built at test time).

Weights are random, so tests check mechanics (lengths, stops, stats, cache reuse, errors),
never the text itself. `max_position` can be raised so a reply can run long enough to be
interrupted.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import tiny_models
from tiny_tokenizer import write_tiny_tokenizer


def build_tiny_ef(folder, family: str = "qwen2_moe", *, template: str = "chatml", tokenizer: bool = True,
                  max_position: int | None = None, seed: int = 0) -> Path:
    """Random tiny checkpoint of `family` (+ tiny tokenizer) converted to folder/model.ef (f32)."""
    import torch
    import transformers

    from efconvert.convert import convert_hf

    folder = Path(folder)
    hf = folder / "hf"
    cfg_cls, model_cls, kw = tiny_models.configs()[family]
    if max_position is not None:
        kw = dict(kw, max_position_embeddings=max_position)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    model.save_pretrained(hf)
    if tokenizer:
        write_tiny_tokenizer(hf, kw["vocab_size"], template)
    out = convert_hf(hf, folder / "model.ef", experts="f32", dense="f32", progress=False)
    shutil.rmtree(hf)
    return out
