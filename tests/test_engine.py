"""Engine end to end on tiny random .ef models: mechanics, cache reuse, stats and errors.

Random weights make the text meaningless, so the checks are: greedy tokens equal the argmax of
a full recompute (cache reuse and chunked prefill change nothing), lengths, stop strings, stop
tokens, seeds, stats, reset, logits, and clear errors.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine_models import build_tiny_ef  # noqa: E402

from efengine.engine import Engine, parse_size, sampling_defaults  # noqa: E402
from efengine.errors import ConfigError, EfError, FormatError  # noqa: E402
from efengine.ops import cupy_available  # noqa: E402

USER = [{"role": "user", "content": "Hello world!"}]


@pytest.fixture(scope="module")
def tiny(tiny_ef):
    """qwen2_moe from conftest's shared fixture (its checkpoint carries tests/tiny_tokenizer.py's files)."""
    return tiny_ef("qwen2_moe")


@pytest.fixture
def eng(tiny):
    with Engine(tiny, device="cpu") as e:
        yield e


def full_greedy(eng: Engine, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens by recomputing every position from scratch each step (no cache reuse)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(np.argmax(eng.logits(ids)[-1])))
    return ids[len(prompt_ids):]


def test_greedy_equals_full_recompute(tiny):
    with Engine(tiny, device="cpu", prefill_chunk=3) as eng:      # chunked prefill on purpose
        text = eng.generate("The quick brown fox", max_tokens=12, temperature=0, ignore_eos=True)
        got = list(eng.last_tokens)
        assert got == full_greedy(eng, eng.tokenize("The quick brown fox"), 12)
        assert text == eng.detokenize(got)
        assert eng.stats.generated_tokens == 12 and eng.stats.stop_reason == "length"


def test_stream_pieces_make_the_text(eng):
    pieces = list(eng.stream("Hello", max_tokens=20, temperature=0, ignore_eos=True))
    assert "".join(pieces) == eng.generate("Hello", max_tokens=20, temperature=0, ignore_eos=True)
    assert all(p for p in pieces)


def test_a_new_call_ends_an_unfinished_stream(eng):
    kw = dict(max_tokens=10, temperature=0, ignore_eos=True)
    want = eng.generate("Hello", **kw)
    first = eng.stream("Hello", **kw)
    next(first)
    assert eng.generate("Hello", **kw) == want             # the cache was not corrupted by `first`
    assert list(first) == []                                 # `first` was ended
    half = eng.stream("Hello", **kw)
    next(half)
    eng.reset()
    assert eng.stats.prompt_tokens == 0 and list(half) == []


def test_stats(eng):
    eng.reset()
    eng.generate("Hello world", max_tokens=7, temperature=0, ignore_eos=True)
    s = eng.stats
    assert s.prompt_tokens == len(eng.tokenize("Hello world")) and s.cached_tokens == 0
    assert s.generated_tokens == 7 and s.decode_steps == 6 and s.stop_reason == "length"
    assert s.prefill_s > 0 and s.decode_s > 0 and s.prefill_tps > 0 and s.decode_tps > 0
    d = s.to_dict()
    assert {"prompt_tokens", "generated_tokens", "prefill_tps", "decode_tps", "stop_reason"} <= set(d)
    json.dumps(d)


def test_prefix_reuse_changes_nothing(tiny):
    with Engine(tiny, device="cpu") as eng:
        first = eng.chat(USER, max_tokens=6, temperature=0, ignore_eos=True)
        conv = USER + [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
        second = eng.chat(conv, max_tokens=6, temperature=0, ignore_eos=True)
        assert eng.stats.cached_tokens > len(eng.tokenize(eng.render_chat(USER), add_special=False)) // 2
        eng.reset()
        assert eng.chat(conv, max_tokens=6, temperature=0, ignore_eos=True) == second
        assert eng.stats.cached_tokens == 0


def test_same_prompt_twice_reuses_all_but_one(eng):
    eng.generate("Hello world", max_tokens=2, temperature=0)
    n = eng.stats.prompt_tokens
    eng.generate("Hello world", max_tokens=2, temperature=0)
    assert eng.stats.cached_tokens == n - 1


def test_stop_string_trims_output(eng):
    full = eng.generate("Hello", max_tokens=40, temperature=0, ignore_eos=True)
    clean = [i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 2]]
    assert clean, f"no usable stop string in {full!r}"
    stop = full[clean[0]:clean[0] + 2]
    out = eng.generate("Hello", max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert out == full[:full.index(stop)] and stop not in out
    assert eng.stats.stop_reason == "stop"


def test_stop_token_ends_generation(eng):
    eng.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)
    first = eng.last_tokens[0]
    tok = eng.tokenizer
    saved = tok.stop_ids
    try:
        tok.stop_ids = frozenset({first})
        assert eng.generate("Hello", max_tokens=3, temperature=0) == ""
        assert eng.stats.stop_reason == "eos" and eng.stats.generated_tokens == 0
        eng.generate("Hello", max_tokens=3, temperature=0, ignore_eos=True)
        assert eng.stats.generated_tokens == 3
    finally:
        tok.stop_ids = saved


def test_seeds(eng):
    kw = dict(max_tokens=15, temperature=1.5, ignore_eos=True)
    a = eng.generate("Hi", seed=3, **kw)
    assert eng.generate("Hi", seed=3, **kw) == a
    assert any(eng.generate("Hi", seed=s, **kw) != a for s in (4, 5, 6))


def test_context_limit(tiny):
    with Engine(tiny, device="cpu", n_ctx=12) as eng:
        ids = eng.tokenize("Hello")
        eng.generate("Hello", max_tokens=100, temperature=0, ignore_eos=True)
        assert eng.stats.stop_reason == "context"
        assert eng.stats.generated_tokens == 12 - len(ids) + 1     # the last token needs no slot
        with pytest.raises(EfError, match=r"has \d+ tokens but the context holds 12"):
            eng.generate("The quick brown fox jumps over the lazy dog", max_tokens=1)
        with pytest.raises(EfError, match="context holds 12"):
            eng.logits(list(range(13)))


def test_logits(eng):
    ids = eng.tokenize("The quick brown fox jumps")
    out = eng.logits(ids)
    assert out.shape == (len(ids), eng.config.vocab_size) and out.dtype == np.float32
    np.testing.assert_allclose(eng.logits(ids[:3]), out[:3], rtol=1e-5, atol=1e-5)   # causal
    assert np.array_equal(eng.logits(np.asarray(ids)), out)
    # the cache now holds ids: generation reuses them and still matches a recompute
    eng.generate(ids, max_tokens=3, temperature=0, ignore_eos=True)
    assert eng.stats.cached_tokens == len(ids) - 1
    assert eng.last_tokens == full_greedy(eng, ids, 3)


def test_token_id_prompts_and_bad_ids(eng):
    assert isinstance(eng.generate([5, 6, 7], max_tokens=2, temperature=0), str)
    for bad in ([], [1, 500], [-1], [[1, 2]], ["a"], [1.5]):
        with pytest.raises(EfError):
            eng.logits(bad)
    with pytest.raises(EfError, match="empty"):
        eng.generate("")
    with pytest.raises(EfError, match="outside the vocabulary"):
        eng.generate([999])


def test_invalid_options(tiny, eng):
    with pytest.raises(ConfigError, match="top_p"):
        eng.generate("Hi", top_p=1.5)
    with pytest.raises(ConfigError, match="temperature"):
        eng.generate("Hi", temperature=-1)
    with pytest.raises(ConfigError, match="unknown sampling option"):
        eng.generate("Hi", temprature=0.5)
    with pytest.raises(ConfigError, match="device"):
        Engine(tiny, device="tpu")
    with pytest.raises(ConfigError, match="n_ctx"):
        Engine(tiny, device="cpu", n_ctx=10 ** 6)
    with pytest.raises(FormatError, match="cannot open"):
        Engine(tiny.parent / "missing.ef", device="cpu")


@pytest.mark.skipif(cupy_available(), reason="a GPU is visible here")
def test_cuda_without_gpu(tiny):
    with pytest.raises(EfError, match="no CUDA GPU"):
        Engine(tiny, device="cuda")


def test_chat_and_template(eng):
    text = eng.render_chat(USER)
    assert text == "<|im_start|>user\nHello world!<|im_end|>\n<|im_start|>assistant\n"
    eng.chat(USER, max_tokens=4, temperature=0, ignore_eos=True)
    assert eng.stats.prompt_tokens == len(eng.tokenize(text, add_special=False))
    with pytest.raises(EfError, match="messages"):
        eng.chat("hello")


def test_close_and_context_manager(tiny):
    eng = Engine(tiny, device="cpu")
    with eng:
        eng.generate("Hi", max_tokens=1)
    assert eng.closed
    with pytest.raises(EfError, match="closed"):
        eng.generate("Hi", max_tokens=1)
    eng.close()                                              # twice is fine


def test_model_without_tokenizer(tmp_path):
    path = build_tiny_ef(tmp_path, "olmoe", tokenizer=False)
    with Engine(path, device="cpu") as eng:
        assert eng.logits([1, 2, 3]).shape == (3, 128)
        with pytest.raises(FormatError, match="no tokenizer"):
            eng.generate("Hi")


def test_padded_vocabulary_and_broken_template(tmp_path):
    """A tokenizer smaller than the embedding: padded ids are never sampled. A template that does
    not compile fails chat calls only."""
    path = build_tiny_ef(tmp_path, "mixtral", tokenizer_vocab=120, template_text="{% for %}")
    with Engine(path, device="cpu") as eng:
        n = eng.tokenizer.vocab_size
        assert eng.config.vocab_size == 128 and n <= 120
        for seed in range(3):                 # temperature 50: nearly uniform, padded ids would show
            eng.generate("Hello", max_tokens=60, temperature=50.0, seed=seed, ignore_eos=True)
            assert len(eng.last_tokens) == 60 and max(eng.last_tokens) < n
        assert eng.logits([120, 127]).shape == (2, 128)      # scoring still sees every id
        with pytest.raises(FormatError, match="chat template does not compile"):
            eng.chat(USER)


def test_sampling_defaults_from_generation_config():
    assert sampling_defaults(None) == {}
    assert sampling_defaults(b'{"do_sample": false, "repetition_penalty": 1.1}') == \
        {"temperature": 0.0, "repetition_penalty": 1.1}
    assert sampling_defaults(b'{"do_sample": true, "temperature": 0.6, "top_p": 0.9, "top_k": 20}') == \
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    assert sampling_defaults(b'{"temperature": 0.6}') == {}
    assert sampling_defaults(b'{"do_sample": true, "top_p": 7}') == {}      # invalid: ignored
    assert sampling_defaults(b"not json") == {}


def test_parse_size():
    assert parse_size(None) is None and parse_size(1000) == 1000
    assert parse_size("8G") == 8 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1.5 GB") == 3 << 29
    for bad in ("lots", "-1G", "0", 0, True):
        with pytest.raises(ConfigError, match="memory size"):
            parse_size(bad)
