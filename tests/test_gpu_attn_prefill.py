"""Prefill attention through batched GEMMs (efengine/ops/gpu_attn_prefill.py, kernels/attn_prefill.cu).

CPU: the query-block plan (every token once, the score budget kept, every visible key inside its
block's key cut). GPU (marked `gpu`, skipped without CuPy and a CUDA device): attention_prefill
against NumpyBackend.attention on fresh random inputs (the seed is printed) for GQA, no GQA with
pos0 > 0, MLA's dq != dv and several query blocks; the softmax kernel alone (exact zeros where
masked, rows summing to 1, every compiled variant); CupyBackend.attention's dispatch.

Tolerance (BOUND, max abs error / max |ref|): both sides compute fp32 dot products of dq <= 192
terms, in different summation orders (cuBLAS tiles vs numpy's), so a scaled score differs by
about sqrt(dq) * 2^-24 * |q| |k| * scale ~ 1e-6 for these unit-normal inputs (|q| |k| scale ~
sqrt(dq)), at worst dq * 2^-24 * sqrt(dq) ~ 1e-4. An error ds in scores moves each probability by
a relative ds, so out (a convex mix of v rows) moves by <= ~2 max|ds| max|v|, while max |ref| is
of the order of max |v| (the first query's row is v_0 itself). 1e-4 thus sits ~10-100x above the
expected error, and far below what a real bug gives (a wrong mask, head or key cut: O(0.1 - 1)).
"""
from __future__ import annotations

import numpy as np
import pytest

from efengine.errors import ConfigError
from efengine.ops import gpu_attn_prefill as gap
from efengine.ops import gpu_kernels
from efengine.ops.numpy_backend import NumpyBackend

from gpu_check import cp, gpu

NB = NumpyBackend()
BOUND = 1e-4


def inputs(rng, T, H, G, dq, dv, pos0):
    S = pos0 + T
    q = rng.standard_normal((T, H, dq)).astype(np.float32)
    k = rng.standard_normal((S, G, dq)).astype(np.float32)
    v = rng.standard_normal((S, G, dv)).astype(np.float32)
    return q, k, v


def max_err(ref, got) -> float:
    assert got.shape == ref.shape and got.dtype == np.float32
    assert np.all(np.isfinite(got))
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# ---- CPU ---------------------------------------------------------------------------------------

def test_module_registered():
    assert gpu_kernels.MODULES[gap.MODULE] == ("common.cuh", "attn_prefill.cu")
    assert "attn_softmax_any" in gpu_kernels.source(gap.MODULE)


@pytest.mark.parametrize("T,H,S,pos0,budget", [(512, 32, 512, 0, gap.SCORE_BYTES), (70, 8, 70, 0, 4 * 8 * 70 * 16),
                                               (100, 4, 137, 37, 4 * 4 * 137 * 7), (5, 2, 9, 4, 1),
                                               (4096, 32, 4096, 0, gap.SCORE_BYTES)])
def test_blocks_cover_tokens_within_budget(T, H, S, pos0, budget):
    plan = gap.blocks(T, H, S, pos0, budget)
    assert plan[0][0] == 0 and plan[-1][1] == T
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))            # consecutive, no gap
    for t0, t1, sb in plan:
        assert t1 > t0
        assert 4 * H * (t1 - t0) * S <= budget or t1 - t0 == 1           # one token may exceed it
        assert sb == min(S, pos0 + t1)                                    # the last query's keys, no fewer
    if budget == gap.SCORE_BYTES and T == 512:
        assert len(plan) == 1                                             # 32 MiB of scores: one block


@pytest.mark.parametrize("S,want", [(1, "p8"), (256, "p8"), (257, "p16"), (1024, "p32"), (2048, "p64"),
                                    (2049, "any"), (5000, "any")])
def test_softmax_variant_holds_row(S, want):
    assert gap.softmax_kernel(S) == f"attn_softmax_{want}"      # the smallest whose registers hold S keys


# ---- GPU ---------------------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("T,H,G,dq,dv,pos0", [(70, 8, 2, 64, 64, 0), (100, 4, 4, 128, 128, 37),
                                              (65, 6, 3, 192, 128, 5)])
def test_attention_prefill_matches_numpy(rng, T, H, G, dq, dv, pos0):
    q, k, v = inputs(rng, T, H, G, dq, dv, pos0)
    scale = dq ** -0.5
    ref = NB.attention(q, k, v, pos0, scale)
    got = cp.asnumpy(gap.attention_prefill(cp.asarray(q), cp.asarray(k), cp.asarray(v), pos0, scale))
    assert max_err(ref, got) <= BOUND


@gpu
@pytest.mark.parametrize("pos0", [0, 300])
def test_attention_prefill_several_blocks(rng, pos0):
    """A budget of 9 tokens' scores: 14 blocks of 9 tokens (the last one 4) on a long key range
    (S = 121 / 421), each with its own key cut."""
    T, H, G, dq, dv = 121, 8, 2, 64, 64
    q, k, v = inputs(rng, T, H, G, dq, dv, pos0)
    S = pos0 + T
    budget = 4 * H * S * 9
    assert len(gap.blocks(T, H, S, pos0, budget)) == 14
    ref = NB.attention(q, k, v, pos0, dq ** -0.5)
    got = gap.attention_prefill(cp.asarray(q), cp.asarray(k), cp.asarray(v), pos0, dq ** -0.5, score_bytes=budget)
    assert max_err(ref, cp.asnumpy(got)) <= BOUND


