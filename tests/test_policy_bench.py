"""Host work of the offload policies: the bench runs, and the policies decide what was recorded.

tests/data/expertflow_decisions.json: a timed replay of gsm8k_2's first 48 tokens (Mixtral shape,
25/50/75% cache, a copy-bound and a compute-bound timing), the ordered log of every copy started
(layer, expert, prefetch, evicted) and every layer's misses, hashed. Equal digests mean the same
misses, the same prefetches and the same victims in the same order. The ondemand runs were recorded
before the host-time work (commit 85458f4) and still match; the expertflow runs were re-recorded
when its predictor moved to one learning step a token (it decides differently on purpose; the
predictor's own exactness is tests/test_predict_reference.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from efengine import policy_bench
from efengine.offload.trace import TRACE_DIR, load

REF = Path(__file__).parent / "data" / "expertflow_decisions.json"
needs_traces = pytest.mark.skipif(not (TRACE_DIR / "gsm8k_2_routing.jsonl").exists(),
                                  reason="shared routing traces not present")


@needs_traces
@pytest.mark.parametrize("conf", ["o1", "fast"])
def test_expertflow_decides_as_recorded(conf):
    ref = json.loads(REF.read_text())
    tr = load(ref["trace"]).head(ref["tokens"])
    kw = ref["configs"][conf]
    for frac in (0.25, 0.5, 0.75):
        for pol in ("ondemand", "expertflow"):
            want = ref["runs"][f"{pol}/{conf}/{frac}"]
            got = policy_bench.replay(tr, pol, fraction=frac, warmup=0, log=True, **kw)
            assert {k: got[k] for k in want} == want, f"{pol} {conf} cache {frac}"
    # the compute-bound timing does prefetch: the comparison covers prefetch decisions too
    assert sum(ref["runs"][f"expertflow/fast/{f}"]["prefetch_issued"] for f in (0.25, 0.5, 0.75)) > 100


@needs_traces
def test_cli(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = policy_bench.main(["--tokens", "12", "--warmup", "2", "--repeat", "1", "--json", str(out)])
    stdout, err = capsys.readouterr()
    assert rc == 0
    res = json.loads(out.read_text())["result"]
    assert json.loads(stdout)["result"] == res
    assert set(res["policies"]) == {"ondemand", "pregate", "expertflow"}
    for r in res["policies"].values():
        assert r["host_us_per_layer"] > 0 and len(r["decisions_sha256"]) == 64
        assert set(r["split_us_per_layer"]) == {"runtime", *policy_bench.COMPONENTS}
    assert res["policies"]["ondemand"]["split_us_per_layer"]["predictor"] == 0
    assert res["policies"]["expertflow"]["split_us_per_layer"]["predictor"] > 0
    assert "expertflow" in err
    assert policy_bench.main(["--policies", "psychic"]) == 2
