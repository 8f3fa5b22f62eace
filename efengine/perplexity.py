"""Perplexity of a text, scored the way llama.cpp's llama-perplexity scores it.

The text is tokenized once (with BOS when the model adds one) and cut into windows of `ctx`
tokens. Each window is run from an empty cache with its first token replaced by BOS (when the
model uses BOS); only the second half of a window is scored, so every scored token has at least
ctx/2 tokens of context:
    window w covers tokens [a, a + ctx); logits at j predict token a + j + 1
    non-overlapping (default): a = w * ctx, scored j in [ctx/2, ctx - 1)
    strided (stride S <= ctx/2): a = w * S; the first window scores j in [ctx/2, ctx - 1), the
    others j in [ctx - 1 - S, ctx - 1), i.e. the S tokens that the previous window did not reach
PPL = exp(mean NLL); the +/- is llama.cpp's estimate: exp(mean) * std(NLL) / sqrt(n - 1).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .errors import ConfigError, EfError


def windows(n_tokens: int, ctx: int, stride: int | None) -> list[tuple[int, int]]:
    """(start a, first scored logit row j0) for every window that fits in n_tokens."""
    if not isinstance(ctx, int) or ctx < 4:
        raise ConfigError(f"invalid --ctx {ctx!r}: perplexity windows need at least 4 tokens")
    half = ctx // 2
    if stride is None:
        return [(w * ctx, half) for w in range(n_tokens // ctx)]
    if not isinstance(stride, int) or not 1 <= stride <= half:
        raise ConfigError(f"invalid --stride {stride!r}: must be from 1 to ctx/2 = {half}")
    out = []
    for a in range(0, n_tokens - ctx + 1, stride):
        out.append((a, half if a == 0 else ctx - 1 - stride))
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row of logits [T, V], in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def summarize(nll_sum: float, nll2_sum: float, count: int) -> tuple[float, float]:
    """(PPL, its +/- estimate) from the sum of NLLs and of their squares over count tokens."""
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    err = math.sqrt(var / (count - 1)) * math.exp(mean) if var > 0 and count > 1 else 0.0
    return math.exp(mean), err


def perplexity(engine, text: str, ctx: int = 512, stride: int | None = None, max_windows: int | None = None,
               on_window: Callable[[int, int, float, float], None] | None = None) -> dict:
    """Score `text` with `engine` (an Engine). on_window(i, n, ppl_so_far, err_so_far) reports progress."""
    tok = engine.tokenizer
    ids = np.asarray(tok.encode(text, add_special=True), dtype=np.int64)
    plan = windows(len(ids), ctx, stride)
    if not plan:
        raise EfError(f"the text has {len(ids)} tokens; perplexity with --ctx {ctx} needs at least {ctx} "
                      f"(give a longer text or a smaller --ctx)")
    if max_windows is not None:
        plan = plan[:max_windows]
    bos = tok.bos_id if tok.add_bos else None
    nll_sum = nll2_sum = 0.0
    count = 0
    for i, (a, j0) in enumerate(plan):
        window = ids[a:a + ctx].copy()
        if bos is not None:
            window[0] = bos
        logits = engine.logits(window)                  # [ctx, V]
        nll = token_nll(logits[j0:ctx - 1], ids[a + j0 + 1:a + ctx])
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += len(nll)
        if on_window is not None:
            on_window(i, len(plan), *summarize(nll_sum, nll2_sum, count))
    ppl, err = summarize(nll_sum, nll2_sum, count)
    return {"ppl": ppl, "ppl_err": err, "nll": nll_sum / count, "tokens_scored": count, "windows": len(plan),
            "ctx": ctx, "stride": stride, "tokens": int(len(ids))}
