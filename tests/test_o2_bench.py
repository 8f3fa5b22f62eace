"""Scenario O2's map (efengine/o2_bench.py) on numpy with tiny offloaded models: budgets -> slots,
prefill + greedy decode per cell with per-phase runtime stats, the figures (compute per layer,
missing bytes per layer, hideable), the per-cell comparison against ondemand, failed cells
recorded while the run goes on. The GPU run itself (synthetic full-size models) is marked gpu."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine import o2_bench as o2  # noqa: E402
from efengine.errors import ConfigError  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.offload import dense_nbytes  # noqa: E402
from efengine.offload.prefetch import ThreadEngine  # noqa: E402
from efengine.offload_gpu_bench import BlobStore, exact_blobs  # noqa: E402

from gpu_check import HAVE_GPU

BW = 40e6            # bytes/s of the simulated copy engine: a tiny expert copy takes ~1 ms


@pytest.fixture(scope="module", params=["qwen2_moe", "deepseek_v2"])
def ef(request, tiny_ef):
    return EfFile(tiny_ef(request.param, experts="f32"))


def env_of(ef, make_engine=None) -> o2.Env:
    return o2.Env(ef, "numpy", BlobStore(ef, exact_blobs(ef)), make_engine or (lambda: ThreadEngine(bandwidth=BW)), BW)


def greedy(ef, prompt, n):
    model = Model(ef, "numpy")
    cache = model.new_cache(len(prompt) + n + 1)
    tok, out = int(model.forward(prompt, cache, last_only=True)[-1].argmax()), []
    for _ in range(n):
        out.append(tok)
        tok = int(model.forward(np.array([tok]), cache)[-1].argmax())
    return out


def test_sizes_match_a_written_file(ef):
    s = o2.model_sizes(ef.config, experts="f32", dense="f32")
    assert (s.dense, s.blob) == (dense_nbytes(ef), ef.blob_nbytes)
    assert s.experts == len(ef.expert_layers) * ef.n_experts and s.moe_layers == len(ef.expert_layers)


def test_plan_budget_slots_clamp_and_cut():
    G = o2.GiB
    full = o2.Sizes(dense=3 * G, blob=G // 64, experts=24 * 60, moe_layers=24)     # 25.5 GiB in all
    p = o2.plan_budget(20 * G, full, top_k=4)
    assert p["slots"] == (17 * G) // (G // 64) == 17 * 64 and p["expert_budget_bytes"] == p["slots"] * full.blob
    assert p["cache_fraction"] == round(17 * 64 / 1440, 4)
    mx = o2.plan_budget("max", full)
    assert mx["gpu_bytes"] == 25 * G and mx["slots"] == 22 * 64 < full.experts
    big = o2.plan_budget(27 * G, full)                   # would hold everything: clamped to max
    assert big["slots"] == mx["slots"] and "clamped" in big["note"]
    assert o2.unique_plans([p, mx, big]) == [p, mx]
    cut = o2.Sizes(dense=G // 2, blob=G // 64, experts=4 * 60, moe_layers=4)
    c = o2.plan_budget(20 * G, full, cut, top_k=4)       # a --layers cut keeps the fraction
    assert c["slots"] == int(17 * 64 / 1440 * 240) and c["full_model_cache_fraction"] == p["cache_fraction"]
    with pytest.raises(ConfigError, match="dense"):
        o2.plan_budget(3 * G, full, top_k=4)
    with pytest.raises(ConfigError, match="GiB"):
        o2.parse_budgets("20,lots")
    assert o2.parse_budgets("20, max,0.5") == [20 * G, "max", G // 2]


def test_phase_figures_arithmetic_and_hideable():
    raw = dict(steps=4, tokens=4, wall_s=0.8, stall_s=0.2, misses=8, hits=40, late=0, copies=10,
               bytes_copied=10 * 1000, copy_s=1e-3, prefetch_issued=2, prefetch_used=1, prefetch_wasted=1)
    f = o2.phase_figures(raw, moe_layers=2, blob=1000, h2d_Bps=1e4)
    assert f["compute_per_layer_s"] == pytest.approx(0.6 / 8)
    assert f["missing_bytes_per_layer"] == pytest.approx(8 * 1000 / 8)
    assert f["copy_per_layer_s"] == pytest.approx(0.1) and f["hideable"] is False      # 0.1 s > 0.075 s
    assert f["wall_per_token_s"] == pytest.approx(0.2) and f["copy_gbps"] == pytest.approx(1e-2)
    assert o2.phase_figures(raw, moe_layers=2, blob=1000, h2d_Bps=2e4)["hideable"] is True   # 0.05 <= 0.075


def test_compare_ratios_target_and_tokens():
    def cell(pol, P, pre, dec, hide=True, toks=(1, 2)):
        ph = lambda s: {"stall_s": s, "hideable": hide, "copy_per_layer_s": 1.0, "compute_per_layer_s": 2.0}  # noqa: E731
        return {"budget_gib": 20.0, "slots": 9, "prompt": P, "policy": pol, "cache_fraction": 0.5,
                "prefill": ph(pre), "decode": ph(dec), "_tokens": list(toks)}
    cells = [cell("ondemand", 8, 1.0, 2.0), cell("expertflow", 8, 0.0005, 0.5),
             cell("ondemand", 64, 0.0, 1.0, hide=False), cell("expertflow", 64, 0.0, 0.1, toks=(1, 3)),
             {"budget_gib": 20.0, "slots": 9, "prompt": 512, "policy": "ondemand", "cache_fraction": 0.5, "error": "OOM"},
             cell("expertflow", 512, 1.0, 1.0)]
    m = {e["prompt"]: e for e in o2.compare(cells)}
    assert all("_tokens" not in c for c in cells)
    ef = m[8]["prefill"]["expertflow"]
    assert ef["stall_ratio"] == pytest.approx(5e-4) and ef["target_met"] is True
    assert m[8]["decode"]["expertflow"] == {"stall_s": 0.5, "stall_ratio": 0.25, "target_met": False}
    assert m[8]["same_tokens"] == {"expertflow": True} and m[64]["same_tokens"] == {"expertflow": False}
    assert m[64]["prefill"]["expertflow"]["stall_ratio"] is None          # nothing to hide
    assert m[64]["decode"]["expertflow"]["target_met"] is None            # not hideable: no verdict
    assert "missing" in m[512]
    v = o2.verdict(list(m.values()))
    assert v["prefill"] == {"cells": 2, "hideable": 1, "target_met": {"expertflow": 1}}
    assert v["decode"] == {"cells": 2, "hideable": 1, "target_met": {"expertflow": 0}}


def test_map_on_numpy_is_offloaded_lossless_and_accounted(ef):
    full = o2.model_sizes(ef.config, experts="f32", dense="f32")
    plans = o2.unique_plans([o2.plan_budget(full.dense + full.experts // 2 * full.blob, full, top_k=ef.config.top_k),
                             o2.plan_budget("max", full, top_k=ef.config.top_k)])
    prompts, decode = [5, 40], 6
    lines = []
    cells = o2.run_map(env_of(ef), plans, prompts, decode, ["ondemand", "expertflow"], warmup=(8, 2),
                       log=lines.append)
    assert len(cells) == len(plans) * 2 * len(prompts) == len(lines)
    blob, L = ef.blob_nbytes, len(ef.expert_layers)
    for c in cells:
        assert "error" not in c, c
        assert c["slots"] < full.experts                                  # offloaded for real
        for ph in o2.PHASES:
            f = c[ph]
            assert f["bytes_copied"] == f["copies"] * blob and f["copies"] >= f["misses"]
            assert f["stall_s"] >= 0 and f["wall_s"] > f["stall_s"]
            n = 1 if ph == "prefill" else decode
            assert f["steps"] == n
            assert f["missing_bytes_per_layer"] == pytest.approx(f["misses"] * blob / (L * n))
            assert f["compute_per_layer_s"] == pytest.approx((f["wall_s"] - f["stall_s"]) / (L * n))
        assert c["prefill"]["tokens"] == c["prompt"] and c["decode"]["tokens"] == c["decode_tokens"] == decode
    small = [c for c in cells if c["slots"] == plans[0]["slots"] and c["policy"] == "ondemand"]
    assert sum(c["decode"]["misses"] for c in small) > 0 and sum(c["decode"]["stall_s"] for c in small) > 0
    toks = {P: greedy(ef, o2.prompt_ids(P, ef.config.vocab_size), decode) for P in prompts}
    assert all(c["_tokens"] == toks[c["prompt"]] for c in cells)         # every policy, every budget
    cmap = o2.compare(cells)
    assert len(cmap) == len(plans) * len(prompts)
    assert all(e["same_tokens"] == {"expertflow": True} for e in cmap)
    for e in cmap:
        for ph in o2.PHASES:
            r = e[ph]["expertflow"]
            s0 = e[ph]["baseline_stall_s"]
            assert r["stall_ratio"] == (pytest.approx(r["stall_s"] / s0) if s0 > 0 else None)
    res = {"model": "tiny", "layers": ef.config.n_layers, "h2d_pinned_GBps": BW / 1e9, "expert_bytes": blob,
           "map": cmap, "verdict": o2.verdict(cmap)}
    assert "verdict" in o2.table(res)


def test_a_failing_cell_is_recorded_and_the_run_goes_on(ef, tmp_path):
    calls = []

    def engine():
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("out of memory allocating 20 GiB")
        return ThreadEngine()
    full = o2.model_sizes(ef.config, experts="f32", dense="f32")
    plans = [o2.plan_budget("max", full, top_k=ef.config.top_k)]
    saved = []
    cells = o2.run_map(env_of(ef, engine), plans, [4, 6], 2, ["ondemand"], warmup=(0, 0),
                       on_cell=lambda cs: saved.append(len(cs)))
    assert cells[0]["error"] == "MemoryError: out of memory allocating 20 GiB"
    assert "error" not in cells[1] and cells[1]["decode"]["steps"] == 2     # a new runtime took over
    assert saved == [1, 2]
    skipped = o2.run_map(env_of(ef), plans, [4], 2, ["ondemand"], time_limit=1e-12)
    assert "time limit" in skipped[0]["skipped"] and "missing" in o2.compare(skipped)[0]
    path = tmp_path / "o2.json"
    o2.write_json(str(path), {"cells": cells})
    assert path.read_text().startswith("{") and not list(tmp_path.glob("*.tmp*"))


def test_cli_parse_presets_and_errors():
    a = o2.parse(["--quick", "--model", "deepseek-v2-lite"])
    assert (a.layers, a.prompts, a.decode) == (o2.QUICK["layers"], o2.QUICK["prompts"], o2.QUICK["decode"])
    a = o2.parse(["--budgets", "20,max", "--prompts", "8,2048", "--decode", "128"])
    assert a.budgets == [20 * o2.GiB, "max"] and a.prompts == [8, 2048] and a.layers is None
    with pytest.raises(ConfigError, match="ondemand"):
        o2.parse(["--policies", "expertflow"])
    with pytest.raises(ConfigError, match="ondemand"):
        o2.parse(["--policies", "ondemand,magic"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("model", ["qwen1.5-moe-a2.7b", "deepseek-v2-lite"])
def test_gpu_quick_map_runs_without_errors(model, capsys):
    rc = o2.main(["--model", model, "--quick", "--layers", "2", "--prompts", "8,40", "--decode", "3",
                  "--budgets", "20,max", "--warmup-prompt", "8", "--warmup-decode", "1"])
    assert rc == 0
    import json
    res = json.loads(capsys.readouterr().out)
    assert res["cells"] and all("error" not in c for c in res["cells"]), res["cells"]
    assert all(e["same_tokens"] == {"expertflow": True} for e in res["map"])


def test_main_end_to_end_on_numpy(tiny_ef, tmp_path, monkeypatch, capsys):
    """The CLI's driver (budgets, JSON, table) with the GPU model swapped for a tiny fp16 one."""
    import json
    import efconvert.shapes
    ef = EfFile(tiny_ef("qwen2_moe", experts="f16", dense="f16"))
    sizes = o2.model_sizes(ef.config, group=64)
    monkeypatch.setattr(efconvert.shapes, "shape_config", lambda name, layers=None: (None, ef.config, {}))

    def fake_env(cfg, host_blobs, group, log):
        env = env_of(ef)
        env.host_blobs = 1
        return env, sizes
    monkeypatch.setattr(o2, "gpu_env", fake_env)
    half = (sizes.dense + sizes.experts // 2 * sizes.blob) / o2.GiB
    out = tmp_path / "o2.json"
    rc = o2.main(["--budgets", f"{half},max,30", "--prompts", "4,12", "--decode", "3", "--warmup-prompt", "6",
                  "--json", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert json.loads(out.read_text()) == res
    assert len(res["budgets"]) == 2                          # 30 GiB clamps to max: one plan
    assert len(res["cells"]) == 2 * 2 * 2 and all("error" not in c for c in res["cells"])
    assert len(res["map"]) == 4 and all(e["same_tokens"] == {"expertflow": True} for e in res["map"])
    assert "verdict" in cap.err and "ondemand" in cap.err
