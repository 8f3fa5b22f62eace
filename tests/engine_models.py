"""Tiny .ef models with a tokenizer, for the Engine and CLI tests (built at test time).

Weights are random, so tests check mechanics (lengths, stops, stats, cache reuse, errors),
never the text itself. `max_position` can be raised so a reply can run long enough to be
interrupted.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import tiny_models
from tiny_tokenizer import write_tiny_tokenizer


def build_tiny_ef(folder, family: str = "qwen2_moe", *, template: str = "chatml", tokenizer: bool = True,
                  max_position: int | None = None, seed: int = 0, tokenizer_vocab: int | None = None,
                  template_text: str | None = None) -> Path:
    """Random tiny checkpoint of `family` (+ tiny tokenizer) converted to folder/model.ef (f32).

    tokenizer_vocab: a tokenizer smaller than the model's vocabulary (padded embeddings);
    template_text: replaces the chat template (e.g. a broken one)."""
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
        write_tiny_tokenizer(hf, tokenizer_vocab or kw["vocab_size"], template)
        if template_text is not None:
            cfg = json.loads((hf / "tokenizer_config.json").read_text())
            cfg["chat_template"] = template_text
            (hf / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = convert_hf(hf, folder / "model.ef", experts="f32", dense="f32", progress=False)
    shutil.rmtree(hf)
    return out
