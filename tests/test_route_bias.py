"""Cache-aware routing (offload/bias.py): off = bit-identical; on = only resident substitutes,
only within the margin, with weights the model's routing variant would give those ids."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine.errors import ConfigError  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.offload import OffloadRuntime, build_provider  # noqa: E402
from efengine.offload.bias import bias_routing, router_probs  # noqa: E402
from offload_helpers import greedy_logits  # noqa: E402
from efengine.ops import get_backend  # noqa: E402

FAMS = ("mixtral", "qwen3_moe", "deepseek_v2_grouped")


@pytest.fixture(scope="module")
def efs(tiny_ef):
    return {fam: EfFile(tiny_ef(fam)) for fam in FAMS}


def offloaded(ef, margin, slots=3, policy="ondemand"):
    rt = OffloadRuntime(ef, "numpy", policy=policy, slots=slots, route_bias=margin)
    model = Model(ef, "numpy", experts=rt)
    rt.attach(model)
    return rt, model


def recording(rt, model):
    """Wrap the installed hook: per call (layer, probs, ids in, ids out, weights out, resident)."""
    calls, hook = [], model.route_hook

    def rec(layer, logits, ids, weights):
        i = rt.store.index[layer]
        resident = rt.cache.resident.reshape(rt.cache.L, rt.cache.E)[i].copy()
        new_ids, new_w = hook(layer, logits, ids, weights)
        calls.append((layer, router_probs(logits), np.array(ids), np.array(new_ids), np.array(new_w),
                      np.array(weights), resident))
        return new_ids, new_w
    model.route_hook = rec
    return calls


@pytest.mark.parametrize("fam", FAMS)
def test_margin_zero_is_bit_identical_and_installs_nothing(efs, fam):
    ef = efs[fam]
    ref = greedy_logits(Model(ef, "numpy"), steps=6)
    rt, model = offloaded(ef, 0.0)
    assert model.route_hook is None and rt.bias is None
    assert np.array_equal(greedy_logits(model, steps=6), ref)
    assert "route_bias" not in rt.summary()
    rt.close()


@pytest.mark.parametrize("fam", FAMS)
@pytest.mark.parametrize("margin", [0.05, 0.3, 1.0])
def test_only_resident_substitutes_within_margin_with_consistent_weights(efs, fam, margin):
    ef = efs[fam]
    cfg = ef.config
    total = len(ef.expert_layers) * ef.n_experts
    rt, model = offloaded(ef, margin, slots=total // 2)
    calls = recording(rt, model)
    greedy_logits(model, steps=6)
    rt.close()
    n_sub = 0
    for layer, p, ids, new, w, w_in, resident in calls:
        for t in range(ids.shape[0]):
            assert len(set(new[t].tolist())) == cfg.top_k                  # no expert twice
            if np.array_equal(ids[t], new[t]):
                assert np.array_equal(w[t], w_in[t])                      # untouched rows keep their bits
                continue
            for a in np.flatnonzero(ids[t] != new[t]):
                old, sub = int(ids[t, a]), int(new[t, a])
                assert not resident[old] and resident[sub], (layer, t, old, sub)
                assert sub not in ids[t]                                    # an unchosen expert
                assert p[t, sub] >= p[t, old] - margin - 1e-7, (p[t, sub], p[t, old], margin)
                n_sub += 1
            want = p[t, new[t]]
            if cfg.norm_topk_prob:
                want = want / want.sum()
                assert abs(w[t].sum() - cfg.routed_scaling_factor) < 1e-5
            np.testing.assert_allclose(w[t], want * cfg.routed_scaling_factor, rtol=1e-6)
    s = rt.summary()
    assert s["rerouted_experts"] == n_sub
    if margin == 1.0:
        assert n_sub > 0              # half the experts cached: every layer has misses and residents


def test_group_limited_never_picks_outside_the_kept_groups(efs):
    ef = efs["deepseek_v2_grouped"]
    cfg = ef.config
    rt, model = offloaded(ef, 1.0, slots=6)
    calls = recording(rt, model)
    greedy_logits(model, steps=6)
    rt.close()
    G = cfg.n_experts // cfg.n_group
    for _, p, ids, new, *_ in calls:
        for t in range(ids.shape[0]):
            best = p[t].reshape(cfg.n_group, G).max(axis=1)
            kept = set(np.argsort(-best, kind="stable")[: cfg.topk_group].tolist())
            assert {int(e) // G for e in new[t]} <= kept


def test_bias_routing_substitutes_only_within_margin(efs):
    cfg = dataclasses.replace(efs["mixtral"].config, n_experts=4, top_k=2, norm_topk_prob=True,
                              routed_scaling_factor=1.0)
    # probs of 4 experts: 0.4, 0.3, 0.2, 0.1 (top 2 = {0, 1})
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32))
    b = get_backend("numpy")
    ids, w = b.route(logits, cfg)
    resident = np.array([True, False, True, False])
    for margin, want in ((0.05, [0, 1]), (0.099, [0, 1]), (0.11, [0, 2]), (1.0, [0, 2])):
        new, w2, changed = bias_routing(logits, ids, w, resident, cfg, margin)
        assert new[0].tolist() == want, margin
        assert changed[0] == (want != [0, 1])
        np.testing.assert_allclose(w2[0], np.array([0.4, 0.3 if want[1] == 1 else 0.2]) /
                                   (0.7 if want[1] == 1 else 0.6), rtol=1e-5)
    ones = dataclasses.replace(cfg, moe_weighting="ones")
    _, w3, _ = bias_routing(logits, ids, np.ones_like(w), resident, ones, 0.5)
    assert np.array_equal(w3, np.ones_like(w3))


def test_bias_saves_misses(efs):
    ef = efs["qwen3_moe"]
    misses = {}
    for margin in (0.0, 1.0):
        rt, model = offloaded(ef, margin, slots=12)
        greedy_logits(model, steps=6)
        rt.close()
        misses[margin] = rt.summary()["misses"]
    assert misses[1.0] < misses[0.0]


def test_bad_margins_and_engine_wiring(efs, tiny_ef):
    ef = efs["mixtral"]
    for bad in (-0.1, 1.5, float("nan"), "x"):
        with pytest.raises(ConfigError, match="route_bias"):
            OffloadRuntime(ef, policy="ondemand", slots=2, route_bias=bad)
    rt = build_provider(ef, "numpy", policy="ondemand", route_bias=0.1)
    assert rt.route_bias == 0.1
    rt.close()
    from efengine.engine import Engine
    with pytest.raises(ConfigError, match="route_bias"):
        Engine(tiny_ef("mixtral"), device="cpu", route_bias=0.1)
    with Engine(tiny_ef("mixtral"), device="cpu", policy="ondemand", route_bias=0.1) as eng:
        assert eng.model.route_hook is not None
    with Engine(tiny_ef("mixtral"), device="cpu", policy="ondemand") as eng:
        assert eng.model.route_hook is None


def test_cli_warns_and_bench_compares_against_lossless(tiny_ef, tmp_path, capsys):
    from efengine import cli
    from efengine.route_bias_bench import bench
    path = tiny_ef("qwen3_moe")
    rc = cli.main(["generate", str(path), "-p", "Hello", "-n", "3", "--temp", "0", "--policy", "ondemand",
                   "--route-bias", "0.1", "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "LOSSY" in err
    rc = cli.main(["generate", str(path), "-p", "Hello", "-n", "3", "--temp", "0", "--policy", "ondemand", "-q"])
    assert rc == 0 and "LOSSY" not in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 4)
    res = bench(str(path), ["ondemand"], [1.0], 0.5, 12, str(text))
    base, biased = res["rows"]
    assert base["margin"] == 0 and base["kl_mean"] == 0 and base["agree"] == 1.0 and base["rerouted"] == 0
    assert biased["rerouted"] > 0 and biased["misses_per_token"] < base["misses_per_token"]
