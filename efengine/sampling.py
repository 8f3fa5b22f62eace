"""Choosing the next token from logits, with Hugging Face semantics for every knob.

Order of the steps (as transformers' `generate` applies its processors and warpers):
  repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw
Temperature 0 means greedy: argmax after the repetition penalty (the other warpers cannot change
the argmax). Draws come from a numpy Generator seeded by `seed`, so a seed fixes the output.

Stop strings are handled here too (`StopStrings`): generation stops as soon as the text contains
one, and the text from the stop string on is never shown; text that could still become a stop
string is held back until it cannot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# V vocabulary size


@dataclass(frozen=True)
class SamplingParams:
    """Every generation knob, checked on construction (ConfigError names the bad one)."""
    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 0                   # 0 = off
    top_p: float = 1.0               # 1 = off
    min_p: float = 0.0               # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple = ()                 # stop strings
    ignore_eos: bool = False         # keep going past end-of-sequence / end-of-turn tokens

    def __post_init__(self):
        def bad(name: str, why: str):
            raise ConfigError(f"invalid {name}={getattr(self, name)!r}: {why}")

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not _is_real(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 = off)")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1] (1 = off)")
        if not _is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1] (0 = off)")
        if not _is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be True or False")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            bad("seed", "must be an integer >= 0 or None")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"invalid stop string {s!r}: stop strings must be non-empty text")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


# ---- the steps, each a pure function on a float32 logits vector [V] --------------------------
# A 150k vocabulary must not cost more than a fraction of a 2-3 ms decode step: no full sort,
# no float64 pass over V. Filters look at the few tokens near the maximum first and widen only
# when those cannot decide (the answer is the same as a full sort's).

def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: every token seen in `history` (prompt and output) has
    its logit divided by `penalty` when positive and multiplied by it when negative."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0 or len(history) == 0:
        return out
    h = np.asarray(history, dtype=np.int64)
    seen = np.zeros(out.shape[-1], dtype=bool)
    seen[h[(h >= 0) & (h < out.shape[-1])]] = True
    ids = np.flatnonzero(seen)
    v = out[ids]
    out[ids] = np.where(v < 0, v * np.float32(penalty), v / np.float32(penalty))
    return out


def _near_max(x: np.ndarray, enough) -> np.ndarray:
    """Indices of the tokens within d of the max logit, for the smallest d in 8, 32, inf such
    that enough(indices) holds."""
    m = x.max()
    for d in (8.0, 32.0):
        idx = np.flatnonzero(x >= m - d)
        if enough(idx):
            return idx
    return np.arange(x.shape[-1])


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th), others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    cand = logits[_near_max(logits, lambda idx: idx.size >= k)]
    kth = np.partition(cand, -k)[-k]
    return np.where(logits < kth, np.float32(-np.inf), logits).astype(logits.dtype, copy=False)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    As HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1-p;
    the most likely token always stays; ties break by token id (stable sort). Only tokens near
    the max are sorted: once they hold mass >= p, every other token has >= p above it."""
    if p >= 1.0:
        return logits
    w = _weights(logits)
    total = w.sum(dtype=np.float64)
    idx = _near_max(logits, lambda i: w[i].sum(dtype=np.float64) >= p * total)
    order = idx[np.argsort(logits[idx], kind="stable")]          # ascending
    below = total - w[idx].sum(dtype=np.float64)                   # mass of the tokens not sorted
    cum = (below + np.cumsum(w[order], dtype=np.float64)) / total
    drop = cum <= (1.0 - p)
    drop[-1] = False
    out = np.full_like(logits, -np.inf)
    keep = order[~drop]
    out[keep] = logits[keep]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's (HF MinPLogitsWarper).
    p_i / p_max = exp(x_i - x_max), so the test needs no softmax."""
    if min_p <= 0.0:
        return logits
    keep = logits >= logits.max() + np.float32(np.log(min_p))
    return np.where(keep, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)


def _weights(x: np.ndarray) -> np.ndarray:
    """Unnormalized probabilities exp(x - max) in float32 (0 for -inf)."""
    m = x.max()
    if not np.isfinite(m):
        raise ConfigError("every token was filtered out or the model produced non-finite logits")
    return np.exp(x - m, dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64."""
    w = _weights(np.asarray(logits, dtype=np.float32)).astype(np.float64)
    return w / w.sum()


def draw(w: np.ndarray, u: float, block: int = 1024) -> int:
    """Index i with probability w[i] / sum(w) given u uniform in [0, 1): inverse CDF, found
    block by block so the float64 cumulative sum covers one block, not the whole vocabulary."""
    pad = (-w.shape[0]) % block
    wb = np.concatenate([w, np.zeros(pad, w.dtype)]) if pad else w
    cb = np.cumsum(wb.reshape(-1, block).sum(axis=1, dtype=np.float64))
    target = u * cb[-1]
    b = min(int(np.searchsorted(cb, target, side="right")), len(cb) - 1)
    while cb[b] == (cb[b - 1] if b else 0.0):      # rounding landed on an empty block: step back
        b -= 1
    seg = wb[b * block:(b + 1) * block]
    cw = np.cumsum(seg, dtype=np.float64)
    j = min(int(np.searchsorted(cw, target - (cb[b - 1] if b else 0.0), side="right")), block - 1)
    j = min(j, int(np.flatnonzero(seg > 0)[-1]))    # never a zero-weight token
    return b * block + j


class Sampler:
    """next_token(logits [V], history) -> id; keeps its own seeded random stream."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def filtered(self, logits: np.ndarray, history) -> np.ndarray:
        """The logits after every step before the draw (greedy: after the penalty only)."""
        p = self.params
        x = apply_repetition_penalty(logits, history, p.repetition_penalty)
        if p.greedy:
            return x
        x = x / np.float32(p.temperature)
        x = top_k_filter(x, p.top_k)
        x = top_p_filter(x, p.top_p)
        return min_p_filter(x, p.min_p)

    def next_token(self, logits: np.ndarray, history) -> int:
        if logits.ndim != 1:
            raise ValueError(f"Sampler expects logits of one position [V], got shape {logits.shape}")
        x = self.filtered(logits, history)
        if self.params.greedy:
            return int(np.argmax(x))
        return draw(_weights(x), self.rng.random())


class StopStrings:
    """Feeds decoded text pieces; returns what may be shown now and whether a stop string hit.

    `push(piece) -> (text, stopped)`: `text` is safe to show (it cannot be part of a stop string
    any more); when `stopped`, `text` ends just before the stop string. `flush()` returns what was
    held back when generation ends for another reason."""

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = self._partial_suffix(buf)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest tail of buf that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out
