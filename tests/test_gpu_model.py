"""The cupy backend and the CUDA-graph decode against the numpy reference on small random models.

Models are DeviceRandomSource shapes (random stored bytes made on the GPU, dequantized for the
numpy side), so both backends read the very same weights. Marked `gpu`; skipped without CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest

from efengine import quant
from efengine.config import ModelConfig

from gpu_check import HAVE_GPU, cp
from gpu_helpers import assert_replay_matches_eager, forward_following_ties  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]

TOL_DECODE = 1e-2     # fp16 activations in the GEMVs, over a whole model
TOL_PREFILL = 2e-2    # fp16 GEMM operands


def cfg_of(kind: str) -> ModelConfig:
    common = dict(vocab_size=320, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                  intermediate_size=0, rms_norm_eps=1e-5, rope_theta=1e6, max_position=256, moe_layers=(0, 1))
    if kind == "mixtral":
        return ModelConfig(arch="mixtral", n_experts=8, top_k=2, moe_intermediate_size=96, norm_topk_prob=True,
                           **common)
    return ModelConfig(arch="qwen2_moe", qkv_bias=True, n_experts=12, top_k=4, moe_intermediate_size=64,
                       n_shared_experts=1, shared_intermediate_size=160, shared_expert_gate=True, **common)


CASES = [("mixtral", "q4", "q8"), ("qwen", "f16", "f16"), ("qwen", "q8", "q4")]


def rel(a, b) -> float:
    return quant.rel_rms(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize("case", CASES)
def test_model_and_decode_graph(case):
    from efengine.model import Model
    from efengine.ops.gpu_decode import DecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    from efengine.ops.gpu_weights import PoolExperts
    kind, experts, dense = case
    cfg = cfg_of(kind)
    seed = int(np.random.default_rng().integers(1 << 30))
    print(f"random seed {seed}")
    src = DeviceRandomSource(cfg, experts=experts, dense=dense, group=32, seed=seed)
    ref = Model(src, "numpy")
    pool = src.pool()
    gm = Model(src, "cupy", experts=PoolExperts(pool))
    rc, gc = ref.new_cache(64), gm.new_cache(64)
    prompt = np.random.default_rng().integers(0, cfg.vocab_size, 11)
    lr, lg, switched = forward_following_ties(ref, gm, prompt, rc, gc)
    print(f"prefill: the reference took the GPU's experts across near ties at (layer, token) {switched}")
    assert rel(lr, lg) < TOL_PREFILL
    tok = int(np.argmax(lr[-1]))
    for _ in range(2):                                  # the GEMV path of Model.forward
        a, b = ref.forward([tok], rc), gm.forward([tok], gc)
        assert rel(a, b) < TOL_DECODE
        tok = int(np.argmax(a[-1]))
    # the graph continues the cupy cache; eager and replayed steps must agree bit for bit
    g = DecodeGraph(gm, pool, gc)
    assert_replay_matches_eager(g, tok, gc.pos)
    for step in range(4):
        if step:
            g.replay(1)
            g.stream.synchronize()
        a = ref.forward([tok], rc)
        assert rel(a[-1], cp.asnumpy(g.logits)[0]) < TOL_DECODE, step
        assert int(g.pos.get()[0]) == gc.pos + 1
        gc.pos += 1
        tok = int(g.tok.get()[0])
        assert tok == int(np.argmax(cp.asnumpy(g.logits)[0]))
    pool.check()


def test_generate_matches_step_by_step():
    from efengine.model import Model
    from efengine.ops.gpu_decode import DecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    from efengine.ops.gpu_weights import PoolExperts
    cfg = cfg_of("mixtral")
    src = DeviceRandomSource(cfg, group=32, seed=5)
    pool = src.pool()
    m = Model(src, "cupy", experts=PoolExperts(pool))
    c1 = m.new_cache(40)
    m.forward([1, 2, 3], c1)
    g = DecodeGraph(m, pool, c1)
    toks = g.generate(7, 20)
    assert c1.pos == 23
    c2 = m.new_cache(40)
    m.forward([1, 2, 3], c2)
    g2 = DecodeGraph(m, pool, c2)
    g2.start(7, 3)
    one = []
    for _ in range(20):
        g2.step_eager()
        g2.stream.synchronize()
        one.append(int(g2.tok.get()[0]))
    assert toks == one


@pytest.mark.parametrize("act", ["f16", "int8"])
@pytest.mark.parametrize("case", CASES)
def test_dependent_launches_same_bits(case, act):
    """The decode graph with programmatic dependent launches (each kernel scheduled while the one
    before it runs, and waiting for it in grid_dep) gives the plain graph's logits bit for bit."""
    from efengine.model import Model
    from efengine.ops import gpu_kernels
    from efengine.ops.gpu_decode import DecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    from efengine.ops.gpu_weights import PoolExperts
    if not gpu_kernels.pdl_supported():
        pytest.skip("programmatic dependent launch needs sm_90+ and cuLaunchKernelEx")
    kind, experts, dense = case
    cfg = cfg_of(kind)
    src = DeviceRandomSource(cfg, experts=experts, dense=dense, group=32, seed=21)
    pool = src.pool()
    m = Model(src, "cupy", experts=PoolExperts(pool))
    out = {}
    for pdl in (False, True):
        c = m.new_cache(48)
        m.forward([5, 9, 2, 7], c)
        g = DecodeGraph(m, pool, c, act=act, pdl=pdl)
        toks = g.generate(11, 24)
        out[pdl] = toks, cp.asnumpy(g.logits)
    assert out[True][0] == out[False][0]
    np.testing.assert_array_equal(out[True][1], out[False][1])
