"""Tokenizer: text <-> token ids from the files a .ef embeds, as Hugging Face tokenizes.

Sources, in order of preference:
  tokenizer.json     Hugging Face `tokenizers` (BPE/byte-level/Unigram/WordPiece; what HF uses)
  tokenizer.model    SentencePiece, used when no tokenizer.json exists
Settings come from tokenizer_config.json (bos/eos tokens, add_bos_token, add_eos_token, chat
template), special_tokens_map.json, generation_config.json (eos_token_id, possibly a list), a
separate chat_template.jinja, and the .ef's meta["tokenizer"] (bos / eos / chat_template), which
wins over the files.

Special tokens: `encode(text, add_special=True)` adds BOS/EOS as the model's tokenizer does.
With tokenizer.json its post-processor decides (as transformers 5 does: tokenizer_config's
add_bos_token / add_eos_token do not override it). With tokenizer.model the config's
add_bos_token / add_eos_token decide, defaulting to BOS on and EOS off (Llama's and llama.cpp's
rule for SentencePiece vocabularies; transformers 5 defaults BOS off there).
Special-token text inside `text` ("<s>", "<|im_end|>") becomes the special id, as in HF.
Stop ids: every EOS id plus the end-of-turn tokens of chat formats present in the vocabulary.

Streaming: `StreamDecoder` turns ids into text pieces that are always whole characters.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import EfError, FormatError

# End-of-turn tokens of common chat formats; any that exists in a vocabulary stops generation.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
               "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|END_OF_TURN_TOKEN|>")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


def _token_text(v) -> str | None:
    """A special token as tokenizer_config writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) and v else None


def _json(files: dict, name: str, where: str) -> dict:
    raw = files.get(name)
    if not raw:
        return {}
    try:
        d = json.loads(raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{where}: embedded {name} is not valid JSON ({e})") from None
    return d if isinstance(d, dict) else {}


# ---- backends: the same five methods over two libraries --------------------------------------

class _HFBackend:
    kind = "tokenizers"

    def __init__(self, raw: bytes, where: str):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:   # the library raises its own untyped errors
            raise FormatError(f"{where}: embedded tokenizer.json cannot be loaded ({e})") from None
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, post_process: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=post_process).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class _SPBackend:
    """SentencePiece with HF's handling of special-token text (split on it, then encode each
    piece; every piece gets SentencePiece's dummy prefix, as HF's legacy Llama tokenizer does)."""
    kind = "sentencepiece"

    def __init__(self, raw: bytes, where: str, added: dict[int, str]):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(bytes(raw))
        except Exception as e:
            raise FormatError(f"{where}: embedded tokenizer.model is not a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        self.special_ids = {i for i in range(n) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_ids |= {i for i in added if 0 <= i < n}
        self.specials = {self.sp.id_to_piece(i): i for i in self.special_ids}
        self.specials.update({t: i for i, t in added.items() if 0 <= i < n})
        names = sorted(self.specials, key=len, reverse=True)        # longest match first
        self.split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, post_process: bool) -> list[int]:
        parts = self.split_re.split(text) if self.split_re else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:                       # odd parts are the special tokens the regex caught
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if post_process and self.sp.bos_id() >= 0:
            ids.insert(0, self.sp.bos_id())
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                if not skip_special:
                    out += [self.sp.decode(run), self.sp.id_to_piece(i)]
                    run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None


# ---- the tokenizer ---------------------------------------------------------------------------

