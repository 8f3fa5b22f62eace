"""The `efconvert` command: HF model folder (or a named random shape) -> one .ef file.

  efconvert CKPT_DIR out.ef [--experts q4] [--dense q8] [--embed TYPE] [--group 64]
  efconvert --random SHAPE out.ef [--layers N] [--seed S] [--experts q4] [--dense q8]
  efconvert --list-shapes
  efconvert MODEL.gguf out.ef [--experts native] [--dense native] [--moefy E --top-k K [--shared N]]
Exit codes: 0 done, 1 bad input or output (one clear line, no traceback), 2 usage, 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from efengine import quant
from efengine.errors import EfError

EPILOG = """types: q4 (4-bit, fp16 scale+min per group), q8 (8-bit, fp16 scale per group), f16, bf16, f32.
Norms, biases and routers are always f32. --experts f32 --dense f32 keeps the checkpoint's values exactly."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="efconvert", description="Convert a Mixture-of-Experts checkpoint "
                                "into one .ef file (weights, config, tokenizer, chat template).", epilog=EPILOG)
    p.add_argument("paths", nargs="*", metavar="PATH", help="CKPT_DIR OUT.ef, or OUT.ef with --random")
    p.add_argument("--experts", default=None, choices=TYPES, help="routed experts (default q4; GGUF: native)")
    p.add_argument("--dense", default=None, choices=TYPES,
                   help="attention, shared experts, dense FFNs, output head (default q8; GGUF: native)")
    p.add_argument("--embed", default=None, choices=TYPES, help="token embedding (default: as --dense)")
    p.add_argument("--group", type=int, default=None,
                   help="quantization group size along K (default 64; GGUF: 32)")
    p.add_argument("--random", metavar="SHAPE", help="write random weights of a named real shape (see --list-shapes)")
    p.add_argument("--layers", type=int, default=None, help="with --random: keep only the first N layers")
    p.add_argument("--seed", type=int, default=0, help="with --random: random seed (default 0)")
    p.add_argument("--list-shapes", action="store_true", help="list the named shapes --random knows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    gguf_args(p)
    return p


def _report(out: Path, seconds: float, in_bytes: int | None) -> None:
    from efengine.format import EfFile
    ef = EfFile(out)
    size = out.stat().st_size
    rate = f", {in_bytes / seconds / 1e6:.0f} MB/s of input" if in_bytes else ""
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {seconds:.1f} s{rate}", file=sys.stderr)
    q, err = ef.meta.get("quantization", {}), ef.meta.get("quant_error")
    if err:
        print("quantization error (relative RMS) per tensor class:", file=sys.stderr)
        for cls, e in err.items():
            print(f"  {cls:8s} {q.get(cls, '?'):5s} {e:.5f}", file=sys.stderr)


def run(a: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from . import shapes
    if a.list_shapes:
        print("\n".join(shapes.describe()))
        return 0
    progress = False if a.no_progress else None
    if a.paths and a.paths[0].lower().endswith(".gguf"):
        return run_gguf(a, p, progress)
    if "native" in (a.experts, a.dense, a.embed) or a.moefy is not None:
        p.error("native types and --moefy apply to GGUF input (MODEL.gguf)")
    opts = dict(experts=a.experts or "q4", dense=a.dense or "q8", embed=a.embed,
                group=a.group or quant.DEFAULT_GROUP, progress=progress)
    t0 = time.perf_counter()
    if a.random:
        if len(a.paths) != 1:
            p.error("--random SHAPE takes one path: the output .ef")
        from .random_model import write_random
        out = write_random(a.random, a.paths[0], layers=a.layers, seed=a.seed, **opts)
        _report(out, time.perf_counter() - t0, None)
        return 0
    if len(a.paths) != 2:
        p.error("give CKPT_DIR and OUT.ef (or --random SHAPE OUT.ef, or --list-shapes)")
    if a.layers is not None:
        p.error("--layers only applies to --random")
    from .convert import convert_hf
    from .hf import Checkpoint
    out = convert_hf(a.paths[0], a.paths[1], **opts)
    ck = Checkpoint(a.paths[0])
    in_bytes = sum(ck.nbytes(n) for n in ck.names)
    ck.close()
    _report(out, time.perf_counter() - t0, in_bytes)
    return 0


# ---- GGUF input (convert/gguf_convert.py): detected by the .gguf extension ---------------------------

TYPES = quant.TYPES + ("native",)


def gguf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GGUF input", "native: keep GGUF types that map exactly (Q4_0/Q4_1 -> q4, "
                             "Q8_0 -> q8, F16, BF16, F32); others go to the nearest of q4/q8")
    g.add_argument("--moefy", type=int, metavar="E", help="split every dense FFN into E experts (dense Llama)")
    g.add_argument("--top-k", type=int, metavar="K", help="with --moefy: experts active per token")
    g.add_argument("--shared", type=int, metavar="N", help="with --moefy: always-on neurons per layer "
                   "(default half the FFN width)")


def run_gguf(a: argparse.Namespace, p: argparse.ArgumentParser, progress) -> int:
    if len(a.paths) != 2:
        p.error("give MODEL.gguf and OUT.ef")
    if a.random or a.layers is not None:
        p.error("--random and --layers do not apply to GGUF input")
    if (a.moefy is None) != (a.top_k is None) or (a.shared is not None and a.moefy is None):
        p.error("--moefy E and --top-k K go together (--shared only with them)")
    from .gguf_convert import convert_gguf
    t0 = time.perf_counter()
    moefy = (a.moefy, a.top_k) if a.moefy is not None else None
    out = convert_gguf(a.paths[0], a.paths[1], experts=a.experts or "native", dense=a.dense or "native",
                       embed=a.embed, group=a.group or 32, progress=progress, moefy=moefy, shared=a.shared)
    _report(out, time.perf_counter() - t0, Path(a.paths[0]).stat().st_size)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    try:
        return run(a, p)
    except EfError as e:
        print(f"efconvert: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nefconvert: interrupted; no output file was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
