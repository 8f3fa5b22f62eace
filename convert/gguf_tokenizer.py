"""GGUF tokenizer metadata (tokenizer.ggml.*) -> Hugging Face tokenizer files.

Output: {"tokenizer.json": bytes, "tokenizer_config.json": bytes, "generation_config.json": bytes},
the same files a Hugging Face checkpoint carries, so the engine reads one kind of tokenizer.

  gpt2   byte-level BPE: vocab and merges as stored; text is first split by the pre-tokenizer
         regexes llama.cpp uses for tokenizer.ggml.pre (each regex splits the pieces of the
         previous one, as llama.cpp applies them), then mapped to byte-level symbols.
  llama  SentencePiece BPE with byte fallback: merges are rebuilt from the pieces' scores (a pair
         merges when its concatenation is a piece; higher score merges first), spaces become
         U+2581 and, when add_space_prefix is set, one is prepended.
"""
from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from efengine.errors import CheckpointError

from .gguf_reader import GgufFile

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order
PRE_SPLITS = {
    "default": [_GPT2], "gpt2": [_GPT2], "gpt-2": [_GPT2], "olmo": [_GPT2], "mpt": [_GPT2], "jais": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "command-r": [r"\p{N}", _GPT2], "codeshell": [r"\p{N}", _GPT2], "exaone": [r"\p{N}", _GPT2],
    "minerva-7b": [r"\p{N}", _GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "dbrx": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "stablelm2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
}
# texts llama.cpp also treats as end of generation when the vocabulary has them
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
               "<｜end▁of▁sentence｜>", "</s>")


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    out = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (CONTROL, USER_DEFINED):
            out.append((i, AddedToken(t, special=ty == CONTROL, normalized=False)))
    return out


def _byte_level(g: GgufFile, tokens: list[str]) -> Tokenizer:
    merges = g.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(f"{g.path}: gpt2 tokenizer without tokenizer.ggml.merges")
    pre = g.get("tokenizer.ggml.pre", "default")
    splits = PRE_SPLITS.get(pre)
    if splits is None:
        raise CheckpointError(f"{g.path}: pre-tokenizer {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(PRE_SPLITS))}")
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every (a, b) whose concatenation is a normal piece, best-scored merged piece first."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    found = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                found.append((-scores[pid], vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def _sentencepiece(g: GgufFile, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = g.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{g.path}: llama (SentencePiece) tokenizer without tokenizer.ggml.scores")
    unk = g.get("tokenizer.ggml.unknown_token_id", 0)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types),
                               unk_token=tokens[int(unk)], fuse_unk=True, byte_fallback=True))
    prefix = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    norms = ([normalizers.Prepend("\u2581")] if prefix else []) + [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(norms)
    decs = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(decs + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _token(tokens: list[str], key: str, g: GgufFile) -> str | None:
    i = g.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def _end_tokens(g: GgufFile, tokens: list[str], template: str | None) -> list[str]:
    """eos plus the end-of-turn tokens the chat template uses (llama.cpp stops on those too)."""
    out = [t for t in [_token(tokens, "tokenizer.ggml.eos_token_id", g),
                       _token(tokens, "tokenizer.ggml.eot_token_id", g)] if t]
    for t in END_OF_TURN:
        if template and t in template and t in tokens and t not in out:
            out.append(t)
    return out


def tokenizer_files(g: GgufFile) -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json and generation_config.json for a GGUF file ({} when
    the file has no tokenizer)."""
    tokens = g.get("tokenizer.ggml.tokens")
    bad = sorted(k for k in g.undecodable if k.startswith("tokenizer."))
    if bad:
        raise CheckpointError(f"{g.path}: tokenizer metadata {', '.join(bad)} cannot be decoded (not UTF-8?)")
    if not tokens:
        return {}      # weights only: the .ef runs on token ids (the engine says so if asked for text)
    types = list(g.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    kind = g.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level(g, tokens)
    elif kind == "llama":
        tok = _sentencepiece(g, tokens, types)
    else:
        raise CheckpointError(f"{g.path}: tokenizer model {kind!r} is not supported (gpt2, llama are)")
    added_decoder = {}
    for i, added in _added_tokens(tokens, types):
        added_decoder[str(i)] = {"content": added.content, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": added.special}
        tok.add_special_tokens([added]) if added.special else tok.add_tokens([added])
        if tok.token_to_id(added.content) != i:
            raise CheckpointError(f"{g.path}: special token {added.content!r} does not map back to id {i}")

    template = g.get("tokenizer.chat_template")
    bos = _token(tokens, "tokenizer.ggml.bos_token_id", g)
    ends = _end_tokens(g, tokens, template)
    eos = ends[0] if ends else None
    if eos is not None and eos == bos and len(ends) > 1:
        eos = ends[1]     # metadata that names the same token for both: the template's end wins
    # A template that writes the bos token itself would get it twice if encoding added it too.
    add_bos = bool(g.get("tokenizer.ggml.add_bos_token", kind == "llama")) and bos is not None
    if add_bos and template and bos in template:
        add_bos = False
    if add_bos:
        bos_id = int(g.get("tokenizer.ggml.bos_token_id"))
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "unk_token": _token(tokens, "tokenizer.ggml.unknown_token_id", g),
           "pad_token": _token(tokens, "tokenizer.ggml.padding_token_id", g),
           "add_bos_token": add_bos, "add_eos_token": False, "chat_template": template,
           "added_tokens_decoder": added_decoder,
           "model_max_length": int(g.get(".context_length", 4096))}
    gen = {"bos_token_id": g.get("tokenizer.ggml.bos_token_id"), "eos_token_id": [tok.token_to_id(t) for t in ends]}
    return {"tokenizer.json": tok.to_str().encode(),
            "tokenizer_config.json": json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=1).encode(),
            "generation_config.json": json.dumps(gen, indent=1).encode()}
