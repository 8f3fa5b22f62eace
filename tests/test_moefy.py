"""MoE-fication: balanced clustering, router fit, and whole tiny models (K = E is the dense model)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf", reason="GGUF tests need the gguf package (a declared dependency)")
import gguf_tiny
from efconvert import moefy
from efconvert.gguf_convert import convert_gguf
from efengine.errors import ConfigError
from efengine.format import EfFile

RNG = np.random.default_rng(0)


def test_balanced_assign_fills_every_cluster_exactly():
    dist = RNG.random((24, 4))
    dist[:, 0] -= 1.0             # everybody prefers cluster 0
    labels = moefy.balanced_assign(dist, 6)
    assert np.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    # the cheapest pairs go first: cluster 0 gets the six rows closest to it, the rest spill over
    assert set(np.flatnonzero(labels == 0)) == set(np.argsort(dist[:, 0])[:6].tolist())


def test_balanced_kmeans_recovers_planted_clusters():
    E, n, dim = 4, 16, 32
    centers = np.linalg.qr(RNG.standard_normal((dim, E)))[0].T * 5      # orthogonal directions
    truth = np.repeat(np.arange(E), n)
    points = centers[truth] + RNG.standard_normal((E * n, dim)) * 0.3
    perm = RNG.permutation(E * n)
    labels = moefy.balanced_kmeans(points[perm], E)
    # the same partition up to renaming the clusters
    pairs = {(int(a), int(b)) for a, b in zip(labels, truth[perm])}
    assert len(pairs) == E and np.bincount(labels).tolist() == [n] * E


def test_router_fit_recovers_linear_scores():
    """When expert output norms are a linear function of x, least squares finds it."""
    T, D, E, I = 400, 16, 4, 3
    X = RNG.standard_normal((T, D)).astype(np.float32)
    gate = RNG.standard_normal((E * I, D)).astype(np.float32)
    down = RNG.standard_normal((D, E * I)).astype(np.float32)
    groups = np.arange(E * I).reshape(E, I)
    acts = moefy.activations(gate, gate, X)
    norms = moefy.expert_norms(groups, down, acts)
    R = moefy.fit_router(groups, gate, down, X, acts, ridge=1e-6)
    fitted = X @ R.T
    # least squares residual is orthogonal to X: no linear score explains the norms better
    resid = norms - fitted
    assert np.abs(X.T @ resid).max() / np.abs(X.T @ norms).max() < 1e-3


def test_split_layer_partitions_the_neurons():
    F, D, T, E, S = 48, 16, 64, 4, 16
    gate, up = RNG.standard_normal((F, D)), RNG.standard_normal((F, D))
    down = RNG.standard_normal((D, F))
    X = RNG.standard_normal((T, D))
    shared, groups, router = moefy.split_layer(gate, up, down, X, E, S)
    assert shared.shape == (S,) and groups.shape == (E, (F - S) // E) and router.shape == (E, D)
    assert sorted(np.concatenate([shared, groups.ravel()]).tolist()) == list(range(F))
    # every expert's output plus the shared part is the dense FFN
    acts = moefy.activations(gate, up, X)
    total = acts[:, shared] @ down[:, shared].T + sum(acts[:, g] @ down[:, g].T for g in groups)
    np.testing.assert_allclose(total, acts @ down.T, rtol=1e-5, atol=1e-5)


# ---- whole models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    pytest.importorskip("torch")
    import transformers
    import torch
    tmp = tmp_path_factory.mktemp("moefy")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp / "hf")
    return gguf_tiny.from_hf(tmp / "hf", tmp / "llama.gguf")


def _logits(path, ids):
    from efengine.model import Model
    m = Model(EfFile(path))
    return m.forward(ids, m.new_cache(len(ids)))


@pytest.mark.parametrize("E,shared", [(4, None), (8, 0), (2, 32)])
def test_all_experts_reproduce_the_dense_model(llama_gguf, tmp_path, E, shared):
    dense = convert_gguf(llama_gguf, tmp_path / "dense.ef", progress=False)
    moe = convert_gguf(llama_gguf, tmp_path / "moe.ef", progress=False, moefy=(E, E), shared=shared)
    ef = EfFile(moe)
    cfg = ef.config
    S = 48 if shared is None else shared
    assert (cfg.n_experts, cfg.top_k, cfg.moe_weighting, cfg.moe_layers) == (E, E, "ones", (0, 1))
    assert cfg.moe_intermediate_size == (96 - S) // E and cfg.shared_intermediate_size == S
    assert ef.meta["moefy"]["calibration"].startswith("random")      # this GGUF has no tokenizer
    ids = np.random.default_rng(2).integers(0, 128, 10)
    a, b = _logits(dense, ids), _logits(moe, ids)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-5


def test_fewer_experts_use_the_same_neurons(llama_gguf, tmp_path):
    """With K < E the stored experts are still exactly the dense FFN's neurons, each once."""
    dense = EfFile(convert_gguf(llama_gguf, tmp_path / "dense.ef", progress=False))
    moe = EfFile(convert_gguf(llama_gguf, tmp_path / "moe.ef", progress=False, moefy=(4, 2)))
    for l in (0, 1):
        gate = np.concatenate([moe.load(f"blk.{l}.ffn_gate_shexp.weight")]
                              + [moe.expert_weights(l, e)["gate"] for e in range(4)])
        down = np.concatenate([moe.load(f"blk.{l}.ffn_down_shexp.weight")]
                              + [moe.expert_weights(l, e)["down"] for e in range(4)], axis=1)
        want_gate = dense.load(f"blk.{l}.ffn_gate.weight")
        order = [int(np.flatnonzero((want_gate == row).all(1))[0]) for row in gate]
        assert sorted(order) == list(range(96))
        np.testing.assert_array_equal(down, dense.load(f"blk.{l}.ffn_down.weight")[:, order])
    ids = np.random.default_rng(3).integers(0, 128, 10)
    a, b = _logits(dense.path, ids), _logits(moe.path, ids)
    assert np.abs(a - b).max() > 1e-4        # half the routed experts are skipped: not the dense model


