"""The cluster kernels of the decode step against their numpy twins: the router (a cluster of
gpu_ops.RT_NB blocks a token, slice sums added in a fixed order) and decode attention (a cluster of
ATD_NS blocks a kv group merging partial softmaxes through distributed shared memory).

Shapes include Mixtral's (E 8, K 4096; H 32, G 8, d 128) and ones that are no multiple of the
kernels' tiles; contexts from 1 key (blocks with no key) to over a tile a block. Where the device
has no clusters (before sm_90) the same tests run the fallbacks.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from efengine import quant
from efengine.config import ModelConfig
from efengine.ops import act_int8, gpu_ref
from efengine.ops.numpy_backend import NumpyBackend

from gpu_check import HAVE_GPU, gpu, rel

if HAVE_GPU:
    import cupy as cp
    from efengine.ops import gpu_ops as ops
    from efengine.ops.gpu_weights import GpuWeight

NB = NumpyBackend()
TOL_F32 = 2e-5
TOL_Q = 3e-3


def _cfg(E: int, A: int, K: int) -> ModelConfig:
    return ModelConfig(arch="mixtral", vocab_size=64, hidden_size=K, n_layers=1, n_heads=2, n_kv_heads=1,
                       head_dim=16, intermediate_size=0, n_experts=E, top_k=A, moe_intermediate_size=16,
                       moe_layers=(0,))


# ---- router ----------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("case", [("f32", 8, 2, 4096, 1), ("f32", 60, 4, 203, 3), ("f32", 128, 8, 2048, 2),
                                  ("q8", 8, 2, 1000, 2), ("q4", 8, 2, 4096, 1), ("bf16", 3, 1, 72, 2)])
@pytest.mark.parametrize("act", ["f16", "int8"])
def test_router_cluster(rng, case, act):
    qtype, E, A, K, T = case
    if act == "int8" and qtype not in ("q4", "q8"):
        pytest.skip("int8 activations are for quantized weights")
    cfg = _cfg(E, A, K)
    w = (rng.standard_normal((E, K)) * 0.05).astype(np.float32)
    buf = quant.quantize(w, qtype, 32)
    wf = quant.dequantize(buf, qtype, (E, K), 32)
    xw = (rng.standard_normal((1, K)) * 0.05).astype(np.float32)
    xbuf = quant.quantize(xw, qtype, 32)
    xwf = quant.dequantize(xbuf, qtype, (1, K), 32)
    W, Xw = GpuWeight(qtype, (E, K), 32, cp.asarray(buf)), GpuWeight(qtype, (1, K), 32, cp.asarray(xbuf))
    x = rng.standard_normal((T, K)).astype(np.float32) * 3
    xd = cp.asarray(x)
    prep = None
    if W.quantized:
        prep = ops.XPrep(T, K, W.Kp, act)
        ops.rows_prep(xd, K, prep=prep)
    outs = []
    for _ in range(2):
        ids = cp.full((T, A), -7, dtype=cp.int32)
        wts = cp.full((T, A), np.nan, dtype=cp.float32)
        lg = cp.full((T, E), np.nan, dtype=cp.float32)
        ex = cp.full(T, np.nan, dtype=cp.float32)
        ops.router(W, T, xd, prep, cfg, ids, wts, logits=lg, extra=Xw, extra_out=ex)
        outs.append([cp.asnumpy(a) for a in (ids, wts, lg, ex)])
    (ids, wts, lg, ex), again = outs
    for a, b in zip(outs[0], again):             # a fixed summation order: the same bits every launch
        np.testing.assert_array_equal(a, b)
    if act == "int8":
        # test_gpu_int8act's bound (n + 10) u mag, plus up to 32 slice sums added
        xq = act_int8.quantize(x, W.Kp)
        bound = (math.ceil(W.Kp / 32 / 32) + 10 + 32) * 2.0 ** -24
        for b, n, got in ((buf, E, lg), (xbuf, 1, ex[:, None])):
            ref, mag = act_int8.chunk_dot(b, qtype, (n, K), 32, *xq)
            assert np.all(np.abs(got - ref) <= bound * mag)
    else:
        # the gate's single number a token is measured at the logits' scale (alone, cancellation
        # in one dot product makes its own relative error meaningless)
        tol = TOL_Q if W.quantized else TOL_F32
        ref = x.astype(np.float64) @ np.concatenate([wf, xwf]).T.astype(np.float64)
        assert rel(ref, np.concatenate([lg, ex[:, None]], axis=1)) < tol
    rids, rw = NB.route(lg, cfg)                 # routing of the logits the kernel computed
    np.testing.assert_array_equal(ids, rids)
    np.testing.assert_allclose(wts, rw, rtol=2e-6)


def check_prep(prep, act, x) -> None:
    """The fused xprep of the o projection's input x [T, H*d], bit for bit its twin's."""
    if act == "int8":
        q8, dd, qs = act_int8.quantize(x, prep.KX)
        np.testing.assert_array_equal(cp.asnumpy(prep.i8_bytes()), act_int8.kernel_bytes(q8))
        np.testing.assert_array_equal(cp.asnumpy(prep.xc), dd)
        np.testing.assert_array_equal(cp.asnumpy(prep.xs), qs)
    elif act == "f16":
        xh, xs, xc = gpu_ref.prep_ref(x, prep.KX)
        np.testing.assert_array_equal(cp.asnumpy(prep.xh).view(np.float16), xh)
        np.testing.assert_array_equal(cp.asnumpy(prep.xc), xc)


# ---- decode attention --------------------------------------------------------------------------------

CASES = [  # T, H, G, d, pos0, S (cache rows)
    (1, 32, 8, 128, 399, 400), (1, 32, 8, 128, 127, 400), (1, 32, 8, 128, 0, 400), (1, 8, 2, 64, 5, 37),
    (2, 8, 2, 128, 700, 1000), (1, 16, 2, 64, 1022, 1023), (1, 4, 4, 128, 60, 61), (3, 6, 3, 64, 9, 20),
    # several clusters a group merged through the workspace; a long cache with a short context
    (1, 8, 2, 128, 1500, 1600), (1, 32, 8, 128, 3000, 4096), (1, 32, 8, 128, 100, 4096), (2, 8, 2, 64, 2500, 2600)]


@gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("act", [None, "f16", "int8"])
def test_attention_decode(rng, case, act):
    T, H, G, d, pos0, S = case
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    k = rng.standard_normal((S, G, d)).astype(np.float32)
    v = rng.standard_normal((S, G, d)).astype(np.float32)
    ref = NB.attention(q, k[:pos0 + T], v[:pos0 + T], pos0, d ** -0.5)
    qd, kd, vd = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    p0 = cp.asarray(np.array([pos0], np.int32))
    prep = ops.XPrep(T, H * d, H * d, act) if act else None
    out = cp.full((T, H, d), np.nan, dtype=cp.float32)
    ops.attention(qd, kd, vd, p0, d ** -0.5, out=out, S=S, prep=prep)
    got = cp.asnumpy(out)
    assert rel(ref, got) < TOL_F32
    check_prep(prep, act, got.reshape(T, H * d))
    # the result depends on the visible keys only, not on the cache's size
    out2 = cp.full((T, H, d), np.nan, dtype=cp.float32)
    ops.attention(qd, kd[:pos0 + T], vd[:pos0 + T], p0, d ** -0.5, out=out2)
    np.testing.assert_array_equal(cp.asnumpy(out2), got)


@gpu
@pytest.mark.parametrize("nsplit", [1, 2, 7])
def test_attention_decode_work(rng, nsplit):
    """A caller's workspace (the decode graph's) caps the clusters a group: fewer, longer ones; the
    counters are back at zero after the launch (a graph replays it)."""
    T, H, G, d, pos0, S = 1, 32, 8, 128, 2000, 2100
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    k = rng.standard_normal((S, G, d)).astype(np.float32)
    v = rng.standard_normal((S, G, d)).astype(np.float32)
    ref = NB.attention(q, k[:pos0 + T], v[:pos0 + T], pos0, d ** -0.5)
    work = ops.AttnWork(T, H, G, d, nsplit)
    prep = ops.XPrep(T, H * d, H * d, "int8")
    out = cp.full((T, H, d), np.nan, dtype=cp.float32)
    for _ in range(2):
        ops.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(np.array([pos0], np.int32)),
                      d ** -0.5, out=out, work=work, S=S, prep=prep)
        assert int(work.counters.sum()) == 0
    got = cp.asnumpy(out)
    assert rel(ref, got) < TOL_F32
    check_prep(prep, "int8", got.reshape(T, H * d))


@gpu
def test_attention_decode_strided_q(rng):
    """q as a view with row strides (model.py's split of the qkv output): the same numbers."""
    T, H, G, d, pos0, S = 1, 8, 2, 64, 30, 40
    qkv = rng.standard_normal((T, (H + 2 * G) * d)).astype(np.float32)
    k = rng.standard_normal((S, G, d)).astype(np.float32)
    v = rng.standard_normal((S, G, d)).astype(np.float32)
    q = qkv[:, :H * d].reshape(T, H, d)
    ref = NB.attention(q, k[:pos0 + T], v[:pos0 + T], pos0, d ** -0.5)
    qd = cp.asarray(qkv)[:, :H * d].reshape(T, H, d)
    got = ops.attention(qd, cp.asarray(k), cp.asarray(v), pos0, d ** -0.5, S=pos0 + T)
    assert rel(ref, cp.asnumpy(got)) < TOL_F32


@gpu
@pytest.mark.parametrize("case", CASES[:9] + [(1, 4, 2, 96, 30, 40)])   # d = 96: qkv_rope_store, then split-K
@pytest.mark.parametrize("act", [None, "int8"])
def test_attention_rope_kv_fused(rng, case, act):
    """new_kv: q and the step's keys come as projected; the rope and the cache store happen in the
    attention launch. The same bits as qkv_rope_store then attention: output, xprep and caches."""
    T, H, G, d, pos0, S = case
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    kn, vn = (rng.standard_normal((T, G * d)).astype(np.float32) for _ in range(2))
    kc, vc = (rng.standard_normal((S, G, d)).astype(np.float32) for _ in range(2))
    ang = rng.uniform(0, 6.3, (S, d // 2))
    cos, sin = cp.asarray(np.cos(ang).astype(np.float32)), cp.asarray(np.sin(ang).astype(np.float32))
    p0 = cp.asarray(np.array([pos0], np.int32))
    outs = []
    for fused in (False, True):
        qd, knd, vnd, kcd, vcd = (cp.asarray(a) for a in (q, kn, vn, kc, vc))
        prep = ops.XPrep(T, H * d, H * d, act) if act else None
        out = cp.full((T, H, d), np.nan, dtype=cp.float32)
        if fused:
            ops.attention(qd, kcd, vcd, p0, d ** -0.5, out=out, S=S, prep=prep, new_kv=(knd, vnd, cos, sin))
        else:
            ops.qkv_rope_store(qd, knd, vnd, H, G, d, cos, sin, p0, kcd, vcd)
            ops.attention(qd, kcd, vcd, p0, d ** -0.5, out=out, S=S, prep=prep)
        outs.append([cp.asnumpy(a) for a in (out, kcd, vcd) + ((prep.xh, prep.xs, prep.xc) if prep else ())])
    assert not np.isnan(outs[0][0]).any()
    for a, b in zip(*outs):
        np.testing.assert_array_equal(b, a)
