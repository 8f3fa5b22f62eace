"""Host work of the offload policies: the bench runs, and expertflow's faster host path decides
exactly what the original one did.

tests/data/expertflow_decisions.json was recorded with the code before the host-time work (commit
85458f4): a timed replay of gsm8k_2's first 48 tokens (Mixtral shape, 25/50/75% cache, a copy-bound
and a compute-bound timing), the ordered log of every copy started (layer, expert, prefetch,
evicted) and every layer's misses, hashed. Equal digests mean the same misses, the same prefetches
and the same victims in the same order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from efengine import policy_bench
from efengine.offload.predict import HybridPredictor
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
    assert ref["runs"]["expertflow/fast/0.5"]["prefetch_issued"] > 100


def _feed(p, routing):
    for t in range(routing.shape[0]):
        p.begin_step()
        for c in range(routing.shape[1]):
            p.observe(c, routing[t, c])
            p.predict(c)
            p.prepare((c + 1) % routing.shape[1])


def test_predictor_fast_path_invariants():
    L, E, A = 6, 8, 2
    rng = np.random.default_rng(0)
    routing = np.array([[rng.choice(E, A, replace=False) for _ in range(L)] for _ in range(60)])
    p = HybridPredictor(L, E, A, warmup=L)
    _feed(p, routing)
    # the reuse head's masked weights stay exactly +0.0, so W needs no mask multiply
    assert (p.W[0, :, 7:9] == 0).all() and not np.signbit(p.W[0, :, 7:9]).any()
    assert (p.W[1, :, 7:9] != 0).any()                  # the route head did learn co-activation
    # the forward pass predict() fused for the next layer (from the logits of every layer) equals a
    # fresh one from that layer's features alone
    p.begin_step()
    p.observe(0, routing[0, 0])
    p.predict(0)
    fused = p._prep
    assert fused[0] == 1
    p._prep = None
    p.prepare(1)
    fresh = p._prep
    assert fused[:2] == fresh[:2]
    np.testing.assert_allclose(fused[2], fresh[2], rtol=1e-13, atol=0)
    # co-activation features of the pending predictions reach the learning step
    assert p.co_pend[1, 0, :, 1].all() and p.pend_ok[1].all()


def test_recall_counting_is_batched_but_exact():
    L, E, A = 4, 8, 2
    rng = np.random.default_rng(1)
    routing = np.array([[rng.choice(E, A, replace=False) for _ in range(L)] for _ in range(100)])
    p = HybridPredictor(L, E, A, warmup=L)
    hits = np.zeros(L + 1)
    total = np.zeros(L + 1)
    orig = p._learn

    def learn(t, y, xb):                 # count the recall by hand from the pending predictions
        prep = p._prep
        P = prep[2] if prep is not None and prep[:2] == (t, p.version) else p._pending_probs(t, xb)
        for o in np.flatnonzero(p.pend_ok[t]):
            top = np.argsort(-P[1, o], kind="stable")[:A]
            hits[o + 1] += y[top].sum()
            total[o + 1] += min(A, y.sum())
        orig(t, y, xb)
    p._learn = learn
    _feed(p, routing)
    acc = p.accuracy_by_distance()
    assert acc == {d: round(float(hits[d] / total[d]), 4) for d in range(1, L + 1) if total[d]}


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
