"""Predictor (online learning from routing), adaptive horizon, and the lossy route-bias helper."""
from __future__ import annotations

import numpy as np
import pytest

from efengine.errors import ConfigError
from efengine.offload.horizon import Horizon
from efengine.offload.policy import make_policy, route_bias
from efengine.offload.predict import HybridPredictor, pregate_probs, pregate_topk

L, E, A = 6, 8, 2


def run(pred, routing, pregate=None, measure_last=100):
    """Feed routing [N, L, A] in decode order, predicting after each layer like the runtime;
    accuracy is measured over the last `measure_last` tokens (after learning)."""
    for t in range(routing.shape[0]):
        if t == routing.shape[0] - measure_last:
            pred.reset_accuracy()
        pred.begin_step()
        for l in range(L):
            pred.observe(l, routing[t, l])
            pred.predict(l, None if pregate is None else pregate(t, l))


def test_learns_reuse_across_tokens():
    rng = np.random.default_rng(0)
    r = np.zeros((300, L, A), dtype=int)
    r[0] = [rng.choice(E, A, replace=False) for _ in range(L)]
    for t in range(1, 300):                  # each layer repeats the previous token's experts 90%
        for l in range(L):
            r[t, l] = r[t - 1, l] if rng.random() < 0.9 else rng.choice(E, A, replace=False)
    p = HybridPredictor(L, E, A)
    run(p, r)
    acc = p.accuracy_by_distance()
    assert acc[L] > 0.85 and acc[1] > 0.85             # chance is A/E = 0.25


def top(P, l):
    return set(np.argsort(-P[l], kind="stable")[:A].tolist())


def test_learns_co_activation_within_a_token():
    rng = np.random.default_rng(1)

    def token():                              # layer 0 random; layer l+1 = layer l's experts + 1
        r = np.zeros((L, A), dtype=int)
        r[0] = rng.choice(E, A, replace=False)
        for l in range(1, L):
            r[l] = (r[l - 1] + 1) % E
        return r
    p = HybridPredictor(L, E, A)
    run(p, np.stack([token() for _ in range(300)]))
    # d = 1 includes layer L-1 -> layer 0 of the next token, which nothing predicts (chance 1/4):
    assert p.accuracy_by_distance()[1] > 0.85 and p.accuracy_by_distance()[L] < 0.45
    for _ in range(20):                       # fresh tokens: layers ahead of layer 2 are named exactly
        r = token()
        p.begin_step()
        for l in range(3):
            p.observe(l, r[l])
        P = p.predict(2)
        assert top(P, 3) == set(r[3].tolist()) and top(P, 4) == set(r[4].tolist())


def test_pregate_is_the_fallback_then_a_learned_feature():
    rng = np.random.default_rng(2)
    r = np.array([[rng.choice(E, A, replace=False) for _ in range(L)] for _ in range(200)])

    def oracle(t, l):                         # a perfect pre-gate for the next layer only
        pg = np.full((L, E), np.nan)
        if l + 1 < L:
            pg[l + 1] = 0.05
            pg[l + 1, r[t, l + 1]] = 0.95
        return pg
    p = HybridPredictor(L, E, A, warmup=10**9)
    p.begin_step()
    p.observe(0, r[0, 0])
    P = p.predict(0, oracle(0, 0))
    np.testing.assert_allclose(P[1], oracle(0, 0)[1])   # before it has data: the pre-gate alone
    p = HybridPredictor(L, E, A)
    run(p, r, oracle)
    # within a token the pre-gate names layer l+1 exactly; (L-1 -> 0) has no pre-gate: chance
    assert p.accuracy_by_distance()[1] == pytest.approx((L - 1) / L + 0.25 / L, abs=0.03)
    assert p.accuracy_by_distance()[2] < 0.45


