"""Timed replay of a routing trace through OffloadRuntime on a virtual clock (no weights): what
offload_bench and the policy comparisons run where there is no GPU and no model."""
from __future__ import annotations

import numpy as np

from .prefetch import VirtualClock, VirtualEngine
from .runtime import OffloadRuntime
from .store import NullStore


def replay_trace(trace, policy: str = "ondemand", *, fraction: float = 0.5, blob_nbytes: int = 94_000_000,
                 bandwidth: float = 55e9, layer_s: float = 75e-6, max_inflight: int = 4,
                 tokens: int | None = None, timeline: int = 0, **policy_kw) -> dict:
    """Timed replay of a routing trace through the runtime on a virtual clock (no weights).

    Each layer computes for layer_s (split evenly over its experts, so resident-first ordering
    overlaps copies); copies take blob_nbytes / bandwidth on one FIFO copy queue. Pre-gate policies
    have no hidden states here: pregate never prefetches and expertflow is history-only.
    timeline > 0: the first `timeline` steps' compute / copy / stall intervals (virtual seconds)
    are returned under "timeline"."""
    store = NullStore(trace.n_layers, trace.n_experts, trace.top_k, blob_nbytes)
    engine = VirtualEngine(bandwidth, clock=VirtualClock())
    rt = OffloadRuntime(None, "numpy", policy=policy, fraction=fraction, store=store, engine=engine,
                        max_inflight=max_inflight, keep_log=False, **policy_kw)
    if timeline > 0:
        rt.stats.timeline, rt.stats.timeline_steps = [], int(timeline)
    n = trace.n_tokens if tokens is None else min(tokens, trace.n_tokens)
    pos = np.zeros(1, dtype=np.int64)
    clock = engine.clock
    for t in range(n):
        rt.begin_step(pos)
        for l in range(trace.n_layers):
            ids = trace.experts[t, l][None, :]
            k = len(np.unique(ids))
            _compute(rt, l, clock, layer_s / 2)                 # attention and router
            for _ in rt.begin_layer(l, ids):
                _compute(rt, l, clock, layer_s / 2 / k)
            rt.end_layer(l)
        rt.end_step()
    out = rt.summary()
    out["time_per_token_s"] = round(clock.now() / max(n, 1), 6)
    if timeline > 0:
        out["timeline"] = rt.stats.timeline
    return out


def _compute(rt: OffloadRuntime, layer: int, clock, seconds: float) -> None:
    """Virtual compute of `seconds` (a timeline interval while recording)."""
    t0 = clock.now()
    clock.advance(seconds)
    if rt._tl is not None:
        rt._tl.compute(layer, t0, clock.now())