class Tokenizer:
    """encode/decode plus the model's special tokens, stop ids and chat template."""

    def __init__(self, backend, *, bos_token: str | None, eos_token: str | None, add_bos: bool | None = None,
                 add_eos: bool | None = None, eos_ids=(), chat_template=None, where: str = "model"):
        """add_bos / add_eos: None lets the backend decide (tokenizer.json's post-processor)."""
        self.backend = backend
        self.where = where
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.explicit_special = add_bos is not None or add_eos is not None
        self.add_bos_flag, self.add_eos_flag = bool(add_bos), bool(add_eos)
        self.chat_template = chat_template        # str, {name: str} or None
        stops = {int(i) for i in eos_ids if 0 <= int(i) < backend.vocab_size}
        if self.eos_id is not None:
            stops.add(self.eos_id)
        for t in END_OF_TURN:
            i = backend.token_to_id(t)
            if i is not None and i in backend.special_ids:
                stops.add(i)
        self.stop_ids = frozenset(stops)
        if self.eos_token is None and self.stop_ids:
            self.eos_token = backend.id_to_token(min(self.stop_ids))

    # construction
    @classmethod
    def from_files(cls, files: dict, meta: dict | None = None, where: str = "model") -> "Tokenizer":
        """files: name -> bytes (or None) for the names in TOKENIZER_FILES; meta: .ef meta["tokenizer"]."""
        meta = meta or {}
        cfg = _json(files, "tokenizer_config.json", where)
        smap = _json(files, "special_tokens_map.json", where)
        gen = _json(files, "generation_config.json", where)
        added = {}
        for k, v in (cfg.get("added_tokens_decoder") or {}).items():
            if _token_text(v) and str(k).lstrip("-").isdigit() and (not isinstance(v, dict) or v.get("special", True)):
                added[int(k)] = _token_text(v)
        if files.get("tokenizer.json"):
            backend = _HFBackend(files["tokenizer.json"], where)
        elif files.get("tokenizer.model"):
            backend = _SPBackend(files["tokenizer.model"], where, added)
        else:
            raise FormatError(f"{where}: no tokenizer embedded (neither tokenizer.json nor tokenizer.model); "
                              "convert from a checkpoint folder that has one")

        def special(short: str) -> str | None:     # "bos": meta, then config files
            for v in (meta.get(short + "_token"), meta.get(short), cfg.get(short + "_token"),
                      smap.get(short + "_token")):
                if isinstance(v, int) and not isinstance(v, bool):
                    return backend.id_to_token(v)
                if _token_text(v):
                    return _token_text(v)
            return None

        bos, eos = special("bos"), special("eos")
        if bos is None and backend.kind == "sentencepiece" and backend.sp.bos_id() >= 0:
            bos = backend.sp.id_to_piece(backend.sp.bos_id())
        if eos is None and backend.kind == "sentencepiece" and backend.sp.eos_id() >= 0:
            eos = backend.sp.id_to_piece(backend.sp.eos_id())
        eos_ids = []
        for v in (gen.get("eos_token_id"), meta.get("eos_token_id")):
            eos_ids += v if isinstance(v, list) else [v]
        add_bos = add_eos = None
        if backend.kind == "sentencepiece":
            flag = lambda k, d: next((v for v in (cfg.get(k), meta.get(k)) if isinstance(v, bool)), d)  # noqa: E731
            add_bos, add_eos = flag("add_bos_token", True), flag("add_eos_token", False)
        return cls(backend, bos_token=bos, eos_token=eos, add_bos=add_bos, add_eos=add_eos,
                   eos_ids=[i for i in eos_ids if isinstance(i, int)],
                   chat_template=_find_template(files, cfg, meta, where), where=where)

    @classmethod
    def from_ef(cls, ef) -> "Tokenizer":
        files = {n: ef.file(n) for n in TOKENIZER_FILES}
        meta = ef.meta.get("tokenizer") if isinstance(ef.meta.get("tokenizer"), dict) else {}
        return cls.from_files(files, meta, where=str(getattr(ef, "path", "model")))

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        """From a Hugging Face checkpoint folder (tests, tools)."""
        folder = Path(folder)
        files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
        return cls.from_files(files, where=str(folder))

    # use
    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def special_ids(self) -> set:
        return self.backend.special_ids

    @property
    def add_bos(self) -> bool:
        """Whether encode(..., add_special=True) starts with BOS."""
        if self.explicit_special:
            return self.add_bos_flag and self.bos_id is not None
        ids = self.backend.encode("a", True)
        return self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise EfError(f"tokenize expects text (str), got {type(text).__name__}")
        if not self.explicit_special:
            return list(self.backend.encode(text, add_special))
        ids = list(self.backend.encode(text, False))
        if add_special and self.add_bos_flag and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special and self.add_eos_flag and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise EfError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self.backend.decode(ids, skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def stream(self, skip_special: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)


def _find_template(files: dict, cfg: dict, meta: dict, where: str):
    """The chat template: meta, then chat_template.jinja / .json, then tokenizer_config."""
    if meta.get("chat_template"):
        return meta["chat_template"]
    if files.get("chat_template.jinja"):
        return files["chat_template.jinja"].decode("utf-8")
    t = _json(files, "chat_template.json", where).get("chat_template") or cfg.get("chat_template")
    if isinstance(t, list):      # named templates: [{"name": "default", "template": "..."}, ...]
        t = {d["name"]: d["template"] for d in t if isinstance(d, dict) and "name" in d and "template" in d}
    return t or None


class StreamDecoder:
    """Incremental detokenization: push ids one by one, get text pieces that are whole characters.

    Decoding a growing window and emitting only what it added keeps spaces right (SentencePiece
    and metaspace decoders strip the first token's leading space; both texts compared start at
    the same token, so they are stripped alike) and holds back a piece while its text ends with
    U+FFFD (a character whose bytes are split across tokens). The pieces concatenate to
    tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self.tok, self.skip = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = 0        # window start: the text of ids[prefix:read] was already emitted
        self.read = 0

    def _text(self, a: int, b: int | None = None) -> str:
        return self.tok.decode(self.ids[a:b], self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._text(self.prefix, self.read)
        now = self._text(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end, minus a trailing incomplete character."""
        before = self._text(self.prefix, self.read)
        rest = self._text(self.prefix)[len(before):].rstrip("\ufffd")
        self.prefix = self.read = len(self.ids)
        return rest
