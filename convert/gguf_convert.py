"""GGUF file -> .ef: plan every tensor (fail before writing), then write them through the Writer.

Precision per tensor class (experts, dense, embed) is a stored type or "native", the default:
keep a tensor's own type where ours holds it exactly (Q4_0/Q4_1 -> q4/32, Q8_0 -> q8/32, F16, BF16,
F32), and otherwise the nearest type that loses nothing the source had not already lost
(K-quants and Q5 -> q4 or q8, group 32). Norms and routers are always f32.

With moefy=(E, K) a dense Llama is MoE-fied on the way (convert/moefy.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import efmodels
from efengine import __version__, quant
from efengine.config import ModelConfig
from efengine.errors import CheckpointError, ConfigError
from efengine.format import Writer, expert_layout
from efmodels.base import DENSE, EMBED, EXPERTS, NORM, ROUTER

from .convert import check_output, progress_bar, write_guard
from .gguf_config import ARCHES, gguf_config
from .gguf_reader import GGUF_GROUP, GgufFile, GgufTensor, unpermute_rows
from .gguf_tokenizer import tokenizer_files
from .hf import tokenizer_meta

NATIVE = "native"
CLASSES = (EXPERTS, DENSE, EMBED, NORM, ROUTER)
# llama.cpp permutes q and k rows of these GGUF architectures for its interleaved rotary
PERMUTED_QK = {"llama"}
EXPERT_GGUF = {"gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def gguf_precisions(experts: str = NATIVE, dense: str = NATIVE, embed: str | None = None,
                    group: int = GGUF_GROUP) -> dict:
    """Tensor class -> stored type or "native" (ConfigError naming the flag)."""
    chosen = {EXPERTS: experts, DENSE: dense, EMBED: embed or dense}
    for cls, qt in chosen.items():
        if qt != NATIVE and qt not in quant.TYPES:
            raise ConfigError(f"--{cls} {qt!r} is not a known type; choose native or one of {', '.join(quant.TYPES)}")
    if not isinstance(group, int) or group <= 0 or group % 2:
        raise ConfigError(f"--group must be a positive even number, got {group!r}")
    return {**chosen, NORM: "f32", ROUTER: "f32"}


def stored_type(t: GgufTensor, want: str, group: int) -> tuple[str, int]:
    """(type, group) a tensor is stored as, for a requested type or "native"."""
    if want == NATIVE:
        return t.nearest_type()
    return want, group if want in quant.QUANT_TYPES else quant.DEFAULT_GROUP


# ---- planning ------------------------------------------------------------------------------------

def _dense_tensor(g: GgufFile, cfg: ModelConfig, canon: str, shape: tuple) -> GgufTensor:
    t = g.tensor(canon)
    if t.shape != tuple(shape):
        if int(np.prod(t.shape)) == int(np.prod(shape)) and len(t.shape) < len(shape):
            t = t.reshaped(tuple(shape))       # e.g. qwen2moe's shared-expert gate is stored 1-D
        else:
            raise CheckpointError(f"{g.path}: tensor {canon} has shape {list(t.shape)}, expected {list(shape)} "
                                  f"from its metadata")
    if g.arch in PERMUTED_QK and canon.split(".")[-2] in ("attn_q", "attn_k"):
        heads = cfg.n_heads if ".attn_q." in canon else cfg.n_kv_heads
        t = GgufTensor(t.name, t.gtype, t.shape, t.data, unpermute_rows(t.shape[0], heads))
    return t


def _layer_experts(g: GgufFile, cfg: ModelConfig, l: int, used: set) -> list[dict]:
    """gate/up/down GgufTensors of every expert of layer l (stacked or one tensor per expert)."""
    shapes = efmodels.expert_shapes(cfg)
    E = cfg.n_experts
    out = [dict() for _ in range(E)]
    for part, stem in EXPERT_GGUF.items():
        stacked = f"blk.{l}.{stem}_exps.weight"
        if g.has(stacked):
            t = g.tensor(stacked)
            if t.shape != (E, *shapes[part]):
                raise CheckpointError(f"{g.path}: tensor {stacked} has shape {list(t.shape)}, expected "
                                      f"{[E, *shapes[part]]}")
            used.add(stacked)
            for e in range(E):
                out[e][part] = t.expert(e)
            continue
        for e in range(E):
            name = f"blk.{l}.{stem}.{e}.weight"
            t = g.tensor(name)    # CheckpointError names it when absent
            if t.shape != shapes[part]:
                raise CheckpointError(f"{g.path}: tensor {name} has shape {list(t.shape)}, "
                                      f"expected {list(shapes[part])}")
            used.add(name)
            out[e][part] = t
    return out


def plan_gguf(g: GgufFile, cfg: ModelConfig) -> tuple[list[tuple[str, str, GgufTensor]], list[list[dict]]]:
    """(canonical name, class, tensor) of every dense tensor, and per MoE layer each expert's parts.

    Missing, misshapen and leftover tensors are CheckpointErrors naming them."""
    dense, used, missing = [], set(), []
    for canon, shape, cls in efmodels.expected_tensors(cfg):
        if not g.has(canon):
            missing.append(canon)
            continue
        dense.append((canon, cls, _dense_tensor(g, cfg, canon, shape)))
        used.add(canon)
    if missing:
        raise CheckpointError(f"{g.path}: {len(missing)} tensors missing: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    experts = [_layer_experts(g, cfg, l, used) for l in cfg.moe_layers]
    left = sorted(set(g.names()) - used)
    if left:
        raise CheckpointError(f"{g.path}: {len(left)} tensors this {cfg.arch} model does not use: "
                              f"{', '.join(left[:8])}" + (" ..." if len(left) > 8 else ""))
    return dense, experts


# ---- writing -------------------------------------------------------------------------------------

@dataclass
class ErrorSums:
    """Relative RMS error per class over what was rounded, as convert.py reports it."""
    err: dict
    ref: dict

    @classmethod
    def new(cls) -> "ErrorSums":
        return cls({c: 0.0 for c in CLASSES}, {c: 0.0 for c in CLASSES})

    def add(self, cls: str, ref: np.ndarray, stored: np.ndarray, qtype: str, group: int) -> None:
        d = quant.dequantize(stored, qtype, ref.shape, group).reshape(-1) - ref.reshape(-1)
        self.err[cls] += float(np.dot(d, d))
        self.ref[cls] += float(np.dot(ref.reshape(-1), ref.reshape(-1)))

    def report(self) -> dict:
        return {c: (float(np.sqrt(self.err[c] / self.ref[c])) if self.ref[c] > 0 else 0.0) for c in CLASSES}


def encode(t: GgufTensor, qtype: str, group: int, cls: str, errs: ErrorSums) -> np.ndarray:
    """Stored bytes of t; the error of anything not copied exactly is added to errs."""
    nt = t.native_type()
    if nt is not None and nt[0] == qtype and (qtype in quant.FLOAT_TYPES or nt[1] == group):
        return t.native_bytes()
    w = t.float32()
    out = quant.quantize(w, qtype, group)
    errs.add(cls, w, out, qtype, group)
    return out


@dataclass
class Planned:
    """One dense tensor to write: its stored form and how to produce its bytes."""
    name: str
    qtype: str
    group: int
    shape: tuple
    produce: Callable[[], np.ndarray]
    source_bytes: int = 0          # for the progress bar


@dataclass
class PlannedExperts:
    """Every routed expert: blob layout and produce(i, e) -> {gate, up, down: stored bytes}
    for the i-th MoE layer (called layer by layer, experts in order)."""
    layers: tuple
    count: int
    specs: dict                    # part -> (qtype, shape, group)
    produce: Callable[[int, int], dict]
    source_bytes: int = 0


def write_planned(out: Path, family: str, cfg: ModelConfig, meta: dict, dense: list[Planned],
                  experts: PlannedExperts | None, files: dict[str, bytes], progress: bool | None,
                  late_meta: Callable[[], dict] = dict) -> Path:
    """Write a planned model to `out` (atomically); late_meta() is merged into meta at the end."""
    w = Writer(out, family, cfg.to_dict(), meta)
    for p in dense:
        w.plan_tensor(p.name, p.qtype, p.shape, p.group)
    if experts is not None:
        w.plan_experts(experts.layers, experts.count, experts.specs)
    for n, data in files.items():
        w.plan_file(n, len(data))
    total = sum(p.source_bytes for p in dense) + (experts.source_bytes if experts else 0)

    def run() -> Path:
        with w, progress_bar(total, progress, f"efconvert {Path(out).name}") as bar:
            w.begin()
            for p in dense:
                w.write_tensor(p.name, p.produce())
                bar.update(p.source_bytes)
            if experts is not None:
                _write_blobs(w, experts, bar)
            for n, data in files.items():
                w.write_file(n, data)
            w.meta.update(late_meta())
        return w.path
    return write_guard(Path(out), run, lambda: getattr(w, "total", 0))


def _write_blobs(w: Writer, experts: PlannedExperts, bar) -> None:
    lay, nbytes = expert_layout(experts.specs)
    blob = np.zeros(nbytes, np.uint8)   # reused: the parts always cover the same bytes
    per = experts.source_bytes / max(1, len(experts.layers) * experts.count)
    for i in range(len(experts.layers)):
        for e in range(experts.count):
            parts = experts.produce(i, e)
            for p, info in lay.items():
                blob[info.offset:info.offset + info.nbytes] = parts[p]
            w.write_expert(i, e, blob)
            bar.update(per)


# ---- the GGUF pipeline ---------------------------------------------------------------------------

def _meta(g: GgufFile, prec: dict, group: int, files: dict[str, bytes]) -> dict:
    types = sorted({g.tensor(n).type_name for n in g.names()})
    return {"converter": f"efconvert {__version__}",
            "source": {"format": "gguf", "path": str(g.path.resolve()), "architecture": g.arch,
                       "name": g.get("general.name"), "license": g.get("general.license"), "types": types},
            "quantization": {**prec, "group": group},
            "tokenizer": tokenizer_meta(files, {})}


def plan_dense(dense_plan: list, prec: dict, group: int, errs: ErrorSums) -> list[Planned]:
    out = []
    for canon, cls, t in dense_plan:
        qtype, grp = stored_type(t, prec[cls], group)
        out.append(Planned(canon, qtype, grp, t.shape,
                           (lambda t=t, q=qtype, gr=grp, c=cls: encode(t, q, gr, c, errs)),
                           int(t.data.nbytes)))
    return out


# precision order for choosing one blob layout over layers whose GGUF types differ
_WIDTH = {"q4": 0, "q8": 1, "bf16": 2, "f16": 3, "f32": 4}


def expert_specs(expert_plan: list, want: str, group: int) -> dict:
    """part -> (type, shape, group) of every expert blob. Every blob has one layout, so with
    "native" a part takes the widest type any layer needs (mixes like Q4_K_M give some layers'
    ffn_down more bits: those stay exact and the others are stored wider, never narrower)."""
    specs = {}
    for p, t0 in expert_plan[0][0].items():
        qtype, grp = max({stored_type(layer[0][p], want, group) for layer in expert_plan},
                         key=lambda tg: _WIDTH[tg[0]])
        specs[p] = (qtype, t0.shape, grp)
    return specs


def plan_experts(cfg: ModelConfig, expert_plan: list, want: str, group: int,
                 errs: ErrorSums) -> PlannedExperts | None:
    if not expert_plan:
        return None
    specs = expert_specs(expert_plan, want, group)

    def produce(i: int, e: int) -> dict:
        return {p: encode(t, specs[p][0], specs[p][2], EXPERTS, errs) for p, t in expert_plan[i][e].items()}
    src = sum(int(t.data.nbytes) for layer in expert_plan for ex in layer for t in ex.values())
    return PlannedExperts(tuple(cfg.moe_layers), cfg.n_experts, specs, produce, src)


def convert_gguf(src, out, experts: str = NATIVE, dense: str = NATIVE, embed: str | None = None,
                 group: int = GGUF_GROUP, progress: bool | None = None, moefy: tuple[int, int] | None = None,
                 shared: int | None = None, generation: dict | None = None) -> Path:
    """Convert the GGUF file `src` into the .ef file `out` and return its path.

    moefy=(E, K): split every dense FFN into E experts, K active, plus `shared` always-on neurons
    (default: convert/moefy.py's SHARED_FRACTION of the width); see convert/moefy.py.
    generation: sampling defaults merged into the embedded generation_config.json (HF keys).
    """
    out = Path(out)
    prec = gguf_precisions(experts, dense, embed, group)
    check_output(out)
    g = GgufFile(src)
    cfg = gguf_config(g)
    family = ARCHES[g.arch][0] if cfg.arch != "mixtral" else "mixtral"
    dense_plan, expert_plan = plan_gguf(g, cfg)
    files = tokenizer_files(g)
    if generation and files:
        gen = json.loads(files["generation_config.json"])
        files["generation_config.json"] = json.dumps({**gen, **generation}, indent=1).encode()
    meta = _meta(g, prec, group, files)
    errs = ErrorSums.new()
    if moefy is not None:
        from .moefy import moefy_plan
        cfg, planned, planned_experts, extra = moefy_plan(cfg, dense_plan, prec, group, errs, *moefy, shared=shared,
                                                          files=files, progress=progress)
        meta["moefy"] = extra
    else:
        planned = plan_dense(dense_plan, prec, group, errs)
        planned_experts = plan_experts(cfg, expert_plan, prec[EXPERTS], group, errs)
    return write_planned(out, family, cfg, meta, planned, planned_experts, files, progress,
                         lambda: {"quant_error": errs.report()})
