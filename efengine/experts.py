"""Where routed experts come from during a forward pass: the ExpertProvider protocol.

Legend: T tokens in a step, A active experts per token, D hidden.

The model runs every MoE layer like this (model.py, `Model._moe`):

    ids, weights = backend.route(router logits)            # on the device
    ids_host = backend.to_host(ids)                        # [T, A] int32: all the provider sees
    for expert_id, handle in provider.begin_layer(layer, ids_host):
        y[rows of expert_id] = backend.expert_ffn(x[its tokens], handle)
    provider.end_layer(layer)
    out = backend.moe_combine(y, weights)                  # fixed rank order

Contract of an ExpertProvider (subclass ExpertProvider; every hook but begin_layer is optional):

  begin_step(positions)       a forward step starts; positions [T] host int64 (absolute).
  begin_layer(layer, ids)     ids [T, A] host int32 of MoE layer `layer`. Returns an iterable of
                              (expert_id, handle) that yields every distinct expert id in `ids`
                              exactly once, in any order. Yield resident experts first and
                              block (waiting for a copy) only just before yielding a miss: the
                              model computes each expert as soon as it is yielded, so resident
                              work overlaps the copies. `handle` is whatever the backend's
                              expert_ffn accepts (numpy: ExpertWeights; cupy: its device
                              form, e.g. a slot of the GPU expert cache).
  end_layer(layer)            the model is done with every handle of this layer (slots may be
                              reused / evicted from now on; handles must stay valid until then).
  end_step()                  the forward step finished.
  layer_handles(layer)        optional: {expert id: handle} for EVERY expert of the layer when all
                              of them are resident and stay so until end_layer, else None. A
                              backend that can group a prefill's pairs on the device
                              (moe_prefill_device) then skips the host round trip of the ids and
                              begin_layer; the provider sees only end_layer for that layer.

The order of yielding never changes the result: each (token, rank) output has its own slot and
the weighted sum runs in rank order (backend.moe_combine). The model checks that every expert it
needs was yielded and raises EfError naming the missing ones otherwise.

Predictors see the hidden state through Model.forward's `on_layer(layer, hidden)` callback and
can apply any layer's router to it with Model.router_logits(layer, hidden).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import ConfigError


class ExpertProvider:
    """Base class with no-op hooks; subclasses implement begin_layer."""

    def begin_step(self, positions: np.ndarray) -> None:
        pass

    def begin_layer(self, layer: int, ids: np.ndarray) -> Iterable[tuple[int, Any]]:
        raise NotImplementedError

    def end_layer(self, layer: int) -> None:
        pass

    def layer_handles(self, layer: int) -> dict | None:
        return None

    def end_step(self) -> None:
        pass


class ResidentExperts(ExpertProvider):
    """The default provider: experts loaded from the weight source on first use and kept.

    `max_cached` caps how many experts stay loaded (least recently used leaves first; None = all).
    Cached experts are yielded before the ones that must be loaded, as the protocol asks.
    Counters: `loads` (experts loaded from the source), `hits` (served from the cache).
    """

    def __init__(self, source, backend, max_cached: int | None = None):
        if max_cached is not None and max_cached < 1:
            raise ConfigError(f"max_cached must be at least 1, got {max_cached}")
        self.source, self.backend, self.max_cached = source, backend, max_cached
        self.cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.loads = self.hits = 0
        self._pinned: set[tuple[int, int]] = set()    # in use by the current layer: never evicted

    def begin_layer(self, layer: int, ids: np.ndarray) -> Iterator[tuple[int, Any]]:
        wanted = [int(e) for e in np.unique(ids)]
        keys = [(layer, e) for e in wanted]
        self._pinned = set(keys)
        resident = [k for k in keys if k in self.cache]
        missing = [k for k in keys if k not in self.cache]
        for k in resident:
            self.cache.move_to_end(k)
            self.hits += 1
            yield k[1], self.cache[k]
        for k in missing:
            yield k[1], self._load(k)

    def _load(self, key: tuple[int, int]):
        handle = self.backend.load_expert(self.source, *key)
        self.loads += 1
        self.cache[key] = handle
        if self.max_cached is not None:
            for old in list(self.cache):
                if len(self.cache) <= self.max_cached:
                    break
                if old not in self._pinned:
                    del self.cache[old]
        return handle

    def end_layer(self, layer: int) -> None:
        self._pinned = set()
