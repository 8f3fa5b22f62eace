"""Stall accounting and the per-step log of the offload runtime.

Stall is time the compute side spent waiting for a copy it needed now (simulated engines: the
engine's clock; GPU: CUDA events on the compute stream). A miss is an expert that was neither
resident nor in flight when its layer routed to it; a late prefetch is one that was in flight
but not yet landed (it stalls, but less than a miss).

Timeline (None = not recording; set it to [] to record the next `timeline_steps` steps): events
  {"step": int, "layer": int (model layer), "kind": "compute" | "copy" | "stall",
   "t0": float, "t1": float (seconds from the start of recording), "expert": int | None}
"compute" is a layer's device work (or a graph segment), "copy" one expert's host->device copy
(expert = flat id i*E+e), "stall" the compute side waiting for a copy. efengine/plot.py draws it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OffloadStats:
    steps: int = 0
    tokens: int = 0
    hits: int = 0                 # needed experts already resident and ready
    late: int = 0                 # needed experts still in flight (prefetched too late)
    misses: int = 0               # needed experts absent: demand loads
    stall_s: float = 0.0
    copies: int = 0
    bytes_copied: int = 0
    copy_s: float = 0.0           # engine busy time (for the achieved bandwidth)
    prefetch_issued: int = 0
    prefetch_used: int = 0        # prefetched experts later used
    prefetch_wasted: int = 0      # prefetched experts evicted before any use
    prefetch_dropped: int = 0     # requests dropped (deadline passed or already resident)
    log: list = field(default_factory=list)
    keep_log: bool = True
    timeline: list | None = None  # recorded events (format above); None = off
    timeline_steps: int = 4       # steps recorded once timeline is a list
    _step: dict = field(default_factory=dict)

    def begin_step(self, n_tokens: int, clock: float) -> None:
        self._step = {"step": self.steps, "tokens": int(n_tokens), "t0": clock, "hits": self.hits,
                      "late": self.late, "misses": self.misses, "stall_s": self.stall_s,
                      "bytes": self.bytes_copied, "prefetch": self.prefetch_issued}

    def end_step(self, clock: float, **extra) -> dict:
        s = self._step
        entry = {"step": s.get("step", self.steps), "tokens": s.get("tokens", 0),
                 "time_s": round(clock - s.get("t0", clock), 6),
                 "hits": self.hits - s.get("hits", 0), "late": self.late - s.get("late", 0),
                 "misses": self.misses - s.get("misses", 0),
                 "stall_s": round(self.stall_s - s.get("stall_s", 0.0), 6),
                 "bytes": self.bytes_copied - s.get("bytes", 0),
                 "prefetch": self.prefetch_issued - s.get("prefetch", 0), **extra}
        self.steps += 1
        self.tokens += entry["tokens"]
        if self.keep_log:
            self.log.append(entry)
        return entry

    def summary(self) -> dict:
        tok = max(self.tokens, 1)
        need = self.hits + self.late + self.misses
        return {
            "steps": self.steps, "tokens": self.tokens, "hits": self.hits, "late": self.late,
            "misses": self.misses, "misses_per_token": round(self.misses / tok, 3),
            "hit_rate": round(self.hits / need, 4) if need else None,
            "stall_s": round(self.stall_s, 6), "stall_per_token_s": round(self.stall_s / tok, 6),
            "copies": self.copies, "bytes_copied": self.bytes_copied,
            "copy_gbps": round(self.bytes_copied / self.copy_s / 1e9, 3) if self.copy_s > 0 else None,
            "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
            "prefetch_wasted": self.prefetch_wasted, "prefetch_dropped": self.prefetch_dropped,
            "prefetch_precision": round(self.prefetch_used / self.prefetch_issued, 4) if self.prefetch_issued else None,
        }
