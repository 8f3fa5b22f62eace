"""The numpy reference ops against closed forms and naive loops."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from efengine.config import ModelConfig
from efengine.errors import ConfigError, EfError
from efengine.experts import ExpertProvider, ResidentExperts
from efengine.model import Model
from efengine.ops import get_backend
from efengine.ops.numpy_backend import ExpertWeights

B = get_backend("numpy")
RNG = np.random.default_rng(7)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def silu(x):
    return x / (1 + np.exp(-x))


def test_get_backend():
    assert get_backend("numpy").name == "numpy"
    assert get_backend("auto").name in ("numpy", "cupy")
    with pytest.raises(ConfigError, match="unknown backend"):
        get_backend("tpu")


def test_linear_embed_rms_norm():
    x, W = randn(5, 8), randn(3, 8)
    np.testing.assert_allclose(B.linear(x, W), x.astype(np.float64) @ W.T.astype(np.float64), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(B.embed(np.array([2, 0, 2]), W), W[[2, 0, 2]])
    w = randn(8)
    ref = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(B.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)
    # per-head norm over the last axis of a 3-D array
    x3 = randn(2, 3, 8)
    np.testing.assert_allclose(B.rms_norm(x3, w, 1e-6), B.rms_norm(x3.reshape(6, 8), w, 1e-6).reshape(2, 3, 8))


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_is_complex_rotation(interleaved):
    T, h, r = 6, 3, 8
    x = randn(T, h, r)
    ang = RNG.uniform(-10, 10, (T, r // 2)).astype(np.float32)
    out = B.rope(x, np.cos(ang), np.sin(ang), interleaved)
    if interleaved:
        z, pack = x[..., 0::2] + 1j * x[..., 1::2], lambda c: np.stack([c.real, c.imag], -1).reshape(T, h, r)
    else:
        z, pack = x[..., : r // 2] + 1j * x[..., r // 2:], lambda c: np.concatenate([c.real, c.imag], -1)
    expect = pack(z * np.exp(1j * ang.astype(np.float64))[:, None, :])
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-5)
    # a rotation keeps each pair's length
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def naive_attention(q, k, v, pos0, scale):
    T, H, _ = q.shape
    G = k.shape[1]
    out = np.zeros((T, H, v.shape[2]))
    for t in range(T):
        for hh in range(H):
            g = hh // (H // G)
            s = [float(q[t, hh] @ k[j, g]) * scale for j in range(pos0 + t + 1)]
            p = np.exp(np.array(s) - max(s))
            p /= p.sum()
            out[t, hh] = sum(p[j] * v[j, g] for j in range(pos0 + t + 1))
    return out


@pytest.mark.parametrize("T,pos0,H,G,dq,dv", [(5, 0, 4, 2, 8, 8), (1, 6, 4, 1, 8, 8), (3, 4, 4, 4, 12, 6)])
def test_attention_against_naive_loop(T, pos0, H, G, dq, dv):
    q, k, v = randn(T, H, dq), randn(pos0 + T, G, dq), randn(pos0 + T, G, dv)
    np.testing.assert_allclose(B.attention(q, k, v, pos0, dq ** -0.5), naive_attention(q, k, v, pos0, dq ** -0.5),
                               rtol=1e-5, atol=1e-6)


def test_attention_query_blocks_do_not_change_results(monkeypatch):
    import efengine.ops.numpy_backend as nb
    q, k, v = randn(9, 4, 8), randn(9, 2, 8), randn(9, 2, 8)
    whole = B.attention(q, k, v, 0, 0.3)
    monkeypatch.setattr(nb, "_SCORE_ELEMS", 4 * 9 * 2)    # blocks of 2 queries
    # BLAS may sum in another order for another batch shape: equal to rounding, not bits
    np.testing.assert_allclose(B.attention(q, k, v, 0, 0.3), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(whole, naive_attention(q, k, v, 0, 0.3), rtol=1e-5, atol=1e-6)


def test_silu_mul_and_sigmoid():
    g, u = randn(4, 5), randn(4, 5)
    np.testing.assert_allclose(B.silu_mul(g, u), silu(g.astype(np.float64)) * u, rtol=1e-6)
    np.testing.assert_allclose(B.sigmoid(g), 1 / (1 + np.exp(-g.astype(np.float64))), rtol=1e-6)


def moe_cfg(**kw) -> ModelConfig:
    base = dict(arch="test", vocab_size=16, hidden_size=4, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=4,
                intermediate_size=0, n_experts=4, top_k=2, moe_intermediate_size=4, moe_layers=(0,))
    return ModelConfig(**{**base, **kw})


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_route_greedy_ties_norm_and_scaling():
    logits = np.array([[0.0, 3.0, 1.0, 3.0], [2.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    p = softmax(logits.astype(np.float64))
    ids, w = B.route(logits, moe_cfg())
    # best first; equal scores keep ascending expert id
    assert ids.tolist() == [[1, 3], [0, 1]] and ids.dtype == np.int32
    np.testing.assert_allclose(w, [[p[0, 1], p[0, 3]], [p[1, 0], p[1, 1]]], rtol=1e-6)
    _, w = B.route(logits, moe_cfg(norm_topk_prob=True, routed_scaling_factor=2.0))
    np.testing.assert_allclose(w, [[1.0, 1.0], [2 * p[1, 0] / (p[1, 0] + p[1, 1]), 2 * p[1, 1] / (p[1, 0] + p[1, 1])]],
                               rtol=1e-6)
    _, w = B.route(logits, moe_cfg(moe_weighting="ones"))
    np.testing.assert_array_equal(w, np.ones((2, 2)))


def test_route_group_limited_greedy():
    # 8 experts in 4 groups of 2 (group score = its best expert). Groups 0 (5.0) and 3 (4.9) win
    # over group 1 (4.8, 4.7), so expert 2 is out although plain greedy would take it; the third
    # pick is then a masked-to-zero tie or, in group 0, expert 1: transformers keeps in-group
    # probabilities, so expert 1 (p > 0) is chosen.
    logits = np.array([[5.0, 0.0, 4.8, 4.7, 0.0, 0.0, 4.9, 0.0]], dtype=np.float32)
    cfg = moe_cfg(n_experts=8, top_k=3, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                  routed_scaling_factor=1.5)
    ids, w = B.route(logits, cfg)
    p = softmax(logits.astype(np.float64))[0]
    assert ids.tolist() == [[0, 6, 1]]
    np.testing.assert_allclose(w[0], 1.5 * p[[0, 6, 1]], rtol=1e-6)
    ids, _ = B.route(logits, replace(cfg, topk_method="greedy"))
    assert ids.tolist() == [[0, 6, 2]]


def test_expert_ffn_and_combine():
    x = randn(3, 4)
    e = ExpertWeights(randn(5, 4), randn(5, 4), randn(4, 5))
    np.testing.assert_allclose(B.expert_ffn(x, e), (silu(x @ e.gate.T) * (x @ e.up.T)) @ e.down.T, rtol=1e-5, atol=1e-6)
    y, w = randn(3, 2, 4), randn(3, 2)
    np.testing.assert_array_equal(B.moe_combine(y, w), y[:, 0] * w[:, 0, None] + y[:, 1] * w[:, 1, None])


# ---- the MoE block with identity experts: the output is known in closed form ------------------

class DictSource:
    """A weight source over dicts (the interface EfFile has)."""

    def __init__(self, cfg, tensors, experts):
        self.config, self.tensors, self.experts = cfg, tensors, experts

    def has(self, name):
        return name in self.tensors

    def load(self, name):
        return self.tensors[name]

    def expert_weights(self, layer, e):
        return self.experts[layer, e]


def identity_moe_model(provider=None, **kw):
    """One layer, D = I = 4, E = 4. Expert e: gate = down = identity, up = (e+1) * identity, so
    expert e maps x to (e+1) * silu(x) * x. The router is 10 * identity."""
    cfg = moe_cfg(**kw)
    D, V, eye = 4, 16, np.eye(4, dtype=np.float32)
    t = {"token_embd.weight": randn(V, D), "output_norm.weight": np.ones(D, np.float32),
         "output.weight": randn(V, D), "blk.0.attn_norm.weight": np.ones(D, np.float32),
         "blk.0.ffn_norm.weight": np.ones(D, np.float32), "blk.0.ffn_gate_inp.weight": 10 * eye}
    for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
        t[f"blk.0.{n}.weight"] = eye
    experts = {(0, e): {"gate": eye, "up": (e + 1) * eye, "down": eye} for e in range(4)}
    src = DictSource(cfg, t, experts)
    return Model(src, "numpy", experts=provider(src) if provider else None)


def test_identity_moe_closed_form():
    m = identity_moe_model(norm_topk_prob=True)
    x = np.eye(4, dtype=np.float32)       # token t is the basis vector e_t
    out = m.ffn(0, x)
    # token t: logits 10 at expert t, 0 elsewhere -> experts t (weight e^10/(e^10+1)) and the
    # lowest other id (weight 1/(e^10+1)); each gives (id+1) * silu(1) at coordinate t.
    s1, big = 1 / (1 + math.exp(-1)), math.exp(10)
    for t in range(4):
        other = 0 if t else 1
        val = s1 * ((t + 1) * big + (other + 1)) / (big + 1)
        np.testing.assert_allclose(out[t], val * np.eye(4)[t], rtol=1e-6, atol=1e-7)


def test_identity_moe_ones_weighting():
    m = identity_moe_model(moe_weighting="ones", top_k=4)
    out = m.ffn(0, np.eye(4, dtype=np.float32))
    # every expert chosen with weight 1: (1+2+3+4) * silu(1) on the diagonal
    np.testing.assert_allclose(out, 10 / (1 + math.exp(-1)) * np.eye(4), rtol=1e-6, atol=1e-7)


class ReversedProvider(ExpertProvider):
    """Yields experts in descending id order (a different compute order)."""

    def __init__(self, src):
        self.src = src

    def begin_layer(self, layer, ids):
        for e in sorted(set(ids.ravel().tolist()), reverse=True):
            yield e, B.load_expert(self.src, layer, e)


class ForgetfulProvider(ReversedProvider):
    def begin_layer(self, layer, ids):
        yield from list(super().begin_layer(layer, ids))[1:]


def test_expert_order_does_not_change_bits():
    x = randn(6, 4)
    a = identity_moe_model().ffn(0, x)
    b = identity_moe_model(ReversedProvider).ffn(0, x)
    np.testing.assert_array_equal(a, b)


def test_provider_missing_expert_is_an_error():
    with pytest.raises(EfError, match="did not provide experts"):
        identity_moe_model(ForgetfulProvider).ffn(0, randn(6, 4))


def test_resident_experts_lru_cap_and_resident_first():
    m = identity_moe_model()
    src = m.source
    p = ResidentExperts(src, B, max_cached=2)
    list(p.begin_layer(0, np.array([[0, 1]])))
    p.end_layer(0)
    assert p.loads == 2 and set(p.cache) == {(0, 0), (0, 1)}
    order = [e for e, _ in p.begin_layer(0, np.array([[3, 1], [2, 1]]))]
    p.end_layer(0)
    assert order == [1, 2, 3]                   # the cached expert first, then the misses
    assert p.hits == 1 and p.loads == 4
    assert len(p.cache) <= 3                     # the layer's experts stay pinned while in use
    list(p.begin_layer(0, np.array([[0, 0]])))
    assert len(p.cache) == 2 and p.loads == 5
    with pytest.raises(ConfigError):
        ResidentExperts(src, B, max_cached=0)