def test_pregate_helpers():
    logits = np.array([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0]])
    p = pregate_probs(logits, 2)
    assert p.shape == (4,) and (p <= 1).all() and (p >= 0).all()
    assert p[0] > p[3] and p[2] > 0.99
    assert pregate_topk(logits, 2).tolist() == [0, 1, 2] or set(pregate_topk(logits, 2)) >= {0, 2}


def test_horizon_formula_bounds_and_corrections():
    h = Horizon(32, 128, 2, blob_nbytes=1000, initial=2)
    assert h() == 2 and h.formula() is None
    h.observe_copy(1000, 1e-3)               # 1 MB/s: one expert takes 1 ms
    h.observe_layer(0.5e-3, batch=1)         # 0.5 ms of compute per layer
    h.set_expected(1.5)                      # 1.5 experts to load per layer
    assert h.formula() == pytest.approx(3.0)
    assert h.end_step(stalled_predicted=0, wasted=0, used=0) == 3
    h.end_step(1, 0, 0)
    assert h.end_step(1, 0, 0) == 4          # two stalled steps in a row: gain x1.25 -> ceil(3.75)
    for _ in range(30):
        h.end_step(0, wasted=5, used=1)      # prefetches evicted unused: shrink
    assert h() == 1 and h.gain == pytest.approx(0.25)
    h.set_expected(1000)
    assert h.end_step(0, 0, 0) == 31          # bounded by the layers (and cache: 128 // 4 = 32)
    assert Horizon(32, 8, 2, 1000).s_max == 2
    assert h.log[-1]["S"] == 31 and h.log[-1]["C_s_gbps"] == pytest.approx(1e-3)
    with pytest.raises(ConfigError):
        Horizon(0, 8, 2, 1000)


def test_horizon_within_a_batch_follows_each_layer():
    h = Horizon(32, 128, 2, blob_nbytes=1000, initial=2)
    assert h.within_batch(60) == 2                     # nothing measured yet: S stays
    h.observe_copy(1000, 1e-3)
    h.observe_layer(4e-3, batch=512)                   # a prefill layer computes 4 ms
    h.set_expected(10)                                 # 10 experts to load per layer: 10 ms
    assert h.within_batch(10, first=True) == 4         # ceil(2.5) + 1: a layer is lost to the read
    assert h.within_batch(60) == 1                     # 128 slots hold one layer of 60 twice: S = 1
    h.observe_layer(40e-3, batch=512)                  # slower layers (moving average 11.2 ms)
    assert h.within_batch(10, first=True) == 2
    h.observe_layer(1e-3, batch=512)                   # faster (9.16 ms): S would be 3, but within
    assert h.within_batch(10) == 3                     # a step it only grows
    h.observe_layer(1e-1, batch=512)
    assert h.within_batch(10) == 3 and h.within_batch(10, first=True) == 2


def test_pregate_topk_on_a_device_picks_the_partitions_experts():
    """The sort path (device arrays) and the partition path (numpy) name the same union."""
    import types
    xp = types.SimpleNamespace(sort=np.sort, flatnonzero=np.flatnonzero)     # numpy behind another module
    rng = np.random.default_rng(3)
    for T in (1, 7, 300):
        lg = rng.standard_normal((T, 60)).astype(np.float32)
        assert np.array_equal(pregate_topk(lg, 4), pregate_topk(lg, 4, xp))


def test_expertflow_protects_a_batchs_expected_count():
    """A pre-gate row expecting more than top_k distinct experts (several tokens) protects its
    n most likely; one-token rows keep top_k."""
    pol = make_policy("expertflow", L, E, A, horizon=3)
    ev = pol.eviction
    ev.setup(L, E, L * E)
    pol.predictor.observe(0, [0, 1])
    pg = np.full((L, E), np.nan)
    pg[1] = np.linspace(1.0, 0.3, E)                   # a batch: sum = 5.2 -> 5 experts
    pg[2] = np.r_[0.9, 0.6, np.zeros(E - 2)]          # one token: 1.5 <= A
    ev.refresh(0, pg)
    m = ev.predicted(3).reshape(L, E)
    assert m[1].sum() == 5 and m[1, :5].all()
    assert m[2].sum() == A and ev.expected_count() == 5
    assert (ev.P[1] >= pg[1]).all()


