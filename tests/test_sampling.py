"""Sampling: each filter's exact mask, HF's warpers as the reference, seeded draws, stop strings."""
from __future__ import annotations

import numpy as np
import pytest

from efengine.errors import ConfigError
from efengine.sampling import (Sampler, SamplingParams, StopStrings, apply_repetition_penalty, draw, min_p_filter,
                               softmax, top_k_filter, top_p_filter)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def kept(x) -> list[int]:
    return [int(i) for i in np.flatnonzero(np.isfinite(x))]


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-1), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(min_p=1.2), "min_p"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(seed=-3), "seed"), (dict(seed=1.5), "seed"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_invalid_values_name_the_knob(kw, name):
    with pytest.raises(ConfigError, match=name):
        SamplingParams(**kw)


def test_stop_strings_normalized_and_checked():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    with pytest.raises(ConfigError, match="stop"):
        SamplingParams(stop=["ok", ""])


def test_repetition_penalty_math():
    logits = np.array([2.0, -1.0, 0.5, 3.0], np.float32)
    out = apply_repetition_penalty(logits, [0, 1, 1], 2.0)
    # seen positive logits are divided, seen negative ones multiplied; unseen unchanged
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]          # input untouched
    assert apply_repetition_penalty(logits, [3], 0.5).tolist() == [2.0, -1.0, 0.5, 6.0]


def test_top_k_mask_keeps_ties():
    x = np.array([1.0, 5.0, 3.0, 5.0, 2.0], np.float32)
    assert kept(top_k_filter(x, 1)) == [1, 3]                # both 5s tie for first
    assert kept(top_k_filter(x, 3)) == [1, 2, 3]
    assert kept(top_k_filter(x, 0)) == [0, 1, 2, 3, 4]
    assert kept(top_k_filter(x, 9)) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("p, expect", [(0.3, [0]), (0.75, [0, 1]), (0.9, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_mask(p, expect):
    # probabilities 0.5 0.3 0.15 0.05: the smallest set reaching p
    assert kept(top_p_filter(LOGITS, p)) == expect


@pytest.mark.parametrize("m, expect", [(0.0, [0, 1, 2, 3]), (0.2, [0, 1, 2]), (0.5, [0, 1]), (0.7, [0])])
def test_min_p_mask(m, expect):
    # threshold m * 0.5
    assert kept(min_p_filter(LOGITS, m)) == expect


def test_filters_match_transformers_warpers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    for trial in range(40):
        V = int(rng.integers(5, 300))
        logits = (rng.standard_normal(V) * rng.uniform(0.5, 4)).astype(np.float32)
        history = rng.integers(0, V, int(rng.integers(0, 20)))
        p = SamplingParams(temperature=float(rng.uniform(0.2, 2)), top_k=int(rng.integers(0, V)),
                           top_p=float(rng.uniform(0.05, 1)), min_p=float(rng.uniform(0, 0.5)),
                           repetition_penalty=float(rng.uniform(0.5, 2)))
        ours = Sampler(p).filtered(logits, history)
        procs = [lp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty), lp.TemperatureLogitsWarper(p.temperature)]
        if p.top_k:
            procs.append(lp.TopKLogitsWarper(p.top_k))
        procs += [lp.TopPLogitsWarper(p.top_p), lp.MinPLogitsWarper(p.min_p)]
        ids = torch.tensor(history, dtype=torch.long)[None]
        ref = torch.tensor(logits)[None]
        for proc in procs:
            ref = proc(ids, ref)
        ref = ref[0].numpy()
        assert kept(ours) == kept(ref), f"trial {trial}"
        np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-6)


def test_greedy_is_argmax_after_penalty():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=4.0))
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    assert s.next_token(logits, []) == 1
    assert s.next_token(logits, [1]) == 2                    # 3/4 < 2


def draws(seed, n=20, logits=np.zeros(1000, np.float32)) -> list[int]:
    s = Sampler(SamplingParams(temperature=1.0, seed=seed))
    return [s.next_token(logits, []) for _ in range(n)]


def test_seeded_draws_repeat_and_differ():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_draws_follow_the_distribution():
    s = Sampler(SamplingParams(temperature=1.0, seed=0))
    n = 20000
    counts = np.bincount([s.next_token(LOGITS, []) for _ in range(n)], minlength=4) / n
    # binomial std at n=20000 is <= 0.0036; 0.015 is four of them
    np.testing.assert_allclose(counts, PROBS, atol=0.015)


def test_filtered_tokens_are_never_drawn():
    s = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=1))
    x = np.array([0.0, 1.0, 0.9, 0.1, 0.2], np.float32)
    assert {s.next_token(x, []) for _ in range(500)} == {1, 2}
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.5, seed=1))
    assert {s.next_token(LOGITS, []) for _ in range(500)} == {0, 1}


def test_draw_is_the_inverse_cdf():
    w = np.array([0, 1, 0, 3], np.float32)
    assert [draw(w, u) for u in (0.0, 0.24, 0.26, 0.999999)] == [1, 1, 3, 3]
    rng = np.random.default_rng(0)
    for block in (1, 2, 3, 1024):
        w = rng.random(1000).astype(np.float32) * (rng.random(1000) < 0.3)   # mostly zeros
        cdf = np.cumsum(w.astype(np.float64))
        for u in rng.random(300):
            want = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
            got = draw(w, u, block)
            assert got == want and w[got] > 0, (block, u)


def test_large_vocabularies_filter_like_a_full_sort():
    """The near-the-max shortcuts against plain full-sort versions on 150k-token logits."""
    rng = np.random.default_rng(1)
    for scale in (0.5, 3.0, 12.0):                           # flat to peaky
        x = (rng.standard_normal(150_000) * scale).astype(np.float32)
        order = np.argsort(x, kind="stable")
        probs = softmax(x)
        cum = np.cumsum(probs[order])
        for p in (0.5, 0.9, 0.99):
            keep = order[~(cum <= 1 - p) | (np.arange(len(x)) == len(x) - 1)]
            assert kept(top_p_filter(x, p)) == sorted(keep.tolist()), (scale, p)
        for k in (1, 40, 5000):
            assert kept(top_k_filter(x, k)) == sorted(order[-k:].tolist()), (scale, k)


def test_temperature_sharpens():
    p1 = softmax(LOGITS / 1.0)
    p_low = softmax(LOGITS / 0.5)
    np.testing.assert_allclose(p_low, PROBS ** 2 / (PROBS ** 2).sum(), rtol=1e-6)
    assert p_low[0] > p1[0]


def test_stop_strings_hold_back_and_trim():
    st = StopStrings(["END"])
    assert st.push("abc E") == ("abc ", False)               # "E" could start "END"
    assert st.push("N") == ("", False)
    assert st.push("D and more") == ("", True)               # nothing from the stop string on
    st = StopStrings(["END"])
    assert st.push("abc E") == ("abc ", False)
    assert st.push("xit") == ("Exit", False)                 # false alarm: released
    assert st.push("tail EN") == ("tail ", False)
    assert st.flush() == "EN"                                # generation ended another way


def test_stop_string_inside_one_piece_and_earliest_wins():
    st = StopStrings(["\n\n", "User:"])
    assert st.push("Hello User: hi\n\nmore") == ("Hello ", True)
    assert StopStrings([]).push("anything") == ("anything", False)
