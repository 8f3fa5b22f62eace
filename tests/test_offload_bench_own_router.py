"""`efengine bench --offload --route-trace none` bookkeeping on numpy: the routing a run took becomes
a Trace for Belady, its spread is measured, and replay() records a timeline in the warm-up."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine import offload_gpu_bench as ob  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.offload import OffloadRuntime  # noqa: E402
from efengine.offload.prefetch import VirtualEngine  # noqa: E402


def test_routes_trace_and_spread():
    routes = [np.array([0, 1]), np.array([2, 3]), np.array([0, 1]), np.array([2, 1])]   # 2 tokens, 2 layers
    t = ob.routes_trace(routes, 2, 4, 2)
    assert t.experts.shape == (2, 2, 2) and t.experts[1, 1].tolist() == [2, 1]
    s = ob.routing_spread(t)
    assert s["uniform_share"] == 0.25 and s["reuse_if_uniform"] == 0.5
    assert s["reuse_from_previous_token"] == 0.75          # layer 0 reuses 2 of 2, layer 1 one of 2
    assert s["max_expert_share_mean"] == 0.5               # layer 0: expert 0 2 of 4 uses, layer 1: expert 2
    with pytest.raises(ValueError):
        ob.routes_trace(routes[:3], 2, 4, 2)


def test_predict_ahead_by_policy_and_trace():
    class A:
        predict_ahead = 3
    assert ob.predict_ahead("pregate", object(), A) == 1
    assert ob.predict_ahead("expertflow", object(), A) == 0       # history-only under a trace
    assert ob.predict_ahead("expertflow", None, A) == 3
    assert ob.predict_ahead("ondemand", None, A) == 0


def test_own_router_replay_records_routes_and_a_timeline(tiny_ef):
    ef = EfFile(tiny_ef("mixtral", experts="q4"))
    rt = OffloadRuntime(ef, "numpy", policy="pregate", slots=4, engine=VirtualEngine(1e9))
    model = Model(ef, "numpy", experts=rt)
    routes = []

    def spy(layer, logits, ids, w):
        routes.append(np.asarray(ids).reshape(-1).copy())
        return ids, w
    model.route_hook = spy
    rt.attach(model)
    r = ob.replay(model, None, 4, 6, rt=rt, timeline_steps=2)
    L = len(ef.config.moe_layers)
    assert len(routes) == 10 * L
    tl = r["timeline"]
    assert {d["step"] for d in tl} == {2, 3} and any(d["kind"] == "copy" for d in tl)
    assert r["pregate_recall_next"] is not None and r["tokens"] == 6
    trace = ob.routes_trace(routes, L, ef.n_experts, ef.config.top_k)
    assert 0 < ob.belady_misses(trace, 4, 4) <= r["copies"]      # no policy loads less than MIN
    rt.close()
