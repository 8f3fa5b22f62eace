"""Timeline recording of the offload runtime: compute, copy and stall intervals for a few steps.

Format (shared with the plot; OffloadStats.timeline is the list, None = not recording):
  {"step": int, "layer": int (model layer), "kind": "compute" | "copy" | "stall",
   "t0": float, "t1": float (seconds from the start of recording), "expert": int | None (flat id)}
"compute" is a layer's (or a graph segment's) device work, "copy" one expert's host->device load,
"stall" the compute side waiting for a copy.

Two clocks:
  CUDA (CudaEngine): intervals are pairs of CUDA events (a segment's launch bracketed on the compute
  stream, a copy's start / end events on the copy stream, the timing events around a compute-stream
  wait). They are converted at the end of each recorded step (one device sync then: record only a
  few steps, outside timed runs) into seconds from an origin event recorded on the compute stream
  when recording began, after a device sync (so everything recorded later runs after it); when
  recording stops, times are shifted so none is negative (clock jitter).
  Host / virtual clocks (VirtualEngine, ThreadEngine): intervals are clock readings.
The runtime installs a tap on the copy engine while recording, so every load (demand or
prefetch) is seen, whoever issues it.
"""
from __future__ import annotations


def _is_cuda_event(x) -> bool:
    return hasattr(x, "record") and hasattr(x, "synchronize")


class _Tap:
    """The copy engine seen through the recorder: submit() also records the copy."""

    def __init__(self, inner, rec: "TimelineRecorder"):
        self.inner, self.rec = inner, rec

    def submit(self, nbytes: int, fn, **job):
        ev = self.inner.submit(nbytes, fn, **job)
        self.rec.copy(job.get("slot"), ev)
        return ev

    def __getattr__(self, name):
        return getattr(self.inner, name)


class TimelineRecorder:
    def __init__(self, runtime, events: list, steps: int):
        self.rt, self.out, self.left = runtime, events, max(0, int(steps))
        self.step = 0
        self.origin = None              # CUDA event or clock reading
        self.pending: list = []         # (step, layer, kind, a, b, expert) with CUDA events a, b
        self.emitted: list = []         # dicts written to `out` by this recorder
        self.pf = runtime.prefetcher
        self.inner = self.pf.engine
        self.pf.engine = _Tap(self.inner, self)

    @property
    def done(self) -> bool:
        return self.left <= 0

    # ---- recording -------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        self.step = int(step)
        if self.origin is None:
            compute = getattr(self.inner, "compute", None)
            if hasattr(self.inner, "drain_stall"):              # CUDA: an event on the compute stream
                import cupy
                cupy.cuda.Device().synchronize()     # both streams idle: whatever is recorded later
                ev = cupy.cuda.Event()               # runs after the origin (no negative times)
                ev.record(compute or cupy.cuda.get_current_stream())
                ev.synchronize()
                self.origin = ev
            else:
                self.origin = self.rt.clock.now()

    def _add(self, layer: int, kind: str, a, b, expert) -> None:
        if _is_cuda_event(a):
            self.pending.append((self.step, int(layer), kind, a, b, expert))
            return
        o = self.origin if isinstance(self.origin, float) else 0.0
        self._emit(self.step, layer, kind, float(a) - o, float(b) - o, expert)

    def _emit(self, step, layer, kind, t0, t1, expert) -> None:
        d = {"step": int(step), "layer": int(layer), "kind": kind, "t0": float(t0), "t1": float(t1),
             "expert": None if expert is None else int(expert)}
        self.out.append(d)
        self.emitted.append(d)

    def compute(self, layer: int, a, b) -> None:
        """Device work of `layer` between a and b (CUDA events or clock readings)."""
        self._add(layer, "compute", a, b, None)

    def stall(self, layer: int, flat: int | None, a, b) -> None:
        self._add(layer, "stall", a, b, flat)

    def copy(self, slot, ev) -> None:
        """A load just submitted into `slot` (its owner in the cache names the expert)."""
        if slot is None:
            return
        cache, store = self.rt.cache, self.rt.store
        flat = int(cache.owner[slot])
        layer = store.layers[flat // cache.E]
        start, end = getattr(ev, "start", None), getattr(ev, "end", None)
        if _is_cuda_event(start) and _is_cuda_event(end):
            self._add(layer, "copy", start, end, flat)
        elif hasattr(ev, "finish"):                              # VirtualEngine: FIFO on its clock
            self._add(layer, "copy", ev.finish - ev.seconds, ev.finish, flat)

    # ---- finishing ---------------------------------------------------------------------------------
    def end_step(self) -> bool:
        """Convert this step's CUDA intervals (device sync); True once the last step is recorded."""
        if self.pending:
            import cupy
            for step, layer, kind, a, b, expert in self.pending:
                b.synchronize()
                t0 = cupy.cuda.get_elapsed_time(self.origin, a) / 1e3
                t1 = cupy.cuda.get_elapsed_time(self.origin, b) / 1e3
                self._emit(step, layer, kind, t0, t1, expert)
            self.pending.clear()
        self.left -= 1
        if self.done:
            self.close()
        return self.done

    def close(self) -> None:
        """Stop recording: remove the tap, shift times so the earliest is 0."""
        if self.pf.engine is not self.inner and isinstance(self.pf.engine, _Tap):
            self.pf.engine = self.inner
        lo = min((d["t0"] for d in self.emitted), default=0.0)
        if lo < 0:
            for d in self.emitted:
                d["t0"] -= lo
                d["t1"] -= lo
        self.left = 0
