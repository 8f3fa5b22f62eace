"""What the lossy route bias costs and saves: `python -m efengine.route_bias_bench`.

Teacher-forces a text through the offloaded model one token at a time (decode steps, as generation
routes them), per policy and route-bias margin, and compares each run with the lossless one
(margin 0, bit-identical to the all-resident model):
  misses/token, loads/token (misses + prefetch copies) and the fraction saved vs lossless,
  rerouted: fraction of expert choices (token x layer x top_k) replaced by a resident expert,
  KL: mean KL(lossless || biased) of the next-token distributions (nats),
  agree: fraction of positions whose greedy (argmax) next token is unchanged.
Prints one JSON object on stdout and a table on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .offload_bench import model_tokens

DEFAULT_TEXT = "tests/data/english_eval.txt"


def run(ef, ids: list[int], policy: str, fraction: float, margin: float) -> tuple[np.ndarray, dict]:
    """Logits [T, V] of every position and the runtime's summary."""
    from .model import Model
    from .offload import OffloadRuntime
    from .offload.prefetch import ImmediateEngine
    rt = OffloadRuntime(ef, "numpy", policy=policy, fraction=fraction, engine=ImmediateEngine(),
                        route_bias=margin, keep_log=False)
    model = Model(ef, "numpy", experts=rt)
    rt.attach(model)
    cache = model.new_cache(len(ids) + 1)
    out = np.stack([model.forward(np.array([t]), cache, last_only=True)[-1] for t in ids])
    rt.close()
    return out, rt.summary()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    """Mean and max KL(ref || got) per position, and greedy-token agreement."""
    lp, lq = log_softmax(ref), log_softmax(got)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "agree": float((ref.argmax(-1) == got.argmax(-1)).mean())}


def bench(path: str, policies: list[str], margins: list[float], fraction: float, tokens: int,
          text: str | None) -> dict:
    from .format import EfFile
    if path == "demo":
        from .demo import default_model_path
        path = str(default_model_path(progress=False))
    ef = EfFile(path)
    ids = model_tokens(ef, text or DEFAULT_TEXT, tokens)
    A, L = ef.config.top_k, len(ef.expert_layers)
    res = {"model": path, "tokens": len(ids), "layers": L, "experts": ef.n_experts, "top_k": A,
           "cache": fraction, "rows": []}
    for policy in policies:
        ref, base = None, None
        for m in sorted(set([0.0, *margins])):
            logits, s = run(ef, ids, policy, fraction, m)
            loads = (s["misses"] + s["prefetch_issued"]) / max(1, s["tokens"])
            row = {"policy": policy, "margin": m, "misses_per_token": round(s["misses"] / max(1, s["tokens"]), 3),
                   "loads_per_token": round(loads, 3),
                   "rerouted": round(s.get("rerouted_experts", 0) / (len(ids) * L * A), 4)}
            if ref is None:
                ref, base = logits, row
            row["misses_saved"] = round(1 - row["misses_per_token"] / max(base["misses_per_token"], 1e-9), 4)
            row["loads_saved"] = round(1 - row["loads_per_token"] / max(base["loads_per_token"], 1e-9), 4)
            row.update({k: round(v, 5) for k, v in compare(ref, logits).items()})
            res["rows"].append(row)
            print(table_row(row), file=sys.stderr, flush=True)
    return res


HEADER = ("policy      margin  misses/tok  saved   loads/tok  saved   rerouted  KL mean   KL max   agree")


def table_row(r: dict) -> str:
    return (f"{r['policy']:<11} {r['margin']:>6.3f}  {r['misses_per_token']:>10.3f}  {r['misses_saved']:>5.1%}"
            f"  {r['loads_per_token']:>9.3f}  {r['loads_saved']:>5.1%}  {r['rerouted']:>8.2%}"
            f"  {r['kl_mean']:>7.4f}  {r['kl_max']:>7.3f}  {r['agree']:>6.1%}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m efengine.route_bias_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo", help=".ef model (default: the demo model)")
    ap.add_argument("--text", help=f"text to teacher-force (default {DEFAULT_TEXT})")
    ap.add_argument("--tokens", type=int, default=200, help="positions to score (default 200)")
    ap.add_argument("--cache", type=float, default=0.5, help="cache size as a fraction of all experts")
    ap.add_argument("--policies", default="expertflow,ondemand")
    ap.add_argument("--margins", default="0,0.02,0.05,0.1,0.2", help="router-probability margins")
    a = ap.parse_args(argv)
    print(HEADER, file=sys.stderr)
    res = bench(a.model, a.policies.split(","), [float(x) for x in a.margins.split(",")], a.cache,
                a.tokens, a.text)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
