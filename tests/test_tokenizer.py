"""Tokenizer against real tokenizers, streaming detokenization, chat templates against transformers.

The real tokenizer is Mistral-7B v0.1's SentencePiece model shipped inside mistral-common. Our
SentencePiece path is compared with sentencepiece itself and with a `tokenizers` BPE built by
transformers' converter from the same file (merges ranked by the SentencePiece piece scores,
SentencePiece's dummy-prefix normalizer: the pipeline that reproduces SentencePiece exactly).
"""
from __future__ import annotations

import importlib.resources
import json
from datetime import datetime

import pytest

from efengine.chat import FALLBACK_TEMPLATE, ChatTemplate
from efengine.errors import EfError, FormatError
from efengine.tokenizer import Tokenizer
from tiny_tokenizer import LLAMA2, tiny_tokenizer_json, tokenizer_config, write_tiny_tokenizer

TEXTS = ["Hello world", " Hello", "  two  spaces  ", "trailing ", "   ", "a   b    c     d", "\n\nx",
         "a\nb\tc", "tab\t\tend\n", "\t \t  \n  \n", "héllo 😀 日本語", "🦙🦙 emoji\u200d zwj 👩‍💻",
         "中文，标点！", "Ünïcödé façade naïve", "مرحبا بالعالم", "x = f(y) + 1; // code", ""]
SPECIAL_TEXTS = ["<s>[INST] hi [/INST]", "x</s> y", "a<unk>b", "</s></s>", "<s> spaced </s>"]
MISTRAL_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                  "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True}


