"""The forward pass against transformers on tiny random checkpoints of every family.

Error measure: max |ours - transformers| / max |transformers| over all logits compared.
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tiny_models  # noqa: E402
from hf_source import HFSource  # noqa: E402

from efengine.errors import EfError  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.rope import Rope, softmax_scale  # noqa: E402

FAMILIES = list(tiny_models.configs())
TOL = 1e-4
GEN = 20


def rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(b).max())


def prompt(n: int, seed: int = 0, vocab: int = 128) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def save_hf(folder, cfg_cls: str, model_cls: str, kw: dict, seed: int = 0):
    """Like tiny_models.build, for variants (rope scaling, tied embeddings, dense Llama)."""
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "gate" in name and p.shape[0] <= 16:
                p.mul_(8.0)
    model.save_pretrained(folder)
    return folder


class Pair:
    """A tiny checkpoint: our model over its safetensors and a fresh transformers reference."""

    def __init__(self, folder, source=None):
        self.folder = folder
        self.model = Model(source if source is not None else HFSource(folder))
        self._ref = None

    def ref(self):
        # loaded once: with default rope a transformers model keeps no state between calls
        if self._ref is None:
            self._ref = tiny_models.load_reference(self.folder)
        return self._ref


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {n: Pair(tiny_models.build(n, root / n)) for n in FAMILIES}


def hf_logits(ref, ids, cache=None):
    # transformers 5 renamed past_key_values to cache
    key = "cache" if "cache" in inspect.signature(ref.forward).parameters else "past_key_values"
    kw = {} if cache is None else {key: cache}
    with torch.no_grad():
        out = ref(torch.as_tensor(np.asarray(ids))[None], use_cache=True, **kw)
    c = out.get("cache", None) or out.get("past_key_values", None)
    return out.logits[0].float().numpy(), c


def check_prefill_and_decode(pair: Pair, n_prompt: int, n_decode: int, seed: int = 0) -> tuple[float, float]:
    """Prefill errors and step-by-step decode errors (against transformers' own cached decode)."""
    ref, m = pair.ref(), pair.model
    toks = prompt(n_prompt + n_decode, seed, m.cfg.vocab_size)
    cache = m.new_cache(64)
    ours = m.forward(toks[:n_prompt], cache)
    theirs, hcache = hf_logits(ref, toks[:n_prompt])
    e_prefill = rel_err(ours, theirs)
    e_decode = 0.0
    for t in toks[n_prompt:]:
        ours = m.forward([t], cache)
        theirs, hcache = hf_logits(ref, [t], hcache)
        assert ours.shape == (1, m.cfg.vocab_size) and ours.dtype == np.float32
        e_decode = max(e_decode, rel_err(ours, theirs))
    assert cache.pos == n_prompt + n_decode
    return e_prefill, e_decode


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_decode_match_transformers(pairs, name):
    e_prefill, e_decode = check_prefill_and_decode(pairs[name], 12, 8)
    print(f"{name}: prefill rel err {e_prefill:.2e}, decode rel err {e_decode:.2e}")
    assert e_prefill < TOL and e_decode < TOL


def greedy(m: Model, toks, n: int) -> list[int]:
    cache = m.new_cache(len(toks) + n)
    logits = m.forward(toks, cache, last_only=True)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = m.forward([out[-1]], cache)
    return out


def hf_greedy(ref, toks, n: int) -> list[int]:
    with torch.no_grad():
        g = ref.generate(torch.as_tensor(toks)[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)
    return g[0, len(toks):].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_identical(pairs, name):
    toks = prompt(7, seed=3)
    assert greedy(pairs[name].model, toks, GEN) == hf_greedy(pairs[name].ref(), toks, GEN)


def test_chunked_prefill_equals_whole(pairs):
    m = pairs["qwen3_moe"].model
    toks = prompt(15, seed=5)
    whole = m.forward(toks, m.new_cache(16))
    cache = m.new_cache(16)
    parts = np.concatenate([m.forward(toks[:6], cache), m.forward(toks[6:11], cache), m.forward(toks[11:], cache)])
    assert rel_err(parts, whole) < 1e-5


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2"])
def test_on_layer_sees_transformers_hidden_states(pairs, name):
    m, ref = pairs[name].model, pairs[name].ref()
    toks = prompt(9, seed=2)
    seen = {}
    m.forward(toks, m.new_cache(16), on_layer=lambda l, h: seen.__setitem__(l, np.array(h)))
    with torch.no_grad():
        hs = ref(torch.as_tensor(toks)[None], output_hidden_states=True).hidden_states
    assert sorted(seen) == list(range(m.cfg.n_layers))
    for l in range(m.cfg.n_layers - 1):      # transformers' last entry is after the final norm
        assert rel_err(seen[l], hs[l + 1][0].numpy()) < TOL


def test_router_logits_is_the_layers_router(pairs):
    m, ref = pairs["qwen2_moe"].model, pairs["qwen2_moe"].ref()
    h = np.random.default_rng(0).standard_normal((5, m.cfg.hidden_size)).astype(np.float32)
    for l in m.cfg.moe_layers:
        layer = ref.model.layers[l]
        with torch.no_grad():
            theirs = layer.mlp.gate(layer.post_attention_layernorm(torch.as_tensor(h)))[0].numpy()
        assert rel_err(m.router_logits(l, h), theirs) < TOL
    with pytest.raises(EfError, match="not an MoE layer"):
        m.router_logits(1, h)        # qwen2_moe tiny: layer 1 is dense (mlp_only_layers)


def test_cache_and_token_errors(pairs):
    m = pairs["mixtral"].model
    cache = m.new_cache(4)
    with pytest.raises(EfError, match="KV cache full"):
        m.forward(prompt(5), cache)
    with pytest.raises(EfError, match="outside the vocabulary"):
        m.forward([m.cfg.vocab_size], cache)
    assert cache.pos == 0
    m.forward(prompt(3), cache)
    cache.truncate(1)
    assert cache.pos == 1
    with pytest.raises(EfError):
        cache.truncate(2)


# ---- variants: rope scaling, tied embeddings, dense Llama -------------------------------------

LLAMA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("rope", list(ROPES))
def test_llama_rope_scaling_and_tied_embeddings(tmp_path, rope):
    # dynamic only acts past max_position_embeddings: make that shorter than the prompt
    kw = dict(LLAMA, tie_word_embeddings=True, max_position_embeddings=16 if rope == "dynamic" else 256,
              rope_parameters={"rope_theta": 10000.0, **ROPES[rope]})
    pair = Pair(save_hf(tmp_path / rope, "LlamaConfig", "LlamaForCausalLM", kw))
    assert not pair.model.source.has("output.weight")          # tied: the head is the embedding
    assert pair.model.rope.kind == rope
    e_prefill, e_decode = check_prefill_and_decode(pair, 20, 6)
    assert e_prefill < TOL and e_decode < TOL


@pytest.mark.parametrize("mscale", [(0.707, 0.707), (1.0, 0.8)])
def test_deepseek_yarn_mscale(tmp_path, mscale):
    _, _, kw = tiny_models.configs()["deepseek_v2_grouped"]
    kw = dict(kw, rope_parameters={"rope_theta": 10000.0, "rope_type": "yarn", "factor": 8.0,
                                   "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                                   "mscale": mscale[0], "mscale_all_dim": mscale[1]})
    pair = Pair(save_hf(tmp_path / "ds", "DeepseekV2Config", "DeepseekV2ForCausalLM", kw))
    m = pair.model
    assert softmax_scale(m.cfg) != m.cfg.q_head_dim ** -0.5
    assert (m.rope.attention_factor != 1.0) == (mscale[0] != mscale[1])
    e_prefill, e_decode = check_prefill_and_decode(pair, 40, 4)
    assert e_prefill < TOL and e_decode < TOL


def test_rope_tables_match_transformers_init_functions():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from efengine.config import ModelConfig
    import efmodels

    for rope, params in ROPES.items():
        hf_cfg = transformers.LlamaConfig(**dict(LLAMA, rope_parameters={"rope_theta": 500000.0, **params}))
        fam = efmodels.by_name("llama")
        cfg = ModelConfig(**fam.hf_config(json.loads(hf_cfg.to_json_string())))
        ours = Rope(cfg)
        seq = 300 if rope == "dynamic" else None
        inv, att = ROPE_INIT_FUNCTIONS[rope](hf_cfg, None, seq_len=seq) if seq else ROPE_INIT_FUNCTIONS[rope](hf_cfg)
        mine = ours._dynamic(seq) if seq else ours.inv_freq
        np.testing.assert_allclose(mine, inv.numpy(), rtol=2e-6, err_msg=rope)
        assert ours.attention_factor == pytest.approx(att, rel=1e-12), rope


# ---- through a real .ef file ------------------------------------------------------------------

def convert(pair: Pair, out, experts: str):
    conv = pytest.importorskip("efconvert.convert")
    from efengine.format import EfFile
    return EfFile(conv.convert_hf(pair.folder, out, experts=experts, dense="f32", progress=False))


@pytest.mark.parametrize("name", FAMILIES)
def test_ef_f32_matches_transformers(pairs, tmp_path, name):
    pair = pairs[name]
    ef_pair = Pair(pair.folder, convert(pair, tmp_path / "m.ef", "f32"))
    ef_pair._ref = pair.ref()
    e_prefill, e_decode = check_prefill_and_decode(ef_pair, 12, 6)
    assert e_prefill < TOL and e_decode < TOL
    # same float32 weights through another source: the same bits
    toks = prompt(10, seed=4)
    np.testing.assert_array_equal(ef_pair.model.forward(toks, ef_pair.model.new_cache(10)),
                                  pair.model.forward(toks, pair.model.new_cache(10)))


def agreement(ref: Model, m: Model, prompts: int = 4, n: int = GEN) -> float:
    """Teacher-forced greedy agreement: on the reference's greedy continuations, the fraction of
    positions where `m` picks the same next token."""
    same = total = 0
    for s in range(prompts):
        p = prompt(8, seed=100 + s)
        g = greedy(ref, p, n)
        seq = np.concatenate([p, g])
        picks = m.forward(seq[:-1], m.new_cache(len(seq)))[len(p) - 1:].argmax(-1)
        same += int((picks == np.array(g)).sum())
        total += n
    return same / total


def test_quantized_experts_greedy_agreement(pairs, tmp_path):
    rows = []
    for name in FAMILIES:
        ref = pairs[name].model
        a8 = agreement(ref, Model(convert(pairs[name], tmp_path / f"{name}_q8.ef", "q8")))
        a4 = agreement(ref, Model(convert(pairs[name], tmp_path / f"{name}_q4.ef", "q4")))
        rows.append((name, a8, a4))
        print(f"{name}: greedy agreement with f32, q8 experts {a8:.3f}, q4 experts {a4:.3f}")
    assert all(a8 >= 0.8 for _, a8, _ in rows), rows


class Reconfigured:
    """An .ef file whose config was changed after conversion: shapes no longer fit."""

    def __init__(self, ef, **changes):
        from dataclasses import replace
        self.ef, self.config = ef, replace(ef.config, **changes)

    def __getattr__(self, name):
        return getattr(self.ef, name)


@pytest.mark.parametrize("changes,what", [({"intermediate_size": 97}, "blk.1.ffn_gate.weight"),
                                          ({"moe_intermediate_size": 33}, "expert gate")])
def test_shape_mismatch_is_a_clear_error(pairs, tmp_path, changes, what):
    from efengine.errors import FormatError
    ef = convert(pairs["qwen2_moe"], tmp_path / "m.ef", "f32")
    with pytest.raises(FormatError, match=what):
        Model(Reconfigured(ef, **changes))
