"""OffloadRuntime: the ExpertProvider (efengine/experts.py) that keeps experts in a budgeted device
cache and loads / prefetches them from the host store.

Legend: T tokens in a step, A active experts per token, L MoE layers (index i; `store.layers[i]` is
the model's layer number), E experts per layer, S horizon (layers ahead).

Per step, begin_step: expertflow requests the first layers' experts of a step of several tokens
(a prompt) before it computes. Per MoE layer (model.py calls begin_layer -> consumes every
yielded expert -> end_layer -> on_layer(layer, hidden)):
  begin_layer  count hits / late prefetches / misses, tell the policy (the predictor learns from
               this routing), pin the layer's experts, start demand copies of the misses, then
               yield resident experts first and wait only on the events of the misses, one at a
               time, as the model asks for the next expert (its compute overlaps those copies).
               A yielded expert is unpinned: it may leave if later misses of this layer need room.
  end_layer    tick += 1; policies without hidden states plan their prefetches here
  on_layer     pregate / expertflow apply later layers' routers to the hidden state, predict,
               size the horizon and queue prefetches (priority by deadline, then probability).
The segmented CUDA-graph decode (ops/gpu_offload_decode.py) calls `demand(layer, ids)` instead of
begin_layer (copies of the misses issued first, then the bookkeeping; nothing is yielded: the
experts run in a segment launched afterwards) and `end_layer(layer, pregate=logits [S, E])`:
later layers' router logits computed on the device in the router's segment stand in for the
hidden state (rows: MoE layers i+1..i+S).
Timeline: while `stats.timeline` is a list, the first `stats.timeline_steps` steps record compute /
copy / stall events (timeline.py).
The runtime decides only where weights are and when: results equal the all-resident run bit for
bit, whatever the policy or budget.
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..errors import ConfigError, EfError
from ..experts import ExpertProvider
from .bias import RouteBias, check_margin
from .cache import FREE, LRU, READY, ExpertCache
from .horizon import Horizon
from .policy import make_policy
from .predict import pregate_probs, pregate_topk
from .prefetch import ImmediateEngine, Prefetcher, ThreadEngine
from .stats import OffloadStats
from .store import HostStore, resolve_slots
from .timeline import TimelineRecorder


class OffloadRuntime(ExpertProvider):
    """Offloaded experts behind the ExpertProvider protocol.

    OffloadRuntime(source, backend="numpy", policy="expertflow", slots=|fraction=|budget_bytes=,
                   engine=None (a copy thread), max_inflight=4, host_bytes=0,
                   backlog_layers=1.0 (prefetch only into the copy time of that many layers of compute),
                   p_prefetch=0.3 (expertflow: least predicted probability worth a copy),
                   pregate_span=0 (expertflow: pre-gate at least this many layers ahead, else S),
                   route_bias=0.0 (LOSSY when > 0: on attach, route to resident experts whose router
                   probability is within this margin of a chosen missing one; bias.py),
                   **policy options)
    then `runtime.attach(model)` so pre-gating policies see hidden states.
    """

    def __init__(self, source=None, backend="numpy", *, policy: str = "expertflow",
                 slots: int | None = None, fraction: float | None = None, budget_bytes: int | None = None,
                 store=None, pool=None, engine=None, max_inflight: int = 4, host_bytes: int = 0,
                 backlog_layers: float = 1.0, p_prefetch: float = 0.3, pregate_span: int = 0,
                 keep_log: bool = True, route_bias: float = 0.0, **policy_kw):
        self.route_bias = check_margin(route_bias)
        self.bias: RouteBias | None = None       # the installed hook (route_bias > 0 and attached)
        self.store = store if store is not None else HostStore(source, host_bytes=host_bytes)
        st = self.store
        self.n_slots = resolve_slots(st, slots, fraction, budget_bytes)
        self.backend = backend if not isinstance(backend, str) else _backend(backend)
        n_model_layers = source.config.n_layers if source is not None else st.L
        self.pool = pool if pool is not None else _make_pool(self.backend, source, st, self.n_slots, n_model_layers)
        if engine is None:        # CuPy: copies in order on the compute stream until a CUDA engine is given
            engine = ImmediateEngine() if getattr(self.backend, "name", "") == "cupy" else ThreadEngine()
        self.engine = engine
        self.clock = self.engine.clock
        self.horizon = Horizon(st.L, self.n_slots, st.A, st.blob_nbytes)
        self.policy = make_policy(policy, st.L, st.E, st.A, horizon=self.horizon, **policy_kw)
        self.cache = ExpertCache(self.n_slots, st.L, st.E, self.policy.eviction)
        self.stats = OffloadStats(keep_log=keep_log)
        self.prefetcher = Prefetcher(self.cache, self.pool, st, self.engine, self.stats,
                                     max_inflight=max_inflight, on_copy=self.horizon.observe_copy)
        self.backlog_layers, self.p_prefetch, self.pregate_span = backlog_layers, p_prefetch, pregate_span
        self.model = None
        self._chained = None
        self.tick = 0                 # MoE layer executions so far
        self.T = 1
        self._t_prev = None
        self._stall_prev = 0.0
        self._late_predicted = 0
        self._step_marks = (0, 0)
        self.defer_use: list | None = None   # slots yielded, used by a later launch (begin_layer path)
        # demand(): LRU's victim does not depend on the access being counted first (the layer's own
        # experts are pinned, the rest keep their times), so its copies may start before it is
        self._issue_first = type(self.policy.eviction) is LRU
        self.first_issue_t: float | None = None   # perf_counter of demand()'s first copy (host timing)
        self._gated: tuple | None = None     # (i, keys) a run-ahead gate may still be waiting for
        self._pred: tuple | None = None      # (i, logits [S, E]) of end_layer(pregate=)
        self._pg_next: tuple | None = None   # (i + 1, set) the next layer's router predicted
        self.pg_hits = self.pg_total = 0     # its top-k recall against what that layer routed
        self._tl: TimelineRecorder | None = None
        self._tl_of = None                   # the stats.timeline list recorded (once per list)

    # ---- wiring --------------------------------------------------------------------------------
    def attach(self, model) -> "OffloadRuntime":
        """Let pre-gating policies read hidden states (chains any on_layer hook already set)."""
        if getattr(model, "experts", None) is not self:
            raise ConfigError("attach: build the model with experts=this runtime first")
        self.model, self._chained = model, model.on_layer
        model.on_layer = self.on_layer
        if self.route_bias > 0:                  # lossy, opt-in; 0 leaves routing to the router
            self.bias = RouteBias(self, model.cfg, self.route_bias, chained=model.route_hook)
            model.route_hook = self.bias
        return self

    def close(self) -> None:
        if self._tl is not None:
            self._tl.close()
            self._tl = None
        self.engine.close()

    @property
    def recorder(self) -> TimelineRecorder | None:
        """The timeline recorder while one records (drivers add their compute intervals to it)."""
        return self._tl

    # ---- ExpertProvider ------------------------------------------------------------------------
    def begin_step(self, positions) -> None:
        self.T = int(np.asarray(positions).size)
        tl = getattr(self.stats, "timeline", None)
        if tl is not None and self._tl is None and tl is not self._tl_of:
            self._tl_of = tl
            self._tl = TimelineRecorder(self, tl, getattr(self.stats, "timeline_steps", 4))
        if self._tl is not None:
            self._tl.begin_step(self.stats.steps)
        self.stats.begin_step(self.T, self.clock.now())
        if self.policy.predictor is not None:
            self.policy.predictor.begin_step()
        self._t_prev = None
        self._late_predicted = 0
        self.prefetcher.device_at = None         # no gate runs before the step's first demand
        self._step_marks = (self.stats.prefetch_wasted, self.stats.prefetch_used)
        if self.T > 1 and self.policy.prefetch == "horizon":
            self._plan_prompt()

    def begin_layer(self, layer: int, ids):
        i = self.store.index.get(layer)
        if i is None:
            raise EfError(f"offload runtime: layer {layer} has no routed experts")
        self._time_layer()
        keys = _keys(ids)
        cache, pf, base = self.cache, self.prefetcher, i * self.cache.E
        self._score_pregate(i, keys)
        if pf.inflight or pf.timing:
            pf.poll()
        # per-expert Python on a handful of ids: cheaper than numpy calls on arrays this small
        state, pre = cache.state, cache.prefetched
        self.stats.prefetch_used += sum(1 for e in keys if pre[base + e])
        ready = [e for e in keys if state[base + e] == READY]
        late = [e for e in keys if base + e in pf.inflight]
        missing = [e for e in keys if state[base + e] == FREE]
        self.stats.hits += len(ready)
        self.stats.late += len(late)
        self.stats.misses += len(missing)
        self.horizon.observe_misses(len(missing))
        self._late_predicted += len(late) + sum(1 for e in missing if base + e in pf.requests)
        cache.access(i, keys)
        cache.pin(i, keys)
        waiting, deferred = list(late), []
        for e in missing:
            (waiting if pf.load(i, e) else deferred).append(e)
        return self._serve(i, layer, ready, waiting, deferred)

    def _serve(self, i: int, layer: int, ready: list, waiting: list, deferred: list):
        cache, pf = self.cache, self.prefetcher
        for e in ready:
            yield e, self.pool.handle(layer, e)
            self._used(i, e)
        while waiting or deferred:
            still = []
            for e in deferred:
                (waiting if pf.load(i, e) else still).append(e)
            deferred = still
            if not waiting:
                if not pf.inflight:
                    raise EfError(f"offload runtime: no slot can be freed for layer {layer}")
                self.stats.stall_s += pf.wait_any()        # a slot frees when a copy lands
                continue
            pf.poll()
            e = next((x for x in waiting if cache.is_ready(i, x)), waiting[0])
            waiting.remove(e)
            if not cache.is_ready(i, e):
                self._wait(i, e)
            yield e, self.pool.handle(layer, e)
            self._used(i, e)

    def demand(self, layer: int, ids, wait: bool = True) -> list[int]:
        """begin_layer for a segment launched after this returns (OffloadDecodeGraph): nothing is
        yielded. The misses' copies are issued first (LRU: before the access is even counted), then
        the compute stream waits on the copies in flight (wait=False, run-ahead decode: the device
        waits by itself), then the stats and policy updates. Returns the slots the segment will
        read: pinned until end_layer; fence them (engine.fence) once the segment is launched."""
        i = self.store.index.get(layer)
        if i is None:
            raise EfError(f"offload runtime: layer {layer} has no routed experts")
        cache, pf, base = self.cache, self.prefetcher, i * self.cache.E
        keys = _keys(ids)
        self.first_issue_t = None
        self.settled()           # this layer's gate logged: the device is past the previous one
        if not wait:
            pf.device_at = i     # ... and at this one (or further: evictions ahead are guarded)
        if pf.inflight:
            pf.poll()
        state = cache.state
        missing = [e for e in keys if state[base + e] == FREE]
        late = [e for e in keys if base + e in pf.inflight]
        asked = sum(1 for e in missing if base + e in pf.requests)     # requested, not yet issued
        if self._issue_first:
            cache.pin(i, keys)
            deferred = self._issue(i, missing)
            self._count_layer(i, keys, missing, late, asked)
        else:                    # the policy must see the access before it picks victims
            self._count_layer(i, keys, missing, late, asked)
            cache.pin(i, keys)
            deferred = self._issue(i, missing)
        while deferred:          # every slot pinned or loading: free one as a copy lands
            if not pf.inflight:
                raise EfError(f"offload runtime: no slot can be freed for layer {layer}")
            self.stats.stall_s += pf.wait_any(host=not wait)
            deferred = self._issue(i, deferred)
        for e in keys if wait else ():
            if not cache.is_ready(i, e):
                self._wait(i, e)
        if not wait:             # run-ahead: the gate may still be polling for the misses
            self._gated = (i, keys)
        return [int(cache.slot_of[base + e]) for e in keys]

    def settled(self) -> None:
        """Run-ahead decode: the device has passed the gate of the layer demand(wait=False) served
        last (the next layer's gate logged, or the step finished), so its experts may be evicted.
        Until then end_layer keeps them pinned: the gate reads every slot again after the misses
        land, and an expert a prefetch evicted meanwhile would be waited for with no copy coming.
        Clears prefetcher.device_at (the next demand(wait=False) sets it again)."""
        if self._gated is not None:
            self.cache.unpin(*self._gated)
            self._gated = None
        self.prefetcher.device_at = None

    def _issue(self, i: int, experts: list) -> list:
        """Start the demand copies of `experts`; returns those that found no slot."""
        left = []
        for e in experts:
            if self.prefetcher.load(i, e):
                if self.first_issue_t is None:
                    self.first_issue_t = time.perf_counter()
            else:
                left.append(e)
        return left

    def _count_layer(self, i: int, keys: list, missing: list, late: list, asked: int) -> None:
        """Stats, horizon and policy updates of one layer's access (demand's bookkeeping)."""
        self._time_layer()
        self._score_pregate(i, keys)
        cache, s, base = self.cache, self.stats, i * self.cache.E
        s.prefetch_used += sum(1 for e in keys if cache.prefetched[base + e])
        s.misses += len(missing)
        s.late += len(late)
        s.hits += len(keys) - len(missing) - len(late)
        self.horizon.observe_misses(len(missing))
        self._late_predicted += len(late) + asked
        cache.access(i, keys)

    def _wait(self, i: int, e: int) -> None:
        """The compute side waits for the copy of (i, e): stall (and its timeline interval)."""
        tl = self._tl
        n = len(getattr(self.engine, "waits", ()))
        stall = self.prefetcher.wait(i, e)
        self.stats.stall_s += stall
        if tl is not None:
            waits = getattr(self.engine, "waits", None)
            if waits is not None and len(waits) > n:             # CUDA: the timing events of the wait
                tl.stall(self.store.layers[i], i * self.cache.E + e, *waits[-1])
            elif waits is None:
                now = self.clock.now()
                tl.stall(self.store.layers[i], i * self.cache.E + e, now - stall, now)

    def _used(self, i: int, e: int) -> None:
        """The model has issued its work on (i, e): the slot may be reused once that work is done.
        A CUDA engine records an event on the compute stream here (`fence(slot)`) and makes the copy
        that overwrites the slot wait for it; simulated engines have nothing to fence."""
        slot = int(self.cache.slot_of[i * self.cache.E + e])
        if self.defer_use is not None:       # a graph segment launched after begin_layer uses it:
            self.defer_use.append(slot)      # stays pinned; fenced by the caller after the launch
            return
        fence = getattr(self.engine, "fence", None)
        if fence is not None:
            fence(slot)
        self.cache.unpin(i, [e])

    def end_layer(self, layer: int, pregate=None) -> None:
        """pregate: router logits [S, E] of MoE layers i+1..i+S on this layer's state (graph path)."""
        i = self.store.index[layer]
        self.cache.unpin()
        if self._gated is not None:           # see settled()
            self.cache.pin(*self._gated)
        self.tick += 1
        if pregate is not None and self.policy.uses_hidden:
            self._pred = (i, np.asarray(pregate, dtype=np.float64).reshape(-1, self.store.E))
            try:
                self._plan(i, None)
            finally:
                self._pred = None
        elif self.model is None or not self.policy.uses_hidden:
            self._plan(i, None)

    def on_layer(self, layer: int, hidden) -> None:
        i = self.store.index.get(layer)
        if i is not None and self.policy.uses_hidden:
            self._plan(i, hidden)
        if self._chained is not None:
            self._chained(layer, hidden)

    def end_step(self) -> None:
        s = self.stats
        wasted, used = s.prefetch_wasted - self._step_marks[0], s.prefetch_used - self._step_marks[1]
        if self._tl is not None and self._tl.end_step():  # before drain: it converts the wait events
            self._tl = None
        drain = getattr(self.engine, "drain_stall", None)   # a CUDA engine's event-timed stall
        if drain is not None:
            s.stall_s += drain()
        S = self.horizon.end_step(self._late_predicted, wasted, used)
        s.end_step(self.clock.now(), horizon=S, occupancy=self.cache.occupancy())

    # ---- planning ------------------------------------------------------------------------------
    def _time_layer(self) -> None:
        """T_l: time from one MoE layer's start to the next, stall excluded."""
        now = self.clock.now()
        if self._t_prev is not None:
            self.horizon.observe_layer(now - self._t_prev - (self.stats.stall_s - self._stall_prev), self.T)
        self._t_prev, self._stall_prev = now, self.stats.stall_s

    def _router_probs(self, i2: int, hidden, device: bool = False):
        """Router logits [T, E] of MoE layer i2 on the current state: the hidden state's (eager
        path; device=True leaves them on the backend's device) or the graph path's device
        predictions (end_layer(pregate=)); None if neither has it."""
        if hidden is not None:
            logits = self.model.router_logits(self.store.layers[i2], hidden)
            if device:
                return logits
            lg = np.asarray(self.backend.to_host(logits), dtype=np.float64)
        elif self._pred is not None and 0 <= i2 - self._pred[0] - 1 < len(self._pred[1]):
            k = i2 - self._pred[0] - 1
            lg = self._pred[1][k:k + 1]
        else:
            return None
        return lg

    def _predicted_next(self, i2: int, lg, xp=np) -> np.ndarray:
        """The router's top-k of the next layer i2; kept to score it when i2 routes."""
        top = pregate_topk(lg, self.store.A, xp)
        if xp is not np:
            top = self.backend.to_host(top)
        self._pg_next = (i2, {int(e) for e in top})
        return top

    def _score_pregate(self, i: int, keys: list) -> None:
        p = self._pg_next
        if p is not None and p[0] == i:
            self.pg_hits += len(p[1].intersection(keys))
            self.pg_total += len(keys)
        self._pg_next = None

    def _plan(self, i: int, hidden) -> None:
        kind = self.policy.prefetch
        if kind == "pregate" and i + 1 < self.store.L:
            lg = self._router_probs(i + 1, hidden)
            if lg is None:
                return
            for e in self._predicted_next(i + 1, lg):
                if not self.cache.is_present(i + 1, int(e)):
                    self.prefetcher.request(i + 1, int(e), self.tick)
            self.prefetcher.pump(self.tick, max_backlog=self._backlog_bytes())
        elif kind == "horizon":
            self._plan_horizon(i, hidden)

    def _plan_horizon(self, i: int, hidden) -> None:
        ev, st, S = self.policy.eviction, self.store, self.horizon.value
        if self.T > 1:           # a prefill or batch: S follows each layer's measured compute
            S = self.horizon.within_batch(ev.expected_count(), first=i == 0)
        if hidden is not None or self._pred is not None:
            pg = np.full((st.L, st.E), np.nan)
            # a prompt's [T, E] logits are reduced where they are: only E values cross to the host
            dev = hidden is not None and self.T > 1
            xp = self.backend.xp if dev else np
            for l2 in range(i + 1, min(st.L, i + 1 + max(S, self.pregate_span))):
                lg = self._router_probs(l2, hidden, device=dev)
                if lg is not None:
                    pg[l2] = self.backend.to_host(pregate_probs(lg, st.A, xp)) if dev else pregate_probs(lg, st.A)
                    if l2 == i + 1:
                        self._predicted_next(l2, lg, xp)
            ev.refresh(i, pg)
        self._admit(ev, S)
        # still off the critical path (the device runs the segment queued before end_layer): the
        # predictor's forward pass for the next layer, so its begin_layer only applies the update
        self.policy.predictor.prepare((i + 1) % st.L)

    def _plan_prompt(self) -> None:
        """A step of T tokens: its first layers have no hidden state to pre-gate yet, but T tokens
        make most experts likely (any of them picks e with chance 1 - (1 - p)^T, p the one-token
        prediction), so their copies start before the step's first layer computes."""
        ev = self.policy.eviction
        S = self.horizon.value
        rows = ev.within(S)
        if rows.size:
            P = ev.P
            pg = np.full(P.shape, np.nan)
            pg[rows] = -np.expm1(self.T * np.log1p(-np.minimum(P[rows], 1.0 - 1e-12)))
            ev.expect(pg)
            self._admit(ev, S)

    def _admit(self, ev, S: int) -> None:
        """Request the protected experts within S that are absent and likely enough; start the best."""
        st = self.store
        P, d = ev.P, ev.d
        absent = self.cache.state == FREE                 # [L*E]
        rows = ev.within(S)
        self.horizon.set_expected(float((P[rows] * absent.reshape(st.L, st.E)[rows]).sum()) / max(rows.size, 1))
        protect = ev.predicted(S)
        want = protect & absent
        want &= P.reshape(-1) >= self._p_admit()
        pf, E = self.prefetcher, st.E
        for f in np.flatnonzero(want).tolist():
            l2, e = divmod(f, E)
            pf.request(l2, e, self.tick + int(d[l2]) - 1, -float(P[l2, e]))
        if pf.requests:
            T = ev.next_use()
            # a prefill's layers each need most of their experts: a layer's worth may be in flight
            bound = None if self.T == 1 else max(pf.max_inflight, math.ceil(ev.expected_count()))
            pf.pump(self.tick, protect=protect, worth=lambda f, v: v < 0 or T[f] < T[v],
                    max_backlog=self._backlog_bytes(), max_inflight=bound)

    def _p_admit(self) -> float:
        """Least predicted probability worth a speculative copy: a copy that is not used costs the
        demand misses queued behind it, so when misses alone load the copy engine by a factor rho
        a prediction must be right with probability ~rho (bounded to [p_prefetch, 0.9])."""
        rho = self.horizon.load_factor()
        return self.p_prefetch if rho is None else min(0.9, max(self.p_prefetch, rho))

    def _backlog_bytes(self) -> int | None:
        """Copy bytes that fit in `backlog_layers` layers of compute at the measured bandwidth:
        prefetches fill idle copy time instead of delaying the next layer's demand loads."""
        h = self.horizon
        t_l = h.layer_s.get(h.batch)
        if h.bw is None or not t_l:
            return None
        return max(self.store.blob_nbytes, int(self.backlog_layers * t_l * h.bw))

    # ---- reports -------------------------------------------------------------------------------
    def summary(self) -> dict:
        out = self.stats.summary()
        out.update(policy=self.policy.name, slots=self.n_slots, blob_bytes=self.store.blob_nbytes,
                   horizon=self.horizon.value)
        if self.bias is not None:
            out.update(route_bias=self.route_bias, rerouted_tokens=self.bias.tokens_changed,
                       rerouted_experts=self.bias.substitutions)
        if self.policy.predictor is not None:
            out["prediction_recall_by_distance"] = self.policy.predictor.accuracy_by_distance()
        if self.pg_total:       # the next layer's router on this layer's state: top-k recall
            out["pregate_recall_next"] = round(self.pg_hits / self.pg_total, 4)
            out["pregate_scored"] = self.pg_total
        return out


def _keys(ids) -> list[int]:
    """The distinct expert ids of a routing (any shape), ascending, as Python ints."""
    return sorted(set(np.asarray(ids).reshape(-1).tolist()))


def _backend(name: str):
    from ..ops import get_backend
    return get_backend(name)


def _make_pool(backend, source, store, n_slots: int, n_model_layers: int):
    if getattr(backend, "name", "numpy") == "cupy":
        from ..ops.gpu_weights import ExpertLayout, ExpertPool
        return ExpertPool(ExpertLayout.of(source), n_slots, n_model_layers, store.E)
    from .pool import SimDevicePool
    return SimDevicePool(store, n_slots, n_model_layers)
