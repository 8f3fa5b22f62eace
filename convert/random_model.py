"""`efconvert --random SHAPE`: a full-size .ef of a named shape with random weights, at disk speed.

Quantizing gigabytes of random floats would take minutes, so stored bytes are written directly:
a few pools of valid stored values (random 4-bit and 8-bit codes, fp16 scales whose dequantized
weights have std ~0.02, float weights, norms near 1) are generated once, and every tensor and
expert is filled with a slice of them starting at a random offset. Memory stays bounded by the
pools and one expert blob. A byte-level tokenizer with exactly the shape's vocab is embedded.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import efmodels
from efengine import __version__, quant
from efengine.errors import ConfigError
from efengine.format import Writer, crc32, expert_layout
from efmodels.base import EXPERTS, NORM

from .convert import check_output, precisions, progress_bar, write_guard
from .hf import tokenizer_meta
from .shapes import shape_config

POOL = 1 << 22           # values per pool: 4-16 MB each
STD = 0.02               # std of the dequantized weights
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---- tokenizer -----------------------------------------------------------------------------------

def byte_chars() -> list[str]:
    """The printable character that stands for each byte in byte-level BPE (index = byte value)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def byte_tokenizer_files(vocab_size: int, max_length: int = 4096) -> dict[str, bytes]:
    """tokenizer.json (byte-level, exactly vocab_size ids), tokenizer_config.json with a ChatML
    template, special_tokens_map.json and generation_config.json.

    Ids: bytes first, then <|endoftext|> <|im_start|> <|im_end|>, then reserved fillers up to the
    vocab size. A vocab too small for all 256 bytes keeps printable ASCII first and adds <unk>.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = byte_chars()
    full = vocab_size >= 256 + len(SPECIALS)
    n_bytes = 256 if full else vocab_size - len(SPECIALS) - 1
    if n_bytes < 64:
        raise ConfigError(f"vocab size {vocab_size} is too small for a byte-level tokenizer (needs >= 68)")
    order = sorted(range(256), key=lambda b: (not 32 <= b <= 126, b))[:n_bytes]
    vocab = {chars[b]: i for i, b in enumerate(sorted(order))}
    unk = None if full else "<unk>"
    for s in SPECIALS + ([unk] if unk else []):
        vocab[s] = len(vocab)
    for i in range(vocab_size - len(vocab)):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if tok.get_vocab_size() != vocab_size:
        raise AssertionError(f"byte tokenizer has {tok.get_vocab_size()} ids, wanted {vocab_size}")
    ids = {s: vocab[s] for s in SPECIALS}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
              "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": unk,
              "add_bos_token": False, "add_eos_token": False, "model_max_length": max_length,
              "added_tokens_decoder": {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False} for s, i in ids.items()}}
    smap = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]}
    dump = lambda d: json.dumps(d, indent=2, ensure_ascii=False).encode()  # noqa: E731
    return {"tokenizer.json": tok.to_str().encode(), "tokenizer_config.json": dump(config),
            "special_tokens_map.json": dump(smap), "generation_config.json": dump(gen)}


# ---- random stored values ------------------------------------------------------------------------

class Pools:
    """Pools of valid stored bytes, each a uint8 array; s and m pools of q4 are paired by index."""

    def __init__(self, seed: int):
        rng = self.rng = np.random.default_rng(seed)
        u = rng.uniform(0.5, 1.5, POOL).astype(np.float32)
        s4 = (STD / 4.61 * u).astype(np.float16)              # 4-bit codes 0..15 have std 4.61
        gauss = rng.standard_normal(POOL, dtype=np.float32) * STD
        self.pools = {
            "q4.q": rng.integers(0, 256, POOL, dtype=np.uint8),
            "q4.s": s4.view(np.uint8),
            "q4.m": (s4.astype(np.float32) * -7.5).astype(np.float16).view(np.uint8),
            "q8.q": rng.integers(-127, 128, POOL, dtype=np.int8).view(np.uint8),
            "q8.s": (STD / 73.3 * u).astype(np.float16).view(np.uint8),  # codes +-127 have std 73.3
            "f32.w": gauss.view(np.uint8),
            "f16.w": gauss.astype(np.float16).view(np.uint8),
            "bf16.w": quant.f32_to_bf16(gauss).view(np.uint8),
            "norm.w": (1.0 + gauss).view(np.uint8),
        }

    def fill(self, dst: np.ndarray, qtype: str, shape, group: int, norm: bool = False,
             start: int | None = None) -> None:
        """Fill one stored tensor region (uint8) with pool slices from one random start."""
        start = int(self.rng.integers(0, POOL)) if start is None else start
        for part, v in quant.views(dst, qtype, shape, group).items():
            pool = self.pools["norm.w" if norm else f"{qtype}.{part}"]
            item = v.itemsize
            _cyclic(v.reshape(-1).view(np.uint8), pool, start * item % pool.nbytes)


def _cyclic(dst: np.ndarray, pool: np.ndarray, pos: int) -> None:
    i, n = 0, dst.nbytes
    while i < n:
        k = min(n - i, pool.nbytes - pos)
        dst[i:i + k] = pool[pos:pos + k]
        i, pos = i + k, 0


# ---- the writer ----------------------------------------------------------------------------------

def write_random(shape: str, out, experts: str = "q4", dense: str = "q8", embed: str | None = None,
                 group: int = 64, layers: int | None = None, seed: int = 0, progress: bool | None = None) -> Path:
    """Write a .ef of the named shape (shapes.SHAPES) with random weights; return its path."""
    out = Path(out)
    prec = precisions(experts, dense, embed, group)
    check_output(out)
    family, cfg, hf = shape_config(shape, layers)
    files = byte_tokenizer_files(cfg.vocab_size, cfg.max_position)
    gen = json.loads(files["generation_config.json"])
    hf.update(gen)                       # the tokenizer's ids, not the real model's
    files["config.json"] = json.dumps(hf, indent=2).encode()
    meta = {"converter": f"efconvert {__version__}",
            "source": {"format": "random", "shape": shape, "seed": seed, "layers": cfg.n_layers},
            "quantization": {**prec, "group": group}, "tokenizer": tokenizer_meta(files, hf)}
    w = Writer(out, family.name, cfg.to_dict(), meta)
    groups = {}
    for name, shp, cls in efmodels.expected_tensors(cfg):
        groups[name] = (cls, group if prec[cls] in quant.QUANT_TYPES else quant.DEFAULT_GROUP, shp)
        w.plan_tensor(name, prec[cls], shp, groups[name][1])
    specs = {p: (prec[EXPERTS], s, group) for p, s in efmodels.expert_shapes(cfg).items()}
    if cfg.moe_layers:
        w.plan_experts(cfg.moe_layers, cfg.n_experts, specs)
    for n, data in files.items():
        w.plan_file(n, len(data))

    def run() -> Path:
        pools = Pools(seed)
        with w:
            w.begin()
            with progress_bar(w.total, progress, f"efconvert {out.name}") as bar:
                for name, (cls, g, shp) in groups.items():
                    buf = np.empty(w.tensors[name]["nbytes"], np.uint8)
                    pools.fill(buf, prec[cls], shp, g, norm=(cls == NORM and name.endswith("norm.weight")))
                    w.write_tensor(name, buf)
                    bar.update(buf.nbytes)
                _random_experts(w, pools, specs, bar)
                for n, data in files.items():
                    w.write_file(n, data)
        return w.path
    return write_guard(out, run, lambda: getattr(w, "total", 0))


def _random_experts(w: Writer, pools: Pools, specs: dict, bar) -> None:
    """Blobs are filled and checksummed on a helper thread while the previous one is written
    (numpy copies and zlib.crc32 release the GIL), so the disk stays busy."""
    if not w.experts:
        return
    lay, nbytes = expert_layout(specs)
    blobs = [np.zeros(nbytes, np.uint8) for _ in range(2)]
    n_blobs = len(w.experts["layers"]) * w.experts["count"]
    starts = [[int(pools.rng.integers(0, POOL)) for _ in lay] for _ in range(n_blobs)]

    def make(k: int) -> str:
        blob = blobs[k % 2]
        for (p, t), start in zip(lay.items(), starts[k]):
            pools.fill(blob[t.offset:t.offset + t.nbytes], t.type, t.shape, t.group, start=start)
        return crc32(blob)

    count = w.experts["count"]
    with ThreadPoolExecutor(1) as helper:
        nxt = helper.submit(make, 0)
        for k in range(len(starts)):
            crc = nxt.result()
            if k + 1 < len(starts):
                nxt = helper.submit(make, k + 1)      # fills the other blob while this one is written
            w.write_expert(k // count, k % count, blobs[k % 2], crc=crc)
            bar.update(nbytes)
