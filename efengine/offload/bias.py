"""Cache-aware routing (LOSSY, opt-in): prefer resident experts that the router nearly chose.

Legend: T tokens in a step, E routed experts per layer, A active experts per token (top_k).

`OffloadRuntime(route_bias=margin)` with margin > 0 installs `RouteBias` as the model's route hook
(model.py calls it between the router and expert dispatch). For each token, a chosen expert that is
not present in the device cache is swapped for the best unchosen present expert whose router
probability is at least the chosen one's minus `margin` (policy.route_bias). The routing weights of
a changed token are then recomputed from the router probabilities exactly as the backend's route()
does for that model's variant, so the result is what the router would have produced had it picked
those ids. Tokens with no substitution keep the router's weights bit for bit.

margin is in probability units (0..1). margin 0 installs nothing: the run stays lossless.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..errors import ConfigError
from ..routing import group_mask, router_probs, topk_weights
from .policy import route_bias


def check_margin(margin) -> float:
    """A valid margin as float, else ConfigError naming the flag."""
    try:
        m = float(margin)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid route_bias={margin!r}: must be a number from 0 to 1") from None
    if not math.isfinite(m) or not 0.0 <= m <= 1.0:
        raise ConfigError(f"invalid route_bias={margin!r}: must be a number from 0 to 1 "
                          "(a router probability margin; 0 = off, lossless)")
    return m


def eligible_scores(p: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Scores [T, E] for substitution: the probabilities, with experts the routing variant could
    never pick for that token (outside DeepSeek's kept groups) at -inf so they never qualify."""
    return group_mask(p, cfg, fill=-np.inf)


def bias_routing(logits, ids, weights, resident: np.ndarray, cfg: ModelConfig, margin: float):
    """Host arrays in, (ids [T, A] int32, weights [T, A] float32, changed [T] bool) out."""
    ids_h = np.asarray(ids, dtype=np.int32)
    w_h = np.asarray(weights, dtype=np.float32)
    p = router_probs(logits)
    new = route_bias(eligible_scores(p, cfg), ids_h, resident, margin)
    changed = (new != ids_h).any(axis=1)
    if not changed.any():
        return ids_h, w_h, changed
    w_new = w_h.copy()
    w_new[changed] = topk_weights(p[changed], new[changed], cfg)
    return new, w_new, changed


class RouteBias:
    """The route hook an OffloadRuntime installs: reads its cache's residency at call time."""

    def __init__(self, runtime, cfg: ModelConfig, margin: float, chained=None):
        self.rt, self.cfg, self.margin, self.chained = runtime, cfg, margin, chained
        self.tokens_changed = 0       # token-layers whose routing was changed
        self.substitutions = 0        # expert choices replaced by a resident expert

    def __call__(self, layer: int, logits, ids, weights):
        if self.chained is not None:
            ids, weights = self.chained(layer, logits, ids, weights)
        i = self.rt.store.index.get(layer)
        if i is None:
            return ids, weights
        b, cache = self.rt.backend, self.rt.cache
        resident = cache.resident.reshape(cache.L, cache.E)[i]
        ids_h = np.asarray(b.to_host(ids), dtype=np.int32)
        new, w, changed = bias_routing(b.to_host(logits), ids_h, b.to_host(weights), resident,
                                       self.cfg, self.margin)
        if not changed.any():
            return ids, weights
        self.tokens_changed += int(changed.sum())
        self.substitutions += int((new != ids_h).sum())
        return b.asarray(new), b.asarray(w)
