"""HF folder -> .ef: plan every tensor first (so bad input fails before anything is written),
then stream them through the quantizers into the Writer, a few rows at a time.

Precision is chosen per tensor class (models/base.py): experts, dense, embed (follows dense unless
given), norm and router (always f32: they are tiny and routing is sensitive to them).
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import efmodels
from efengine import __version__, quant
from efengine.errors import ConfigError, CheckpointError, EfError
from efengine.format import Writer, expert_layout
from efmodels.base import DENSE, EMBED, EXPERTS, NORM, ROUTER

from .hf import DTYPES, Checkpoint, to_f32, tokenizer_meta

CLASSES = (EXPERTS, DENSE, EMBED, NORM, ROUTER)
READ_ELEMS = 1 << 18          # elements per step: 0.5 MB of bf16, its float32 copies stay in cache
_EXACT = {("F32", "f32"), ("F16", "f16"), ("BF16", "bf16")}
# Tensors some checkpoints carry that the model recomputes or duplicates.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class OutputError(EfError):
    """The output file cannot be written (permissions, disk full)."""


@dataclass(frozen=True)
class Source:
    """Rows row0.. of an HF tensor seen as 2-D [rows, last dim] that make one stored matrix."""
    name: str
    row0: int
    shape: tuple       # the stored tensor's shape (1-D for norms and biases)

    @property
    def rows_cols(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[1]) if len(self.shape) == 2 else (1, self.shape[0])


def precisions(experts: str = "q4", dense: str = "q8", embed: str | None = None, group: int = 64) -> dict:
    """Tensor class -> stored type, validated (ConfigError naming the flag)."""
    chosen = {EXPERTS: experts, DENSE: dense, EMBED: embed or dense}
    for cls, qt in chosen.items():
        if qt not in quant.TYPES:
            raise ConfigError(f"--{cls} {qt!r} is not a known type; choose one of {', '.join(quant.TYPES)}")
    if not isinstance(group, int) or group <= 0 or group % 2:
        raise ConfigError(f"--group must be a positive even number, got {group!r}")
    return {**chosen, NORM: "f32", ROUTER: "f32"}


# ---- planning ------------------------------------------------------------------------------------

def _aliases(name: str) -> list[str]:
    """Spellings an HF tensor has had: transformers 5 renames Mixtral's block_sparse_moe to mlp."""
    alt = name.replace(".block_sparse_moe.", ".mlp.")
    return [name] if alt == name else [name, alt]


def _find(ckpt: Checkpoint, name: str) -> str | None:
    return next((n for n in _aliases(name) if ckpt.has(n)), None)


def _expert_sources(ckpt: Checkpoint, family, cfg, layer: int, used: set, missing: list) -> list[dict] | None:
    """gate/up/down Sources of every expert of one layer: per-expert tensors or the fused form
    of transformers 5 (experts.gate_up_proj [E, 2I, D] with gate rows first, experts.down_proj [E, D, I])."""
    E, I, D = cfg.n_experts, cfg.moe_intermediate_size, cfg.hidden_size
    shapes = efmodels.expert_shapes(cfg)
    prefix = family.hf_expert_names["gate"].split(".{e}.")[0].format(l=layer)
    gu, dn = _find(ckpt, prefix + ".gate_up_proj"), _find(ckpt, prefix + ".down_proj")
    if gu and dn:
        _check_shape(ckpt, gu, (E, 2 * I, D))
        _check_shape(ckpt, dn, (E, D, I))
        used.update((gu, dn))
        return [{"gate": Source(gu, e * 2 * I, (I, D)), "up": Source(gu, e * 2 * I + I, (I, D)),
                 "down": Source(dn, e * D, (D, I))} for e in range(E)]
    out = []
    for e in range(E):
        parts = {}
        for p, tmpl in family.hf_expert_names.items():
            hf = tmpl.format(l=layer, e=e)
            n = _find(ckpt, hf)
            if n is None:
                missing.append(hf)
                continue
            _check_shape(ckpt, n, shapes[p])
            used.add(n)
            parts[p] = Source(n, 0, shapes[p])
        out.append(parts)
    return out


def _check_shape(ckpt: Checkpoint, name: str, want: tuple) -> None:
    got = tuple(ckpt.shape(name))
    if got != tuple(want):
        raise CheckpointError(f"{ckpt.folder}: tensor {name} has shape {list(got)}, expected {list(want)} "
                              f"from config.json")
    if ckpt.dtype(name) not in DTYPES:
        raise CheckpointError(f"{ckpt.folder}: tensor {name} is {ckpt.dtype(name)}; weights must be F32, F16 or BF16")