@gpu
def test_attention_prefill_long_keys_and_strided_q(rng):
    """S = 2600 keys (the any-S softmax variant), q a strided view (a slice of a wider projection)."""
    T, H, G, d, pos0 = 80, 4, 1, 32, 2520
    q, k, v = inputs(rng, T, H, G, d, d, pos0)
    wide = np.concatenate([q, rng.standard_normal((T, H, 8)).astype(np.float32)], axis=2)
    qv = cp.asarray(wide)[:, :, :d]
    assert not qv.flags.c_contiguous
    ref = NB.attention(q, k, v, pos0, d ** -0.5)
    got = gap.attention_prefill(qv, cp.asarray(k), cp.asarray(v), pos0, d ** -0.5)
    assert max_err(ref, cp.asnumpy(got)) <= BOUND


def softmax_ref(s, R, qpos0, scale):
    """numpy: the kernel's contract on scores [G, M, S] (float64 for the reference)."""
    G, M, S = s.shape
    pos = qpos0 + np.arange(M) // R                                       # [M]
    visible = np.arange(S)[None, :] <= pos[:, None]                       # [M, S]
    x = np.where(visible, s.astype(np.float64) * np.float32(scale), -np.inf)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True), visible


@gpu
@pytest.mark.parametrize("S", [1, 37, 256, 300, 700, 1500, 2049, 3001])
def test_masked_softmax_kernel(rng, S):
    """Every variant (S up to 256, 512, 1024, 2048 and any), S off the 32-key grid; the rows of the
    first queries see few keys, later ones all of them; large scores must not overflow."""
    G, R, Tb = 2, 3, 5
    qpos0 = max(0, S - Tb - 1)                  # the last rows see every key, the first ones not all
    s = (rng.standard_normal((G, R * Tb, S)) * 30).astype(np.float32)
    s[0, 0, 0] = 1e30                           # a huge visible score: exp of the rest underflows to 0
    ref, visible = softmax_ref(s, R, qpos0, 0.125)
    d = cp.asarray(s)
    gap.masked_softmax_(d, R, qpos0, 0.125)
    got = cp.asnumpy(d)
    assert np.all(np.isfinite(got))
    masked = np.broadcast_to(~visible, got.shape)
    assert np.all(got[masked] == 0.0)                                     # exactly zero
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=0, atol=S * 2e-7 + 1e-6)
    # fp32 x - m rounds to ~|x - m| 2^-24 (|x - m| <= ~30 here): ~2e-6 relative in exp, plus the sum's
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-12)
    assert got[0, 0, 0] == 1.0


@gpu
def test_masked_softmax_rejects_bad_buffer():
    with pytest.raises(ConfigError):
        gap.masked_softmax_(cp.zeros((2, 7, 5), dtype=cp.float32), 3, 0, 1.0)     # M not a multiple of R
    with pytest.raises(ConfigError):
        gap.masked_softmax_(cp.zeros((2, 6, 5), dtype=cp.float64), 3, 0, 1.0)


@gpu
def test_attention_prefill_rejects_bad_shapes():
    q = cp.zeros((70, 6, 64), dtype=cp.float32)
    with pytest.raises(ConfigError):
        gap.attention_prefill(q, cp.zeros((70, 4, 64), cp.float32), cp.zeros((70, 4, 64), cp.float32), 0, 1.0)
    with pytest.raises(ConfigError):
        gap.attention_prefill(q, cp.zeros((70, 3, 32), cp.float32), cp.zeros((70, 3, 64), cp.float32), 0, 1.0)


@gpu
def test_backend_dispatch(rng, monkeypatch):
    """CupyBackend.attention: T >= MIN_T takes attention_prefill, shorter steps the fused kernel;
    both match the reference."""
    from efengine.ops import gpu_ops
    from efengine.ops.cupy_backend import CupyBackend
    calls = {"prefill": 0, "fused": 0}

    def counted(name, f):
        def wrapper(*a, **kw):
            calls[name] += 1
            return f(*a, **kw)
        return wrapper
    monkeypatch.setattr(gap, "attention_prefill", counted("prefill", gap.attention_prefill))
    monkeypatch.setattr(gpu_ops, "attention", counted("fused", gpu_ops.attention))
    H, G, d, pos0 = 8, 2, 64, 11
    for T, want in ((gap.MIN_T, {"prefill": 1, "fused": 0}), (gap.MIN_T - 1, {"prefill": 1, "fused": 1})):
        q, k, v = inputs(rng, T, H, G, d, d, pos0)
        ref = NB.attention(q, k, v, pos0, d ** -0.5)
        got = CupyBackend().attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), pos0, d ** -0.5)
        assert calls == want, T
        assert max_err(ref, cp.asnumpy(got)) <= BOUND
