"""Conversion throughput: `python -m efconvert.bench [--gb 3]` prints one JSON object.

Builds a sharded bf16 checkpoint with Mixtral-8x7B's shapes truncated to as many layers as fit in
--gb, converts it to q4 experts / q8 dense in a child process (as a user would run efconvert),
and reports MB/s of input and the child's peak RSS. "cold" runs drop the shards from the page
cache first (fdatasync + POSIX_FADV_DONTNEED, no root needed) so the disk is read for real.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from efengine import quant

from .hf import save_safetensors
from .shapes import hf_config

SHAPE = "mixtral-8x7b"
SHARD_BYTES = 1 << 30


def _layer_tensors(l: int, c: dict) -> dict:
    D, I, E = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    kv = D // c["num_attention_heads"] * c["num_key_value_heads"]
    p = f"model.layers.{l}."
    t = {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
         p + "self_attn.q_proj.weight": (D, D), p + "self_attn.k_proj.weight": (kv, D),
         p + "self_attn.v_proj.weight": (kv, D), p + "self_attn.o_proj.weight": (D, D),
         p + "block_sparse_moe.gate.weight": (E, D)}
    for e in range(E):
        q = f"{p}block_sparse_moe.experts.{e}."
        t.update({q + "w1.weight": (I, D), q + "w3.weight": (I, D), q + "w2.weight": (D, I)})
    return t


def build_checkpoint(folder: Path, gb: float, seed: int = 0) -> tuple[Path, int]:
    """A sharded bf16 Mixtral-shaped checkpoint of about `gb` GB; returns (folder, bytes)."""
    c = hf_config(SHAPE)
    D, V = c["hidden_size"], c["vocab_size"]
    head = {"model.embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,)}
    per_layer = sum(int(np.prod(s)) * 2 for s in _layer_tensors(0, c).values())
    layers = max(1, round((gb * 1e9 - sum(int(np.prod(s)) * 2 for s in head.values())) / per_layer))
    c["num_hidden_layers"] = layers
    tensors = dict(head)
    for l in range(layers):
        tensors.update(_layer_tensors(l, c))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(c))
    rng = np.random.default_rng(seed)
    pool = quant.f32_to_bf16(rng.standard_normal(1 << 24, dtype=np.float32) * 0.02)

    def produce(name: str) -> np.ndarray:
        shape = tensors[name]
        n = int(np.prod(shape))
        if len(shape) == 1:
            return quant.f32_to_bf16(1 + rng.standard_normal(n, dtype=np.float32) * 0.02)
        pos, pieces = int(rng.integers(0, pool.size)), []
        while n > 0:                                      # shifted slices of the pool, no copies
            pieces.append(pool[pos:pos + n])
            n -= pieces[-1].size
            pos = 0
        return pieces

    shards, cur, size = [], [], 0
    for name, shape in tensors.items():
        nb = int(np.prod(shape)) * 2
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(folder / fname, {n: ("BF16", tensors[n]) for n in names}, produce)
        weight_map.update({n: fname for n in names})
        total += sum(int(np.prod(tensors[n])) * 2 for n in names)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder, total


def drop_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache so the next read goes to the disk."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# The converting child reports its own high-water RSS (VmHWM: this process image only) next to the
# ru_maxrss its parent sees; the parent stays small (the checkpoint is built in another child)
# because Linux carries a forked parent's RSS into the child's ru_maxrss.
CHILD = ("import json, resource, sys\n"
         "from efconvert.cli import main\n"
         "rc = main(sys.argv[1:])\n"
         "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
         "print('BENCH ' + json.dumps({'vm_hwm_kb': int(hwm)}), file=sys.stderr)\n"
         "sys.exit(rc)\n")


def convert_once(src: Path, out: Path, experts: str, dense: str) -> dict:
    """Run efconvert in a child process; wall time, CPU time and peak RSS of the child."""
    cmd = [sys.executable, "-c", CHILD, str(src), str(out), "--experts", experts, "--dense", dense, "--no-progress"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"efconvert failed ({r.returncode}): {r.stderr.strip()}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    hwm = json.loads([l for l in r.stderr.splitlines() if l.startswith("BENCH ")][-1][6:])["vm_hwm_kb"]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
            "peak_rss_MB": round(after.ru_maxrss * 1024 / 1e6, 1), "vm_hwm_MB": round(hwm * 1024 / 1e6, 1),
            "output_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m efconvert.bench", description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=3.0, help="approximate checkpoint size in GB (default 3)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temporary folder)")
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both")
    p.add_argument("--experts", default="q4")
    p.add_argument("--dense", default="q8")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and the .ef")
    p.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.build_only:
        print(build_checkpoint(Path(a.build_only), a.gb)[1])
        return 0
    work = Path(tempfile.mkdtemp(prefix="efconvert-bench-", dir=a.dir))
    try:
        t0 = time.perf_counter()
        src = work / "ckpt"
        built = subprocess.run([sys.executable, "-m", "efconvert.bench", "--build-only", str(src), "--gb", str(a.gb)],
                               capture_output=True, text=True, check=True)
        in_bytes = int(built.stdout.split()[-1])
        layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
        result = {"shape": f"{SHAPE} truncated to {layers} layers",
                  "input_bytes": in_bytes, "source_dtype": "bf16", "experts": a.experts, "dense": a.dense,
                  "group": quant.DEFAULT_GROUP, "cpus": os.cpu_count(),
                  "build_seconds": round(time.perf_counter() - t0, 1),
                  "load_average": os.getloadavg()[0],
                  "peak_rss_note": "peak_rss_MB: ru_maxrss of the converting children (max over runs); "
                                   "vm_hwm_MB: the converter's own high-water RSS"}
        runs = ["cold", "warm"] if a.cache == "both" else [a.cache]
        for mode in runs:
            out = work / f"out-{mode}.ef"
            if mode == "cold":
                drop_cache(src)
            r = convert_once(src, out, a.experts, a.dense)
            r["input_MB_per_s"] = round(in_bytes / r["seconds"] / 1e6, 1)
            result[mode] = r
            if not a.keep:
                out.unlink()
        print(json.dumps(result, indent=2))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
