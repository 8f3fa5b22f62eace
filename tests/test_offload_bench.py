"""`python -m efengine.offload_bench`: JSON out, a table, consistent figures, clear errors."""
from __future__ import annotations

import json

import pytest

from efengine import offload_bench
from efengine.offload.trace import TRACE_DIR

needs_traces = pytest.mark.skipif(not (TRACE_DIR / "gsm8k_2_routing.jsonl").exists(),
                                  reason="shared routing traces not present")


@needs_traces
def test_bench_json_and_table(capsys):
    rc = offload_bench.main(["--trace", "gsm8k_2", "--cache", "0.5,0.75", "--tokens", "30",
                             "--foresight", "8,32", "--timed"])
    out, err = capsys.readouterr()
    assert rc == 0
    res = json.loads(out)["results"][0]
    assert res["trace"] == "gsm8k_2" and res["tokens"] == 30
    assert res["ms_per_miss"] == pytest.approx(94e6 / 55e9 * 1e3, rel=1e-3)
    for row in res["caches"]:
        m = row["misses_per_token"]
        assert set(m) >= {"ondemand", "layer-freq", "expertflow", "belady", "foresight-8", "foresight-32"}
        assert all(m["belady"] <= v for v in m.values())
        assert row["transfer_ms_per_token"]["belady"] == pytest.approx(m["belady"] * res["ms_per_miss"], abs=1e-2)
        assert row["timed"]["ondemand"]["misses_per_token"] == pytest.approx(m["ondemand"], abs=1e-3)
    assert res["caches"][0]["misses_per_token"]["ondemand"] > res["caches"][1]["misses_per_token"]["ondemand"]
    assert "gsm8k_2: 30 tokens" in err and "belady" in err and "timed" in err


def test_bench_errors(capsys, tmp_path):
    assert offload_bench.main(["--cache", "0.5,2"]) == 2
    assert offload_bench.main(["--policies", "lru,oracle"]) == 2
    assert offload_bench.main(["--trace", str(tmp_path / "none.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "cache 2.0" in err and "oracle" in err and "no such file" in err


def test_bench_on_a_model(tiny_ef, capsys, tmp_path):
    pytest.importorskip("torch")
    text = tmp_path / "t.txt"
    text.write_text("hello world, the offload runtime reads this text one token at a time. " * 3)
    rc = offload_bench.main(["--model", str(tiny_ef("qwen2_moe")), "--cache", "0.5", "--tokens", "12",
                             "--text", str(text)])
    out, err = capsys.readouterr()
    assert rc == 0
    res = json.loads(out)["results"][0]
    pol = res["caches"][0]["policies"]
    assert res["tokens"] == 12 and set(pol) == {"ondemand", "pregate", "expertflow", "expertflow-history"}
    od = pol["ondemand"]
    assert od["prefetch_issued"] == 0 and od["loads_per_token"] == od["misses_per_token"]
    assert pol["expertflow"]["recall_by_distance"] and "expertflow-history" in err
    assert offload_bench.main(["--model", str(tiny_ef("qwen2_moe")), "--text", str(tmp_path / "none")]) == 1
