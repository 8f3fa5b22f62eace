"""Routing math on the host (numpy): the reference every routing variant is defined by.

Legend: T tokens, E routed experts, A active experts per token (top_k).
Used by the numpy backend's router and by the lossy route bias, which must recompute weights
exactly as the router would have for the experts it substitutes.
"""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


def router_probs(logits) -> np.ndarray:
    """Softmax over experts in float32 [T, E] (HF routers take it in float32 too)."""
    z = np.asarray(logits, dtype=np.float32)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def group_mask(p: np.ndarray, cfg: ModelConfig, fill: float = 0.0) -> np.ndarray:
    """DeepSeek group_limited_greedy: experts outside the topk_group best groups set to `fill`.

    A group's score is its best expert's probability; groups are contiguous runs of E/n_group ids.
    Other routing methods return p unchanged.
    """
    if cfg.topk_method != "group_limited_greedy":
        return p
    T, E = p.shape
    g = E // cfg.n_group
    best = p.reshape(T, cfg.n_group, g).max(axis=-1)                              # [T, n_group]
    keep = np.argsort(-best, axis=-1, kind="stable")[:, :cfg.topk_group]
    mask = np.zeros((T, cfg.n_group), dtype=bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    return np.where(np.repeat(mask, g, axis=-1), p, np.float32(fill))


def topk_weights(p: np.ndarray, ids: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Weights [T, A] float32 of experts ids [T, A]: their probabilities (or ones), renormalized
    if norm_topk_prob, times routed_scaling_factor."""
    w = np.take_along_axis(np.asarray(p, dtype=np.float32), np.asarray(ids, dtype=np.int64), axis=-1)
    if cfg.moe_weighting == "ones":
        w = np.ones_like(w)
    elif cfg.norm_topk_prob:
        w = w / w.sum(axis=-1, keepdims=True)
    if cfg.routed_scaling_factor != 1.0:
        w = w * np.float32(cfg.routed_scaling_factor)
    return w.astype(np.float32)


def route(logits, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """ids [T, A] int32 (stable: equal scores keep ascending expert id), weights [T, A] float32."""
    scores = group_mask(router_probs(logits), cfg)
    ids = np.argsort(-scores, axis=-1, kind="stable")[:, :cfg.top_k].astype(np.int32)
    return ids, topk_weights(scores, ids, cfg)
