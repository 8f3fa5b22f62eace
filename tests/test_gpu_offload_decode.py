"""OffloadDecodeGraph (per-layer CUDA-graph segments + the offload runtime) against the resident
DecodeGraph on a small random Mixtral-like model: identical greedy tokens for every policy and
cache size (lossless), misses really happen, copies go through the CudaEngine. Marked gpu."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_check import HAVE_GPU

from offload_helpers import HostBlobs  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
N = 24


def _cfg(shared: bool):
    from efengine.config import ModelConfig
    common = dict(vocab_size=320, hidden_size=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32,
                  intermediate_size=0, rms_norm_eps=1e-5, rope_theta=1e6, max_position=256)
    if shared:                      # a dense layer between MoE layers, shared expert with a gate
        return ModelConfig(arch="qwen2_moe", qkv_bias=True, moe_layers=(0, 2), n_experts=12, top_k=4,
                           moe_intermediate_size=64, n_shared_experts=1, shared_intermediate_size=160,
                           shared_expert_gate=True, **{**common, "intermediate_size": 160})
    return ModelConfig(arch="mixtral", moe_layers=(0, 1, 2), n_experts=8, top_k=2, moe_intermediate_size=96,
                       norm_topk_prob=True, **common)


def _resident_tokens(src):
    from efengine.model import Model
    from efengine.ops.gpu_decode import DecodeGraph
    from efengine.ops.gpu_weights import PoolExperts
    pool = src.pool()
    m = Model(src, "cupy", experts=PoolExperts(pool))
    c = m.new_cache(64)
    first = int(m.forward(np.array(PROMPT), c)[-1].argmax())
    return first, DecodeGraph(m, pool, c).generate(first, N)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("policy", ["ondemand", "expertflow"])
def test_segmented_offload_decode_equals_resident_graph(policy, shared):
    from efengine.model import Model
    from efengine.offload import OffloadRuntime
    from efengine.offload.cuda_engine import CudaEngine
    from efengine.ops.gpu_offload_decode import OffloadDecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(shared)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=11)
    first, ref = _resident_tokens(dev)
    assert len(set(ref)) > 3                       # the tokens carry information
    src = HostBlobs(dev)
    n_moe = len(cfg.moe_layers)
    for slots in (cfg.top_k, cfg.top_k + 3, n_moe * cfg.n_experts // 2):
        eng = CudaEngine(n_staging=2)
        rt = OffloadRuntime(src, "cupy", policy=policy, slots=slots, engine=eng)
        m = Model(src, "cupy", experts=rt)
        c = m.new_cache(64)
        assert int(m.forward(np.array(PROMPT), c)[-1].argmax()) == first
        g = OffloadDecodeGraph(m, rt, c)
        assert g.generate(first, N) == ref, slots
        rt.pool.check()
        rt.cache.check()
        s = rt.summary()
        assert s["misses"] > 0 and s["stall_s"] >= 0 and eng.stream is not g.stream
        rt.close()


def test_route_hook_overrides_device_ids():
    """A hook forcing expert ids: the resident graph and the offloaded one agree with each other
    and differ from the router's own choice (so the override reached the kernels)."""
    from efengine.model import Model
    from efengine.offload import OffloadRuntime
    from efengine.offload.cuda_engine import CudaEngine
    from efengine.ops.gpu_offload_decode import OffloadDecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    from efengine.ops.gpu_weights import ExpertPool
    cfg = _cfg(False)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=3)
    first, ref = _resident_tokens(dev)
    seen = []

    def hook(layer, logits, ids, w):
        seen.append(ids.copy())
        return np.array([[(layer + 5) % 8, 7 - layer]], np.int32), np.array([[0.7, 0.3]], np.float32)

    out = []
    for slots in (2, 24):              # 24: everything fits, so this run is the resident reference
        rt = OffloadRuntime(HostBlobs(dev), "cupy", policy="ondemand", slots=slots, engine=CudaEngine())
        assert isinstance(rt.pool, ExpertPool)
        m = Model(dev, "cupy", experts=rt)
        c = m.new_cache(64)
        m.forward(np.array(PROMPT), c)
        out.append(OffloadDecodeGraph(m, rt, c, route_hook=hook).generate(first, N))
        assert rt.summary()["misses"] > 0
        rt.close()
    assert out[0] == out[1] and out[0] != ref and len(seen) >= 2 * 3 * N
