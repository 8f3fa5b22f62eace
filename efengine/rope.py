"""Rotary position embedding tables, matching transformers' ROPE_INIT_FUNCTIONS.

The tables are computed on the host in float32 exactly the way transformers computes them
(inverse frequencies from float32 exponents, angles = float32(position) * inv_freq, then cos/sin
scaled by the rope type's attention factor). Backends only apply the rotation (ops.rope).

Legend: T tokens, r rotated dims of a head (head_dim for GQA, qk_rope_head_dim for MLA).

Supported rope types (ModelConfig.rope_scaling["rope_type"]): default (no scaling), linear,
dynamic (NTK), llama3, yarn (with DeepSeek's mscale / mscale_all_dim). Layout:
- GQA families rotate the two halves of the head (NeoX / rotate_half style);
- MLA (DeepSeek-V2) rotates adjacent pairs (x[2i], x[2i+1]) as complex numbers, as transformers'
  DeepseekV2 apply_rotary_emb does.
"""
from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig
from .errors import ConfigError

SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn")


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """1 / theta^(2i/dim) in float32, as transformers computes it (float32 exponent, float32 pow)."""
    expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** expo)).astype(np.float32)


def _mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * m * ln(s) + 1 (1 when not scaled)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class Rope:
    """inv_freq and attention factor of one model; cos_sin(positions) gives the tables of a step."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        self.dim = cfg.qk_rope_head_dim if cfg.attention == "mla" else cfg.head_dim   # r
        self.interleaved = cfg.attention == "mla"
        if self.dim % 2:
            raise ConfigError(f"config: rotary dimension {self.dim} must be even")
        self.params = dict(cfg.rope_scaling or {})
        self.kind = self.params.get("rope_type", "default")
        if self.kind not in SUPPORTED:
            raise ConfigError(f"config: rope_type {self.kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
        if float(self.params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ConfigError("config: partial_rotary_factor != 1 is not supported")
        self.theta = float(cfg.rope_theta)
        self.inv_freq, self.attention_factor = self._compute(None)

    def _need(self, key: str):
        if self.params.get(key) is None:
            raise ConfigError(f"config: rope_scaling of type {self.kind!r} lacks {key!r}")
        return self.params[key]

    def _compute(self, seq_len: int | None) -> tuple[np.ndarray, float]:
        """(inv_freq [r/2] float32, attention factor) for this rope type at seq_len (dynamic only)."""
        dim, p = self.dim, self.params
        if self.kind == "default":
            return _base_inv_freq(self.theta, dim), 1.0
        if self.kind == "linear":
            return (_base_inv_freq(self.theta, dim) / np.float32(self._need("factor"))).astype(np.float32), 1.0
        if self.kind == "dynamic":
            return self._dynamic(seq_len), 1.0
        if self.kind == "llama3":
            return self._llama3(), 1.0
        return self._yarn()

    def _dynamic(self, seq_len: int | None) -> np.ndarray:
        # NTK-aware: the base grows with the sequence once it passes max_position.
        factor, mp, dim = float(self._need("factor")), self.cfg.max_position, self.dim
        seq_len = mp if seq_len is None else max(seq_len, mp)
        base = self.theta * ((factor * seq_len / mp) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim)

    def _llama3(self) -> np.ndarray:
        p, inv = self.params, _base_inv_freq(self.theta, self.dim)
        factor, lo, hi = float(self._need("factor")), float(self._need("low_freq_factor")), float(self._need("high_freq_factor"))
        old = float(p.get("original_max_position_embeddings") or self.cfg.max_position)
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = (np.float32(2 * math.pi) / inv).astype(np.float32)
        scaled = np.where(wavelen > lo_wl, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def _yarn(self) -> tuple[np.ndarray, float]:
        p, dim, base = self.params, self.dim, self.theta
        omp = float(p.get("original_max_position_embeddings") or self.cfg.max_position)
        factor = p.get("factor")
        factor = float(factor) if factor is not None else self.cfg.max_position / omp
        att = p.get("attention_factor")
        if att is None:
            ms, msa = p.get("mscale"), p.get("mscale_all_dim")
            att = _mscale(factor, ms) / _mscale(factor, msa) if ms and msa else _mscale(factor)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(omp / (rot * 2 * math.pi))) / (2 * math.log(base))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001   # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extra_w = (np.float32(1) - ramp).astype(np.float32)       # weight of extrapolation per frequency
        pos_freqs = (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(np.float32)
        inv_extra = (np.float32(1) / pos_freqs).astype(np.float32)
        inv_inter = (np.float32(1) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        inv = inv_inter * (1 - extra_w) + inv_extra * extra_w
        return inv.astype(np.float32), float(att)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [T, r/2] float32 for absolute positions [T], times the attention factor.

        Dynamic NTK recomputes the frequencies from the step's largest position, as transformers
        does while a sequence grows (its cached state equals this in a growing sequence).
        """
        positions = np.asarray(positions)
        inv = self.inv_freq
        if self.kind == "dynamic" and positions.size and int(positions.max()) + 1 > self.cfg.max_position:
            inv = self._dynamic(int(positions.max()) + 1)
        ang = positions.astype(np.float32)[:, None] * inv[None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        if self.attention_factor != 1.0:
            f = np.float32(self.attention_factor)
            cos, sin = cos * f, sin * f
        return cos.astype(np.float32), sin.astype(np.float32)


def softmax_scale(cfg: ModelConfig) -> float:
    """Attention logit scale: 1/sqrt(q head dim), times YaRN's mscale(all_dim)^2 for MLA (DeepSeek)."""
    scale = cfg.q_head_dim ** -0.5
    p = cfg.rope_scaling or {}
    if cfg.attention == "mla" and p.get("rope_type", "default") != "default" and p.get("mscale_all_dim"):
        m = _mscale(float(p["factor"]), float(p["mscale_all_dim"]))
        scale = scale * m * m
    return scale