def _mistral_model() -> bytes:
    pytest.importorskip("mistral_common", reason="mistral-common (dev extra) ships the real SentencePiece model")
    path = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    if not path.is_file():
        pytest.skip("mistral_common/data/tokenizer.model.v1 is missing from this mistral-common version")
    return path.read_bytes()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(our SentencePiece tokenizer, raw sentencepiece, reference tokenizers.Tokenizer, tokenizer.json bytes)."""
    spm = pytest.importorskip("sentencepiece")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers' SentencePiece converter needs protobuf")
    raw = _mistral_model()
    folder = tmp_path_factory.mktemp("mistral")
    (folder / "tokenizer.model").write_bytes(raw)
    (folder / "tokenizer_config.json").write_text(json.dumps(MISTRAL_CONFIG))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    d = json.loads(transformers.AutoTokenizer.from_pretrained(folder).backend_tokenizer.to_str())
    vocab = d["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in d["model"]["merges"]]
    merges.sort(key=lambda ab: (-sp.get_score(vocab[ab[0] + ab[1]]), vocab[ab[0] + ab[1]]))
    d["model"]["merges"] = [list(m) for m in merges]
    d["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    d["pre_tokenizer"] = None
    tj = json.dumps(d).encode()
    from tokenizers import Tokenizer as HFTokenizer
    cfg = json.dumps(MISTRAL_CONFIG).encode()
    ours = Tokenizer.from_files({"tokenizer.model": raw, "tokenizer_config.json": cfg})
    return ours, sp, HFTokenizer.from_str(tj.decode()), tj


# ---- ids against real tokenizers --------------------------------------------------------------

def test_sentencepiece_path_equals_sentencepiece(mistral):
    ours, sp, _, _ = mistral
    assert ours.kind == "sentencepiece" and ours.vocab_size == 32000
    for t in TEXTS:
        assert ours.encode(t, add_special=False) == sp.encode(t), repr(t)
        assert ours.encode(t) == [1] + sp.encode(t), repr(t)          # add_bos_token: BOS first


def test_sentencepiece_path_equals_tokenizers(mistral):
    ours, _, ref, _ = mistral
    for t in TEXTS + SPECIAL_TEXTS:                   # special-token text becomes the special id
        assert ours.encode(t, add_special=False) == ref.encode(t, add_special_tokens=False).ids, repr(t)
    assert ours.encode("x</s> y", add_special=False)[1] == 2


def test_tokenizer_json_path_equals_sentencepiece_path(mistral):
    ours, _, _, tj = mistral
    hf = Tokenizer.from_files({"tokenizer.json": tj, "tokenizer_config.json": json.dumps(MISTRAL_CONFIG).encode()})
    assert hf.kind == "tokenizers"
    for t in TEXTS + SPECIAL_TEXTS:
        ids = ours.encode(t)
        assert hf.encode(t) == ids, repr(t)
        assert hf.decode(ids) == ours.decode(ids), repr(t)


def test_decode_round_trips(mistral):
    ours, sp, _, _ = mistral
    for t in TEXTS:
        ids = ours.encode(t)
        assert ours.decode(ids) == t == sp.decode(ids[1:]), repr(t)
    assert ours.decode([1, 22557, 2], skip_special=False) == "<s>Hello</s>"


@pytest.mark.parametrize("cfg_change", [{}, {"add_bos_token": False}, {"add_eos_token": True},
                                        {"add_bos_token": None, "add_eos_token": None}])
def test_special_tokens_like_transformers(mistral, tmp_path, cfg_change):
    """tokenizer.json: its post-processor adds BOS, whatever tokenizer_config says (transformers 5)."""
    transformers = pytest.importorskip("transformers")
    _, _, _, tj = mistral
    cfg = {k: v for k, v in dict(MISTRAL_CONFIG, **cfg_change).items() if v is not None}
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (tmp_path / "tokenizer.json").write_bytes(tj)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    assert ours.add_bos
    for t in ["Hello world", " x", "<s>[INST] hi [/INST]"]:
        assert ours.encode(t) == ref.encode(t), (cfg_change, t)
        assert ours.encode(t, add_special=False) == ref.encode(t, add_special_tokens=False), (cfg_change, t)


@pytest.mark.parametrize("flags", [{"add_bos_token": True}, {"add_bos_token": False},
                                   {"add_bos_token": False, "add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_sentencepiece_flags_like_transformers(mistral, tmp_path, flags):
    """tokenizer.model: explicit add_bos_token / add_eos_token decide, as in transformers."""
    transformers = pytest.importorskip("transformers")
    cfg = {**MISTRAL_CONFIG, "add_eos_token": False, **flags}
    (tmp_path / "tokenizer.model").write_bytes(_mistral_model())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(tmp_path)
    for t in ["Hello world", "a\nb"]:     # (transformers' own conversion differs on leading spaces)
        assert ours.encode(t) == ref.encode(t), (flags, t)
    assert ours.add_bos == cfg["add_bos_token"]


def test_sentencepiece_defaults_to_bos():
    ours = Tokenizer.from_files({"tokenizer.model": _mistral_model()})
    assert ours.add_bos and ours.encode("Hello") == [1, 22557] and ours.stop_ids == {2}


# ---- streaming detokenization -----------------------------------------------------------------

def _stream(tok, ids) -> list[str]:
    dec = tok.stream()
    return [dec.push(i) for i in ids] + [dec.flush()]


def test_streaming_never_splits_characters(mistral):
    ours, _, _, tj = mistral
    hf = Tokenizer.from_files({"tokenizer.json": tj})
    for tok in (ours, hf):
        for t in TEXTS + ["".join(TEXTS)]:
            ids = tok.encode(t, add_special=False)
            pieces = _stream(tok, ids)
            assert all("\ufffd" not in p for p in pieces), (tok.kind, t, pieces)
            assert "".join(pieces) == tok.decode(ids) == t, (tok.kind, t)


def test_streaming_holds_byte_fallback_tokens(mistral):
    ours, sp, _, _ = mistral
    ids = sp.encode("a🦙")                                  # ▁a then four <0x..> byte tokens
    assert [sp.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert _stream(ours, ids) == ["a", "", "", "", "🦙", ""]


def test_streaming_byte_level_bpe():
    tok = Tokenizer.from_files({"tokenizer.json": tiny_tokenizer_json().encode()})
    for t in ["Café 日本語 😀", "naïve\n\ttab", "Hello world!"]:
        ids = tok.encode(t)
        pieces = _stream(tok, ids)
        assert "".join(pieces) == t and all("\ufffd" not in p for p in pieces)
    ids = tok.encode("日")                                   # three bytes, not merged in the tiny vocab
    if len(ids) > 1:
        assert _stream(tok, ids)[:len(ids) - 1] == [""] * (len(ids) - 1)


def test_flush_drops_an_unfinished_character(mistral):
    ours, sp, _, _ = mistral
    ids = sp.encode("ok🦙")[:-1]                             # the emoji's last byte never came
    assert "".join(_stream(ours, ids)) == "ok"


# ---- special tokens, stop ids, missing files ----------------------------------------------------

def test_stop_ids_from_generation_config_and_end_of_turn(tmp_path):
    write_tiny_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4, 999]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.stop_ids == {2, 4}                            # 999 is outside the vocabulary
    assert tok.bos_id == 1 and tok.eos_id == 4 and not tok.add_bos
    cfg = tokenizer_config()
    cfg["eos_token"] = "</s>"
    files = {"tokenizer.json": tiny_tokenizer_json().encode(), "tokenizer_config.json": json.dumps(cfg).encode()}
    assert Tokenizer.from_files(files).stop_ids == {2, 4}    # </s> as eos, <|im_end|> as end of turn


def test_meta_overrides_files():
    files = {"tokenizer.json": tiny_tokenizer_json().encode(),
             "tokenizer_config.json": json.dumps(tokenizer_config("llama2")).encode()}
    tok = Tokenizer.from_files(files, {"eos_token": "<|im_end|>", "chat_template": "X", "eos_token_id": [2]})
    assert tok.eos_token == "<|im_end|>" and tok.chat_template == "X" and 2 in tok.stop_ids
    assert not tok.add_bos and tok.encode("Hello")[0] != 1   # no post-processor: config's add_bos_token is moot


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(FormatError, match="no tokenizer"):
        Tokenizer.from_files({}, where="m.ef")
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_files({"tokenizer.json": b"{not json"})
    with pytest.raises(EfError, match="outside the vocabulary"):
        Tokenizer.from_files({"tokenizer.json": tiny_tokenizer_json().encode()}).decode([5, 999])


# ---- chat templates ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Tell me   more \n"}],
    [{"role": "user", "content": "日本語 😀"}, {"role": "assistant", "content": "ok"}],
]


def _hf_tokenizer(template: str):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer
    cfg = tokenizer_config(template)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tiny_tokenizer_json()), bos_token=cfg["bos_token"],
        eos_token=cfg["eos_token"], unk_token="<unk>", chat_template=cfg["chat_template"])


@pytest.mark.parametrize("template", ["chatml", "llama2"])
def test_templates_render_like_transformers(template):
    ref = _hf_tokenizer(template)
    cfg = tokenizer_config(template)
    ours = ChatTemplate(cfg["chat_template"], bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
    tok = Tokenizer.from_files({"tokenizer.json": tiny_tokenizer_json().encode(),
                                "tokenizer_config.json": json.dumps(cfg).encode()})
    for conv in CONVERSATIONS:
        for gen in (True, False):
            text = ours.render(conv, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen, return_dict=False)
            assert tok.encode(text, add_special=False) == list(ids)


def test_raise_exception_becomes_a_clear_error():
    jinja2 = pytest.importorskip("jinja2")
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="alternate"):
        _hf_tokenizer("llama2").apply_chat_template(bad, tokenize=False)
    with pytest.raises(EfError, match="roles must alternate"):
        ChatTemplate(LLAMA2, bos_token="<s>", eos_token="</s>").render(bad)


def test_template_helpers_like_transformers():
    src = ("{{ messages[0]['content'] | tojson }}|{{ {'b': '<&>', 'a': 'é'} | tojson(indent=1) }}|"
           "{% generation %}{{ bos_token }}{% endgeneration %}|{{ strftime_now('%Y') }}"
           "{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{{ m.role }}{% endfor %}")
    ref = _hf_tokenizer("chatml")
    msgs = [{"role": "user", "content": 'say "<hi>" ✓'}, {"role": "assistant", "content": "x"}]
    ours = ChatTemplate(src, bos_token="<s>", eos_token="</s>").render(msgs)
    assert ours == ref.apply_chat_template(msgs, chat_template=src, tokenize=False)
    assert str(datetime.now().year) in ours and '"say \\"<hi>\\" ✓"' in ours


def test_trim_and_lstrip_blocks():
    src = "A\n  {% if true %}\n  B\n  {% endif %}\nC"
    assert ChatTemplate(src).render([{"role": "user", "content": ""}]) == "A\n  B\nC"


def test_fallback_named_and_broken_templates():
    fb = ChatTemplate(None)
    assert fb.is_fallback and fb.source == FALLBACK_TEMPLATE and fb.stop_strings == ("<|im_end|>",)
    assert fb.render([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    named = ChatTemplate({"default": "D{{ messages|length }}", "tool_use": "T{{ tools|length }}"})
    assert named.render(CONVERSATIONS[0]) == "D1" and named.render(CONVERSATIONS[0], tools=[{}, {}]) == "T2"
    with pytest.raises(FormatError, match="does not compile"):
        ChatTemplate("{% for %}", where="m.ef")
    with pytest.raises(EfError, match="list"):
        fb.render({"role": "user", "content": "x"})
    with pytest.raises(EfError, match="empty"):
        fb.render([])
    with pytest.raises(EfError, match="role"):
        fb.render([{"content": "x"}])


def test_template_extra_variables():
    t = ChatTemplate("{% if enable_thinking is defined and not enable_thinking %}no-think{% endif %}")
    assert t.render([{"role": "user", "content": ""}], enable_thinking=False) == "no-think"