def plan(ckpt: Checkpoint) -> tuple[list[tuple[str, str, Source]], list[list[dict]]]:
    """(canonical name, class, Source) of every dense tensor and, per MoE layer, the Sources of
    each expert. Raises CheckpointError naming missing, misshapen or leftover tensors."""
    family, cfg = ckpt.family, ckpt.config
    used, missing, dense = set(), [], []
    for canon, shape, cls in efmodels.expected_tensors(cfg):
        hf = efmodels.hf_name(family, canon)
        n = _find(ckpt, hf)
        if n is None:
            missing.append(hf)
            continue
        _check_shape(ckpt, n, shape)
        used.add(n)
        dense.append((canon, cls, Source(n, 0, tuple(shape))))
    experts = [_expert_sources(ckpt, family, cfg, l, used, missing) for l in cfg.moe_layers]
    if missing:
        raise CheckpointError(f"{ckpt.folder}: {len(missing)} tensors missing: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    left = [n for n in ckpt.names if n not in used and not n.endswith(_IGNORED_SUFFIXES)
            and not (cfg.tie_embeddings and n == "lm_head.weight")]
    if left:
        raise CheckpointError(f"{ckpt.folder}: {len(left)} unexpected tensors this {family.name} config does "
                              f"not use: {', '.join(sorted(left)[:8])}" + (" ..." if len(left) > 8 else ""))
    return dense, experts


# ---- encoding ------------------------------------------------------------------------------------

class Encoder:
    """Stores Sources as given types, row chunk by row chunk, on a pool of threads.

    numpy releases the GIL inside its loops, so chunks quantize in parallel. A job (one tensor or
    one expert) is submitted while the previous one is still being written out; at most two jobs
    are in flight, which bounds memory. Results are collected in submission order, so the bytes and
    the error sums do not depend on thread timing.
    """

    def __init__(self, ckpt: Checkpoint, group: int, threads: int | None = None):
        self.ckpt, self.group = ckpt, group
        self.pool = ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1), thread_name_prefix="efconvert")
        self.pending: deque = deque()
        self.err = {c: 0.0 for c in CLASSES}
        self.ref = {c: 0.0 for c in CLASSES}

    def submit(self, pieces: list[tuple[Source, str, str, np.ndarray]], done: Callable[[], None]) -> None:
        """Encode every (source, type, class, destination bytes); call done() once all are stored."""
        futures = []
        for src, qtype, cls, dst in pieces:
            rows, cols = src.rows_cols
            group = self.group if qtype in quant.QUANT_TYPES else quant.DEFAULT_GROUP
            views = quant.views(dst, qtype, (rows, cols), group)
            self.ckpt.advise(src.name, src.row0, src.row0 + rows)   # read ahead while the last job runs
            step = max(1, READ_ELEMS // cols)
            for r0 in range(0, rows, step):
                f = self.pool.submit(self._chunk, src, qtype, group, views, r0, min(rows, r0 + step))
                futures.append((cls, f))
        self.pending.append((futures, done))
        while len(self.pending) > 1:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        futures, done = self.pending.popleft()
        for cls, f in futures:
            e, r = f.result()
            self.err[cls] += e
            self.ref[cls] += r
        done()

    def flush(self) -> None:
        while self.pending:
            self._finish_oldest()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _chunk(self, src: Source, qtype: str, group: int, views: dict, r0: int, r1: int) -> tuple[float, float]:
        """Store rows r0..r1; returns (squared error, squared reference) for the error report."""
        dtype = self.ckpt.dtype(src.name)
        raw = self.ckpt.read_rows(src.name, src.row0 + r0, src.row0 + r1)
        if (dtype, qtype) in _EXACT:
            views["w"][r0:r1] = raw
            return 0.0, 0.0
        w = to_f32(raw, dtype)
        if qtype == "f32":
            views["w"][r0:r1] = w
            return 0.0, 0.0
        err = [0.0]
        buf = quant.quantize(w, qtype, group, err=err if qtype in quant.QUANT_TYPES else None)
        for p, v in quant.views(buf, qtype, w.shape, group).items():
            views[p][r0:r1] = v
        if qtype not in quant.QUANT_TYPES:      # f16 / bf16 rounding: measure it directly
            d = quant.dequantize(buf, qtype, w.shape, group).reshape(-1) - w.reshape(-1)
            err[0] = float(np.dot(d, d))
        return err[0], float(np.dot(w.reshape(-1), w.reshape(-1)))

    def report(self) -> dict[str, float]:
        """Relative RMS error per class over the tensors that were rounded (0.0: all exact)."""
        return {c: (float(np.sqrt(self.err[c] / self.ref[c])) if self.ref[c] > 0 else 0.0) for c in CLASSES}


# ---- the pipeline --------------------------------------------------------------------------------

def check_output(out: Path) -> None:
    """Fail before reading gigabytes when the output cannot be written."""
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; give the output .ef file's path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot create it inside {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot write to {parent} (permission denied)")


def progress_bar(total: int, enabled: bool | None, desc: str):
    """tqdm over bytes on a terminal; a no-op elsewhere."""
    from tqdm import tqdm
    if enabled is None:
        enabled = sys.stderr.isatty()
    # a pty that reports a 0x0 size (e.g. under `script`) makes tqdm hide the bar: use a fallback size
    size = shutil.get_terminal_size((100, 20))
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled,
                file=sys.stderr, ncols=size.columns, nrows=size.lines)