def test_moefy_rejects_what_it_cannot_do(llama_gguf, tmp_path):
    with pytest.raises(ConfigError, match="top-k"):
        convert_gguf(llama_gguf, tmp_path / "o.ef", progress=False, moefy=(4, 5))
    with pytest.raises(ConfigError, match="not a multiple of 5"):
        convert_gguf(llama_gguf, tmp_path / "o.ef", progress=False, moefy=(5, 2), shared=0)
    import tiny_models
    mixtral = gguf_tiny.from_hf(tiny_models.build("mixtral", tmp_path / "hf"), tmp_path / "mx.gguf")
    with pytest.raises(ConfigError, match="dense Llama"):
        convert_gguf(mixtral, tmp_path / "o.ef", progress=False, moefy=(2, 1))
    assert not (tmp_path / "o.ef").exists()


def test_cli_gguf_and_moefy(llama_gguf, tmp_path, capsys):
    from efconvert.cli import main
    assert main([str(llama_gguf), str(tmp_path / "d.ef"), "--no-progress"]) == 0
    assert EfFile(tmp_path / "d.ef").tensors["blk.0.attn_q.weight"].type == "f32"    # native F32
    assert main([str(llama_gguf), str(tmp_path / "m.ef"), "--moefy", "4", "--top-k", "2", "--experts", "q8",
                 "--no-progress"]) == 0
    ef = EfFile(tmp_path / "m.ef")
    assert (ef.config.n_experts, ef.config.top_k, ef.expert_layout["gate"].type) == (4, 2, "q8")
    with pytest.raises(SystemExit):
        main([str(llama_gguf), str(tmp_path / "x.ef"), "--moefy", "4"])          # --top-k missing
    assert "go together" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "x.ef")]) == 1
    assert "no such file" in capsys.readouterr().err
