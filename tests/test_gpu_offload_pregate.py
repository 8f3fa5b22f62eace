"""OffloadDecodeGraph with device-side predictions (pregate / expertflow on the graph path): the
same greedy tokens as the resident graph decode, prefetches really issued, the predicted router
logits equal Model.router_logits on the same residual stream, host timing and a GPU timeline.
Marked gpu."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_check import HAVE_GPU, cp

from offload_helpers import HostBlobs  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]

if HAVE_GPU:
    from test_gpu_offload_decode import N, PROMPT, _cfg, _resident_tokens  # noqa: E402


def _offloaded(src, cfg, policy, slots, **kw):
    from efengine.model import Model
    from efengine.offload import OffloadRuntime
    from efengine.offload.cuda_engine import CudaEngine
    from efengine.ops.gpu_offload_decode import OffloadDecodeGraph
    rt = OffloadRuntime(src, "cupy", policy=policy, slots=slots, engine=CudaEngine(n_staging=2))
    m = Model(src, "cupy", experts=rt)
    c = m.new_cache(64)
    first = int(m.forward(np.array(PROMPT), c)[-1].argmax())
    return rt, m, first, OffloadDecodeGraph(m, rt, c, **kw)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("policy", ["pregate", "expertflow"])
def test_predicting_graph_decode_equals_resident_and_prefetches(policy, shared):
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(shared)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=11)
    first, ref = _resident_tokens(dev)
    src = HostBlobs(dev)
    n_moe = len(cfg.moe_layers)
    issued = 0
    for slots in (cfg.top_k + 1, n_moe * cfg.n_experts // 2):
        rt, m, f0, g = _offloaded(src, cfg, policy, slots)
        assert f0 == first
        assert g.ahead == min({"pregate": 1, "expertflow": 2}[policy], n_moe - 1)
        assert g.generate(first, N) == ref, slots
        rt.pool.check()
        rt.cache.check()
        s = rt.summary()
        assert s["misses"] > 0 and s["pregate_scored"] > 0 and 0 <= s["pregate_recall_next"] <= 1
        issued += s["prefetch_issued"]
        h = g.host_times()
        assert h["router_sync_s"] > 0 and h["runtime_s"] > 0 and h["launch_s"] > 0
        assert h["to_first_copy_s"] >= 0 and h["copy_layers_per_step"] > 0
        rt.close()
    assert issued > 0                      # predictions reached the policy and it prefetched


def test_device_predictions_are_the_routers_on_the_residual_stream():
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(False)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=5)
    rt, m, first, g = _offloaded(HostBlobs(dev), cfg, "pregate", 24, predict_ahead=2)
    assert g.ahead == 2
    g.start(first, g.cache.pos)
    with g.stream:
        g._eager(0)                        # embed .. layer 0's router and the two predictions
        ids, pred = g._read_back(cfg.moe_layers[0])
    h = g.hb[g.cur].copy()
    assert pred.shape == (2, cfg.n_experts)
    for k in range(2):
        ref = cp.asnumpy(m.router_logits(cfg.moe_layers[1 + k], h))[0]
        np.testing.assert_allclose(pred[k], ref, atol=2e-2 * float(np.abs(ref).max()) + 1e-3)
        assert np.abs(pred[k] - pred[1 - k]).max() > 1e-3          # different routers, different rows
    own = cp.asnumpy(m.router_logits(cfg.moe_layers[0], h))[0]     # the ids are still layer 0's own
    assert set(ids[0].tolist()) == set(np.argsort(-own)[: cfg.top_k].tolist())
    rt.close()


def test_gpu_timeline_records_segments_copies_and_stalls():
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(False)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=11)
    first, ref = _resident_tokens(dev)
    rt, m, _, g = _offloaded(HostBlobs(dev), cfg, "pregate", cfg.top_k + 1)
    rt.stats.timeline, rt.stats.timeline_steps = [], 3
    assert g.generate(first, N) == ref                 # recording changes nothing
    tl = rt.stats.timeline
    kinds = {d["kind"] for d in tl}
    assert {"compute", "copy", "stall"} <= kinds
    assert len({d["step"] for d in tl}) == 3
    assert sum(d["kind"] == "compute" for d in tl) == 3 * len(g.segs)
    assert 0.0 <= min(d["t0"] for d in tl) < 0.05 and all(d["t1"] >= d["t0"] for d in tl)
    assert max(d["t1"] for d in tl) < 10.0
    seg = sorted((d["t0"], d["t1"]) for d in tl if d["kind"] == "compute")
    assert all(b[0] >= a[1] - 1e-6 for a, b in zip(seg, seg[1:]))   # one stream: segments in order
    assert rt.recorder is None
    rt.close()
