"""The adaptive prefetch horizon S (layers ahead), expertflow's answer to "how early to load".

  S = N_e * E_s / (C_s * T_l)
E_s bytes per expert blob, C_s measured copy bandwidth (moving average), T_l measured compute time
per layer for the current batch size, N_e experts expected to need loading per layer over the next
layers (the predictor's probability mass on experts that are not resident). Copies of one layer's
expected misses take N_e * E_s / C_s; starting them S layers early hides them behind S layers of
compute. Then corrected online by a gain: repeated stalls on predicted experts grow it, prefetches
evicted unused shrink it. Bounded by the layer count and by the cache (S layers of top-k experts
must fit in half the slots). Every step's values are logged.

Decode recomputes S once a step (end_step). A step of many tokens (a prefill) is one long pass
whose layers need most of their experts each, so there S follows every layer (`within_batch`):
from the formula at once, plus one layer, because the state a prediction reads is the one after a
layer, so the copies it starts have S - 1 whole layers of compute ahead of them.
"""
from __future__ import annotations

import math

from ..errors import ConfigError


class Horizon:
    def __init__(self, n_layers: int, n_slots: int, top_k: int, blob_nbytes: int, *, initial: int = 2,
                 ema: float = 0.2, grow: float = 1.25, shrink: float = 0.9, patience: int = 2,
                 gain_range: tuple[float, float] = (0.25, 8.0)):
        if n_layers < 1 or n_slots < 1 or top_k < 1 or blob_nbytes < 1:
            raise ConfigError("horizon: layers, slots, top_k and blob bytes must be positive")
        self.L, self.blob, self.n_slots = n_layers, blob_nbytes, n_slots
        self.s_max = max(1, min(n_layers - 1, n_slots // (2 * top_k)))
        self.ema, self.grow, self.shrink, self.patience = ema, grow, shrink, patience
        self.gain_range = gain_range
        self.gain = 1.0
        self.bw: float | None = None                 # C_s bytes/s
        self.layer_s: dict[int, float] = {}          # T_l by batch size
        self.batch = 1
        self.n_e = float(top_k)
        self.miss_rate: float | None = None          # demand misses per layer (moving average)
        self.value = max(1, min(initial, self.s_max))
        self._stalls = 0                             # consecutive steps with stalls on predicted experts
        self.log: list[dict] = []

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ema) * old + self.ema * new

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes > 0:
            self.bw = self._avg(self.bw, nbytes / seconds)

    def observe_layer(self, seconds: float, batch: int) -> None:
        """Compute time of one layer (stall excluded) for a step of `batch` tokens."""
        if seconds > 0:
            self.batch = batch
            self.layer_s[batch] = self._avg(self.layer_s.get(batch), seconds)

    def observe_misses(self, n: int) -> None:
        self.miss_rate = self._avg(self.miss_rate, float(n))

    def load_factor(self) -> float | None:
        """Copy time of the demand misses per layer over compute time per layer (>= 1: the copy
        engine is saturated by misses alone and speculative copies delay them)."""
        t_l = self.layer_s.get(self.batch)
        if self.bw is None or not t_l or self.miss_rate is None:
            return None
        return self.miss_rate * self.blob / (self.bw * t_l)

    def set_expected(self, n_e: float) -> None:
        self.n_e = max(0.0, float(n_e))

    def formula(self) -> float | None:
        """N_e * E_s / (C_s * T_l) before the online gain, or None until both are measured."""
        t_l = self.layer_s.get(self.batch)
        if self.bw is None or not t_l:
            return None
        return self.n_e * self.blob / (self.bw * t_l)

    def within_batch(self, experts_per_layer: float, first: bool = False) -> int:
        """S inside a step of several tokens, after each layer: ceil(gain * formula) + 1, bounded
        so that S layers of `experts_per_layer` experts fit in half the cache. After the step's
        first layer S only grows: a layer that left the horizon would lose the protection of the
        experts already prefetched for it, and they would be evicted unused."""
        f = self.formula()
        if f is not None:
            cap = max(1, min(self.L - 1, int(self.n_slots // max(2.0, 2.0 * experts_per_layer))))
            s = max(1, math.ceil(self.gain * f) + 1)
            self.value = int(min(cap, s if first else max(s, self.value)))
        return self.value

    def end_step(self, stalled_predicted: int, wasted: int, used: int) -> int:
        """Apply the online correction after a step and recompute S."""
        self._stalls = self._stalls + 1 if stalled_predicted > 0 else 0
        if self._stalls >= self.patience:
            self.gain *= self.grow
            self._stalls = 0
        if wasted > used and wasted > 0:
            self.gain *= self.shrink
        lo, hi = self.gain_range
        self.gain = min(hi, max(lo, self.gain))
        f = self.formula()
        if f is not None:
            self.value = int(min(self.s_max, max(1, math.ceil(self.gain * f))))
        self.log.append({"S": self.value, "gain": round(self.gain, 4), "N_e": round(self.n_e, 3),
                         "C_s_gbps": round(self.bw / 1e9, 3) if self.bw else None,
                         "T_l_ms": round(self.layer_s.get(self.batch, 0.0) * 1e3, 4),
                         "formula": round(f, 3) if f is not None else None})
        return self.value

    def __call__(self) -> int:
        return self.value
