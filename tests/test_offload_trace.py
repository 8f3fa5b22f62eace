"""Route traces: loading (token_idx / token_pos files, partial tokens skipped), validation, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from efengine.errors import ConfigError, FormatError
from efengine.offload.trace import TRACE_DIR, access_sequence, load

needs_traces = pytest.mark.skipif(not (TRACE_DIR / "gsm8k_2_routing.jsonl").exists(),
                                  reason="shared routing traces not present")


def write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def rec(problem, layer, tok, experts, key="token_idx"):
    return {"problem_id": problem, "layer": layer, key: tok, "experts": experts, "gating_probs": [0.7, 0.3]}


def test_layer_major_calls_become_token_major(tmp_path):
    # problem 0: tokens 0,1 (layer-major), token 1 lacks layer 1; problem 1: token 0
    r = [rec(0, 0, 0, [1, 2]), rec(0, 0, 1, [3, 0]), rec(0, 1, 0, [0, 3]),
         rec(1, 0, 0, [2, 1]), rec(1, 1, 0, [1, 0])]
    t = load(write(tmp_path / "x.jsonl", r))
    assert t.n_tokens == 2 and t.n_layers == 2 and t.top_k == 2 and t.skipped == 1
    np.testing.assert_array_equal(t.experts, [[[1, 2], [0, 3]], [[2, 1], [1, 0]]])
    np.testing.assert_allclose(t.probs[0, 0], [0.7, 0.3])
    # flat ids in execution order: token-major, layer-minor, layer * E + expert
    np.testing.assert_array_equal(access_sequence(t), [[1, 2], [4, 7], [2, 1], [5, 4]])


def test_token_pos_decode_calls(tmp_path):
    # decode steps logged with token_pos 0: each call is one token; layers restart at 0
    r = [rec(0, l, 0, [l % 4, (l + 1) % 4], "token_pos") for l in range(3)] * 2
    t = load(write(tmp_path / "raw.jsonl", r))
    assert t.n_tokens == 2 and t.n_layers == 3


def test_validate_names_the_file(tmp_path):
    t = load(write(tmp_path / "small.jsonl", [rec(0, 0, 0, [5, 1]), rec(0, 1, 0, [0, 1])]))
    assert t.validate(2, 8, 2).n_experts == 8
    with pytest.raises(ConfigError, match="small.*2 MoE layers, the model has 32"):
        t.validate(32, 8)
    with pytest.raises(ConfigError, match="expert id 5, the model has 4"):
        t.validate(2, 4)
    with pytest.raises(ConfigError, match="top-2 routing, the model routes top-4"):
        t.validate(2, 8, 4)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"layer": 0, "experts": [1, 2]}\n')
    with pytest.raises(FormatError, match=r"bad.jsonl:1: not a routing record"):
        load(bad)
    bad.write_text("not json\n")
    with pytest.raises(FormatError, match="bad.jsonl:1"):
        load(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(FormatError, match="empty"):
        load(empty)


@needs_traces
def test_shared_traces():
    g, h, raw = load("gsm8k_2"), load("humaneval_2"), load("routing_raw")
    assert (g.n_tokens, g.skipped, g.n_layers, g.n_experts, g.top_k) == (244, 3, 32, 8, 2)
    assert (h.n_tokens, h.skipped) == (333, 5)
    assert raw.n_layers == 32 and raw.n_tokens > 50
    # each token's experts at a layer are distinct, probabilities in rank order
    assert (g.experts[..., 0] != g.experts[..., 1]).all()
    assert (g.probs[..., 0] >= g.probs[..., 1]).all()
