"""`python -m efengine.predict_bench`: recall by distance on real hidden states and on traces.

The exactness check: a tiny model whose layers leave the residual stream unchanged (attention
output and expert down projections zero) while every layer has its own router. The router of
layer c+d applied to the stream after layer c then sees exactly what layer c+d's router will see,
so the pre-gate, and the hybrid that starts from it, must name every expert (recall 1.0); an
off-by-one in layers or distances would compare against another layer's router and fail.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from efengine import predict_bench
from efengine.config import ModelConfig
from efengine.model import Model
from efengine.offload.trace import TRACE_DIR
from efmodels import expected_tensors, expert_shapes

L, E, K = 6, 8, 2
needs_traces = pytest.mark.skipif(not (TRACE_DIR / "gsm8k_2_routing.jsonl").exists(),
                                  reason="shared routing traces not present")


class ArraySource:
    """In-memory weight source: random tensors; `still` zeroes what writes to the residual stream."""

    def __init__(self, still: bool, seed: int = 0):
        self.config = ModelConfig(arch="mixtral", vocab_size=64, hidden_size=32, n_layers=L, n_heads=2,
                                  n_kv_heads=2, head_dim=16, intermediate_size=0, n_experts=E, top_k=K,
                                  moe_intermediate_size=16, moe_layers=tuple(range(L)))
        rng = np.random.default_rng(seed)
        self.t = {n: (rng.standard_normal(s) * (0.1 if c != "norm" else 0.0) + (1.0 if len(s) == 1 else 0.0))
                  .astype(np.float32) for n, s, c in expected_tensors(self.config)}
        for n in self.t:
            if n.endswith("ffn_gate_inp.weight"):
                self.t[n] *= 30.0                       # sharp routers: no near-ties
            if still and n.endswith("attn_output.weight"):
                self.t[n][:] = 0.0
        self.x = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in expert_shapes(self.config).items()}
        if still:
            self.x["down"][:] = 0.0
        self.expert_layers, self.n_experts = list(range(L)), E

    def has(self, name):
        return name in self.t

    def load(self, name):
        return self.t[name]

    def expert_weights(self, layer, e):
        return {k: v + (0.01 * (layer * E + e) if k != "down" else 0.0) for k, v in self.x.items()}


def test_recall_is_exact_when_the_stream_does_not_change():
    ids = list(np.random.default_rng(1).integers(0, 64, 80))
    cap = predict_bench.capture(Model(ArraySource(still=True), "numpy"), ids, max_d=4)
    assert (cap["pregate_ids"][L - 1] == -1).all() and (cap["pregate_ids"][0, :4] >= 0).all()
    rec = predict_bench.score_model(cap, max_d=4)
    for d in range(1, 5):
        assert rec["pregate"][d] == 1.0 and rec["hybrid"][d] == 1.0
    # routing depends on the token only, and tokens are random: history cannot be exact
    assert rec["history"][1] < 0.8
    # layers do differ: the same stream routed by layer c's own router is not layer c+1's answer
    assert (cap["true"][:, :-1] != cap["true"][:, 1:]).any()


def test_recall_is_not_exact_when_layers_change_the_stream():
    ids = list(np.random.default_rng(2).integers(0, 64, 40))
    rec = predict_bench.score_model(predict_bench.capture(Model(ArraySource(still=False), "numpy"), ids, 3), 3)
    assert rec["pregate"][1] < 1.0 and rec["pregate"][1] >= rec["pregate"][3] - 0.05


def test_trace_scoring_against_hand_counts():
    rng = np.random.default_rng(3)
    same = np.repeat(np.array([[rng.choice(E, K, replace=False) for _ in range(L)]]), 30, axis=0)
    rec = predict_bench.score_trace(same, E, max_d=3)
    assert rec["last-token"] == {1: 1.0, 2: 1.0, 3: 1.0}         # every token routes like the last
    assert rec["history"][1] > 0.9
    rnd = np.array([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(400)])
    rec = predict_bench.score_trace(rnd, E, max_d=2)
    assert rec["last-token"][1] == pytest.approx(K / E, abs=0.05)  # chance
    assert rec["history"][2] == pytest.approx(K / E, abs=0.06)


@needs_traces
def test_cli_writes_json_and_plot(tiny_ef, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    text = tmp_path / "t.txt"
    text.write_text("the prediction bench reads this text in one prefill and scores every layer. " * 2)
    out = tmp_path / "r" / "acc.json"
    rc = predict_bench.main(["--model", str(tiny_ef("qwen2_moe")), "--text", str(text), "--tokens", "30",
                             "--traces", "gsm8k_2", "--trace-tokens", "12", "--max-d", "3",
                             "--json", str(out), "--plot", str(tmp_path / "img")])
    stdout, err = capsys.readouterr()
    assert rc == 0
    res = json.loads(out.read_text())
    assert json.loads(stdout) == res
    m, tr = res["model"], res["traces"][0]
    assert m["tokens"] == 30 and set(m["recall"]) == {"pregate", "hybrid", "history", "last-token"}
    assert tr["trace"] == "gsm8k_2" and tr["tokens"] == 12 and set(tr["recall"]["history"]) == {"1", "2", "3"}
    assert all(0.0 <= v <= 1.0 for r in (m, tr) for p in r["recall"].values() for v in p.values())
    assert (tmp_path / "img" / "predict_accuracy.png").stat().st_size > 1000
    assert "gsm8k_2 (12 tok)" in err and "pregate" in err
    assert predict_bench.main(["--model", "none", "--traces", str(tmp_path / "none.jsonl")]) == 1
