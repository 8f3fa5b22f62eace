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


# ---- the steps, each a pure function on a float logits vector [V] ----------------------------

def apply_repetition_penalty(logits: np.ndarray, history, penalty: float) -> np.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: every token seen in `history` (prompt and output) has
    its logit divided by `penalty` when positive and multiplied by it when negative."""
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0 or len(history) == 0:
        return out
    ids = np.unique(np.asarray(history, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[-1])]
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th), others -> -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p.

    As HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is <= 1-p;
    the most likely token always stays. Ties break by token id (stable sort)."""
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")                 # ascending
    cum = np.cumsum(softmax(logits[order]))
    drop_sorted = cum <= (1.0 - p)
    drop_sorted[-1] = False
    out = logits.copy()
    out[order[drop_sorted]] = -np.inf
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below min_p times the top token's (HF MinPLogitsWarper)."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    keep = probs >= min_p * probs.max()
    return np.where(keep, logits, -np.inf).astype(logits.dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 (exact enough for cumulative sums over a 150k vocabulary)."""
    x = np.asarray(logits, dtype=np.float64)
    m = np.max(x)
    if not np.isfinite(m):
        raise ConfigError("every token was filtered out or the model produced non-finite logits")
    e = np.exp(x - m)
    return e / e.sum()


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
        cdf = np.cumsum(softmax(x))
        u = self.rng.random() * cdf[-1]
        return int(min(np.searchsorted(cdf, u, side="right"), len(cdf) - 1))


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
