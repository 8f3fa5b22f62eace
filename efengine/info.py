"""`efengine info model.ef [--verify] [--json]`: what a .ef holds, and whether it is intact."""
from __future__ import annotations

import argparse
import json
import shutil
import sys

from .errors import EfError
from .format import EfFile


def tensor_class(name: str, shape: tuple, classes: dict[str, str]) -> str:
    """experts/dense/embed/norm/router of a stored dense tensor (from the family's table when known)."""
    if name in classes:
        return classes[name]
    if name.startswith("token_embd"):
        return "embed"
    if "ffn_gate_inp" in name:
        return "router"
    return "norm" if len(shape) == 1 else "dense"


def summary(ef: EfFile) -> dict:
    """Everything `info` prints, as plain data."""
    cfg = ef.config
    try:
        from efmodels import expected_tensors
        classes = {n: c for n, _, c in expected_tensors(cfg)}
    except Exception:  # noqa: BLE001 - a family this build does not know: classify by name
        classes = {}
    by_class: dict[str, dict] = {}
    for n, t in ef.tensors.items():
        c = by_class.setdefault(tensor_class(n, t.shape, classes), {"bytes": 0, "tensors": 0, "types": set()})
        c["bytes"] += t.nbytes
        c["tensors"] += 1
        c["types"].add(t.type)
    experts = None
    if ef.expert_layers:
        n_blobs = len(ef.expert_layers) * ef.n_experts
        by_class["experts"] = {"bytes": n_blobs * ef.blob_nbytes, "tensors": n_blobs,
                               "types": {t.type for t in ef.expert_layout.values()}}
        experts = {"layers": len(ef.expert_layers), "per_layer": ef.n_experts, "top_k": cfg.top_k,
                   "width": cfg.moe_intermediate_size, "blob_bytes": ef.blob_nbytes,
                   "parts": {p: {"type": t.type, "shape": list(t.shape), "group": t.group}
                             for p, t in ef.expert_layout.items()}}
    files = {n: f["nbytes"] for n, f in ef.files.items()}
    return {"path": str(ef.path), "bytes": ef.size, "version": ef.header.get("version"), "arch": ef.arch,
            "config": cfg.to_dict(), "experts": experts,
            "classes": {c: {**v, "types": sorted(v["types"])} for c, v in sorted(by_class.items())},
            "files": files, "quantization": ef.meta.get("quantization"),
            "quant_error": ef.meta.get("quant_error"), "source": ef.meta.get("source")}


def _gib(n: int) -> str:
    if n >= 2**28:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout
    c = s["config"]
    src = s.get("source") or {}
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"{s['path']}: .ef v{s['version']}, {_gib(s['bytes'])}")
    p(f"architecture  {s['arch']}" + (f"  (from {src.get('format')}: {src.get('architecture') or src.get('shape')})"
                                      if src else ""))
    p(f"layers {c['n_layers']}, hidden {c['hidden_size']}, heads {c['n_heads']} (kv {c['n_kv_heads']}, "
      f"head dim {c['head_dim']}), vocab {c['vocab_size']}, attention {c['attention']}, "
      f"rope theta {c['rope_theta']:g}, max positions {c['max_position']}")
    x = s["experts"]
    if x:
        parts = ", ".join(f"{k} {v['type']} {v['shape']}" for k, v in x["parts"].items())
        p(f"experts       {x['per_layer']} per layer in {x['layers']} MoE layers, top-{x['top_k']}, "
          f"width {x['width']}; "
          f"blob {_gib(x['blob_bytes'])} ({parts})")
    if c.get("n_shared_experts"):
        p(f"shared        {c['n_shared_experts']} shared expert(s), width {c['shared_intermediate_size']}")
    p("sizes per tensor class:")
    for cls, v in s["classes"].items():
        err = (s.get("quant_error") or {}).get(cls)
        e = "" if err is None else "  exact" if err == 0 else f"  rel. RMS error {err:.5f}"
        p(f"  {cls:8s} {'/'.join(v['types']):10s} {_gib(v['bytes']):>12s}  ({v['tensors']} pieces){e}")
    if s["files"]:
        p(f"  files    {', '.join(s['files'])}  ({_gib(sum(s['files'].values()))})")
    p(f"total         {_gib(s['bytes'])}")


def verify(ef: EfFile, progress: bool | None = None) -> list[str]:
    from tqdm import tqdm
    total = sum(t.nbytes for t in ef.tensors.values()) + sum(f["nbytes"] for f in ef.files.values())
    if ef.expert_layers:
        total += len(ef.expert_layers) * ef.n_experts * ef.blob_nbytes
    enabled = sys.stderr.isatty() if progress is None else progress
    size = shutil.get_terminal_size((100, 20))       # a 0x0 pty would hide the bar
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not enabled,
              file=sys.stderr, ncols=size.columns, nrows=size.lines) as bar:
        return ef.verify(progress=bar.update)


def main(args: list[str]) -> int:
    p = argparse.ArgumentParser(prog="efengine info", description="Show what a .ef file holds.")
    p.add_argument("model", help="the .ef file")
    p.add_argument("--verify", action="store_true", help="check every checksum (reads the whole file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    try:
        a = p.parse_args(args)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        ef = EfFile(a.model)
        s = summary(ef)
        bad = verify(ef) if a.verify else None
    except EfError as e:
        print(f"efengine info: error: {e}", file=sys.stderr)
        return 1
    if a.json:
        if bad is not None:
            s["verify"] = {"ok": not bad, "bad": bad}
        print(json.dumps(s, indent=2))
    else:
        print_summary(s)
        if bad is not None:
            print("verify: OK, every checksum matches" if not bad else
                  f"verify: {len(bad)} corrupt pieces: {', '.join(bad[:20])}")
    return 1 if bad else 0