def test_expertflow_protects_predicted_experts():
    pol = make_policy("expertflow", L, E, A, horizon=2, inner="lru")
    ev = pol.eviction
    ev.setup(L, E, 10)
    ev.P = np.full((L, E), 0.1)
    ev.P[1, 3] = ev.P[1, 4] = 0.9            # predicted at layer 1 (distance 1)
    ev.P[5, 0] = ev.P[5, 1] = 0.9            # predicted at layer 5 (distance 5: outside the horizon)
    ev.R, ev.d = ev.P, np.array([6, 1, 2, 3, 4, 5])
    prot = ev.predicted()
    assert prot.reshape(L, E)[1, [3, 4]].all() and not prot.reshape(L, E)[5].any()
    cands = np.zeros(L * E, bool)
    cands[[1 * E + 3, 5 * E + 0]] = True
    assert ev.victim(cands, cands, 0) == 5 * E + 0          # unprotected first, whatever its LRU age
    cands[5 * E + 0] = False
    assert ev.victim(cands, cands, 0) == 1 * E + 3          # only protected left
    with pytest.raises(ConfigError, match="inner eviction"):
        make_policy("expertflow", L, E, A, inner="random")
    with pytest.raises(ConfigError, match="unknown offload policy"):
        make_policy("psychic", L, E, A)


def test_route_bias_substitutes_close_resident_experts():
    scores = np.array([[5.0, 4.9, 1.0, 4.8], [5.0, 2.0, 1.0, 0.0]])
    ids = np.array([[0, 1], [0, 1]])
    resident = np.array([False, True, False, True])
    out = route_bias(scores, ids, resident, margin=0.5)
    assert out[0].tolist() == [3, 1]          # 0 missing, 3 resident within 0.5: substituted
    assert out[1].tolist() == [0, 1]          # 3 is 5.0 below expert 0: beyond the margin
    np.testing.assert_array_equal(route_bias(scores, ids, resident, 0.0), ids)
    assert ids[0].tolist() == [0, 1]          # a copy: the input is untouched
    everything = route_bias(scores, ids, np.ones(4, bool), 10.0)
    np.testing.assert_array_equal(everything, ids)
    two_missing = route_bias(np.array([[5.0, 4.9, 4.8, 4.7]]), np.array([[0, 1]]),
                             np.array([False, False, True, False]), 1.0)
    assert sorted(two_missing[0].tolist()) == [1, 2]   # one resident expert serves one choice only


def test_pregate_probs_keep_the_routers_order_when_sharp():
    # a sharp router: the naive 1 - (1 - softmax)^k rounds every unlikely expert to exactly 0
    logits = np.array([[40.0, 0.0, -5.0, 3.0, -20.0, 1.0]])
    p = pregate_probs(logits, 2)
    assert np.array_equal(np.argsort(-p, kind="stable"), np.argsort(-logits[0], kind="stable"))
    assert p[0] == 1.0 and (p[1:] > 0).all()
    soft = np.array([[0.5, 0.1, -0.3, 0.2]])        # far from saturation: the direct formula
    s = np.exp(soft[0] - soft.max())
    s /= s.sum()
    np.testing.assert_allclose(pregate_probs(soft, 3), 1 - (1 - s) ** 3, rtol=1e-12)
    two = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, -1.0]])   # union over tokens: 1 - prod(1 - p_t)
    per = [pregate_probs(two[t:t + 1], 1) for t in range(2)]
    np.testing.assert_allclose(pregate_probs(two, 1), 1 - (1 - per[0]) * (1 - per[1]), rtol=1e-12)
