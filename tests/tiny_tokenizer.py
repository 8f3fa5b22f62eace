"""A tiny byte-level BPE tokenizer (<= 128 ids) for the tiny test models, written at test time.

Tiny random checkpoints have no tokenizer; `write_tiny_tokenizer(folder)` adds tokenizer.json,
tokenizer_config.json (with a chat template) and special_tokens_map.json to a checkpoint folder
so the converter embeds them. Ids 0..4 are <unk> <s> </s> <|im_start|> <|im_end|>: the
transformers configs' default bos/eos ids 1/2 then land on special tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "A tiny model says hello to the world, then it stops.",
    "Café, naïve, 日本語 and 😀 are written with several bytes each.",
    "Numbers 0123456789 and symbols: + - * / = ( ) [ ] { } < > ' \" # @ & % $ ^ _ ~ ` | \\ ; ,",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz\n\ttab and newline",
]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2 style: BOS inside the template, strict alternation enforced with raise_exception
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
          "{% set messages = messages[1:] %}{% else %}{% set system = false %}{% endif %}"
          "{% for message in messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}"
          "{% if loop.index0 == 0 and system %}"
          "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
          "{% endfor %}")


def tiny_tokenizer_json(vocab_size: int = 128) -> str:
    """tokenizer.json text of a byte-level BPE trained on CORPUS with exactly vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise AssertionError(f"tiny tokenizer has {tok.get_vocab_size()} ids, more than {vocab_size}")
    return tok.to_str()


def tokenizer_config(template: str = "chatml") -> dict:
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, s in enumerate(SPECIALS)}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
            "eos_token": "<|im_end|>" if template == "chatml" else "</s>", "unk_token": "<unk>",
            "add_bos_token": template != "chatml", "add_eos_token": False, "added_tokens_decoder": added,
            "chat_template": {"chatml": CHATML, "llama2": LLAMA2}[template]}


def write_tiny_tokenizer(folder, vocab_size: int = 128, template: str = "chatml") -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tokenizer_config(template)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(vocab_size), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(smap, indent=2), encoding="utf-8")
    return folder