def write_guard(out: Path, run: Callable[[], Path], need: Callable[[], int]) -> Path:
    """Run a writing step, turning OS errors about the output into OutputError."""
    try:
        return run()
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OutputError(f"{out}: no space left on device (the model needs {need() / 2**30:.2f} GiB); "
                              f"nothing was written") from None
        raise OutputError(f"{out}: cannot write ({e.strerror or e})") from None


def convert_hf(src, out, experts: str = "q4", dense: str = "q8", embed: str | None = None,
               group: int = 64, progress: bool | None = None, threads: int | None = None) -> Path:
    """Convert the HF model folder `src` into the .ef file `out` and return its path.

    threads: quantizer threads (default: one per CPU); the bytes written do not depend on it.
    Quantization error per class lands in meta["quant_error"]; tokenizer files are embedded.
    """
    out = Path(out)
    prec = precisions(experts, dense, embed, group)
    check_output(out)
    ckpt = Checkpoint(src)
    try:
        dense_plan, expert_plan = plan(ckpt)
        return _write(ckpt, out, prec, group, dense_plan, expert_plan, progress, threads)
    finally:
        ckpt.close()


def _specs(cfg, prec: dict, group: int) -> dict:
    return {p: (prec[EXPERTS], s, group) for p, s in efmodels.expert_shapes(cfg).items()}


def _meta(ckpt: Checkpoint, prec: dict, group: int, files: dict[str, bytes]) -> dict:
    dtypes = sorted({ckpt.dtype(n) for n in ckpt.names})
    return {"converter": f"efconvert {__version__}",
            "source": {"format": "hf", "path": str(ckpt.folder.resolve()),
                       "architecture": ckpt.hf_config["architectures"][0], "dtypes": dtypes},
            "quantization": {**prec, "group": group},
            "tokenizer": tokenizer_meta(files, ckpt.hf_config)}


def _write(ckpt: Checkpoint, out: Path, prec: dict, group: int, dense_plan, expert_plan, progress,
           threads: int | None) -> Path:
    cfg = ckpt.config
    files = {n: p.read_bytes() for n, p in ckpt.aux_files().items()}
    w = Writer(out, ckpt.family.name, cfg.to_dict(), _meta(ckpt, prec, group, files))
    for canon, cls, s in dense_plan:
        w.plan_tensor(canon, prec[cls], s.shape, group if prec[cls] in quant.QUANT_TYPES else quant.DEFAULT_GROUP)
    if expert_plan:
        w.plan_experts(cfg.moe_layers, cfg.n_experts, _specs(cfg, prec, group))
    for n, data in files.items():
        w.plan_file(n, len(data))
    total_in = sum(_in_bytes(ckpt, s) for _, _, s in dense_plan)
    total_in += sum(_in_bytes(ckpt, s) for layer in expert_plan for parts in layer for s in parts.values())

    def run() -> Path:
        enc = Encoder(ckpt, group, threads)
        try:
            with w, progress_bar(total_in, progress, f"efconvert {out.name}") as bar:
                w.begin()
                for canon, cls, s in dense_plan:
                    buf = np.empty(w.tensors[canon]["nbytes"], np.uint8)
                    enc.submit([(s, prec[cls], cls, buf)], _then(w.write_tensor, (canon, buf), bar, _in_bytes(ckpt, s)))
                _write_experts(w, enc, expert_plan, prec[EXPERTS], bar)
                enc.flush()
                for n, data in files.items():
                    w.write_file(n, data)
                w.meta["quant_error"] = enc.report()
        finally:
            enc.close()
        return w.path
    return write_guard(out, run, lambda: getattr(w, "total", 0))


def _in_bytes(ckpt: Checkpoint, s: Source) -> int:
    return int(np.prod(s.shape)) * np.dtype(DTYPES[ckpt.dtype(s.name)]).itemsize


def _then(write: Callable, args: tuple, bar, nbytes: int) -> Callable[[], None]:
    """The callback that writes a finished job (binds its arguments now, not at call time)."""
    def done() -> None:
        write(*args)
        bar.update(nbytes)
    return done


def _write_experts(w: Writer, enc: Encoder, expert_plan, qtype: str, bar) -> None:
    if not expert_plan:
        return
    lay, nbytes = expert_layout({p: (t["type"], tuple(t["shape"]), t["group"])
                                 for p, t in w.experts["layout"].items()})
    # Two blobs, alternating: at most two experts are in flight (Encoder.submit). Parts always
    # cover the same bytes, so the padding between them stays zero.
    blobs = [np.zeros(nbytes, np.uint8) for _ in range(2)]
    k = 0
    for i, layer in enumerate(expert_plan):
        for e, parts in enumerate(layer):
            blob = blobs[k % 2]
            pieces = [(parts[p], qtype, EXPERTS, blob[t.offset:t.offset + t.nbytes]) for p, t in lay.items()]
            n_in = sum(_in_bytes(enc.ckpt, s) for s in parts.values())
            enc.submit(pieces, _then(w.write_expert, (i, e, blob), bar, n_in))
            k += 1
