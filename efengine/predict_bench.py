"""`python -m efengine.predict_bench --json OUT [--plot DIR]`: expert prediction accuracy by distance.

Legend: N tokens, L MoE layers, E experts per layer, K active experts per token (top_k),
d distance in layers (1..max_d), D hidden.

Metric: recall of the true experts among those predicted. Layer c of token t has just run; the
predictor names K experts for layer c + d of the same token; recall = |named & true| / K, where
"true" is the router's actual top-K at layer c + d. Averaged over every (token, c) with c + d < L
(targets inside the same token, so every predictor is scored on the same set).

Predictors:
  pregate     the router of layer c + d applied to the hidden state after layer c (the residual
              stream), its top-K as the router itself would pick (backend.route)
  hybrid      HybridPredictor (offload/predict.py) given those pre-gate scores for c+1..c+max_d
              plus routing history, learned online as the tokens go by (the runtime's expertflow)
  history     the same predictor without pre-gate scores (what trace replay can use)
  last-token  the experts the previous token used at layer c + d (a no-learning baseline)
The predictors learn only from routing already seen: each prediction is made before its target.

Model part (real hidden states): the demo model (SmolLM2-135M MoE-fied) or any .ef, over a
held-out text in one prefill (causal: each token's hidden states equal those of decoding it one at
a time), recording each layer's routing and residual stream; the predictors then replay the tokens
in decode order. Trace part: the Mixtral routing traces carry no hidden states, so history and
last-token only. Prints one JSON object on stdout; --json also writes it; --plot draws a PNG.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import EfError
from .offload.predict import HybridPredictor, pregate_probs

MAX_D = 8


class _Recall:
    """Sums of recall by distance for named predictors."""

    def __init__(self, names: tuple[str, ...], max_d: int):
        self.hits = {n: np.zeros(max_d + 1) for n in names}
        self.count = np.zeros(max_d + 1)

    def add(self, name: str, d: int, picked: np.ndarray, true: np.ndarray) -> None:
        self.hits[name][d] += np.isin(true, picked).sum() / true.size

    def table(self) -> dict[str, dict[int, float]]:
        n = np.maximum(self.count, 1)
        return {k: {d: round(float(v[d] / n[d]), 4) for d in range(1, len(n)) if self.count[d]}
                for k, v in self.hits.items()}


def topk(p: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries' indices (ties: lowest index first)."""
    return np.argsort(-p, kind="stable")[:k]


# ---- real hidden states ------------------------------------------------------------------------

def capture(model, ids: list[int], max_d: int = MAX_D) -> dict:
    """One prefill over `ids`: true routing [N, L, K] of every MoE layer and the routing the later
    layers' routers would pick from each layer's output, pregate ids [L, max_d, N, K] (-1 where
    c + d >= L) with their logits [L, max_d, N, E]."""
    cfg, b = model.cfg, model.backend
    layers = list(cfg.moe_layers)
    index = {l: i for i, l in enumerate(layers)}
    L, E, K, N = len(layers), cfg.n_experts, cfg.top_k, len(ids)
    true = np.zeros((N, L, K), dtype=np.int64)
    pg_ids = np.full((L, max_d, N, K), -1, dtype=np.int64)
    pg_logits = np.full((L, max_d, N, E), np.nan)

    def hook(layer, logits, r_ids, weights):
        true[:, index[layer]] = np.asarray(b.to_host(r_ids))
        return r_ids, weights

    def on_layer(layer, hidden):
        c = index.get(layer)
        if c is None:
            return
        for d in range(1, max_d + 1):
            if c + d >= L:
                break
            logits = model.router_logits(layers[c + d], hidden)
            pg_ids[c, d - 1] = np.asarray(b.to_host(b.route(logits, cfg)[0]))
            pg_logits[c, d - 1] = np.asarray(b.to_host(logits), dtype=np.float64)

    old = model.route_hook
    model.route_hook = hook
    try:
        model.forward_hidden(np.asarray(ids), model.new_cache(N), on_layer=on_layer)
    finally:
        model.route_hook = old
    return {"true": true, "pregate_ids": pg_ids, "pregate_logits": pg_logits, "E": E, "K": K}


def score_model(cap: dict, max_d: int = MAX_D, warmup: int | None = None) -> dict:
    """Recall by distance of pregate / hybrid / history / last-token on a captured run."""
    true, pg_ids, pg_logits = cap["true"], cap["pregate_ids"], cap["pregate_logits"]
    N, L, K = true.shape
    E = cap["E"]
    hyb = HybridPredictor(L, E, K, warmup=warmup)
    hist = HybridPredictor(L, E, K, warmup=warmup)
    rec = _Recall(("pregate", "hybrid", "history", "last-token"), max_d)
    for t in range(N):
        hyb.begin_step()
        hist.begin_step()
        for c in range(L):
            hyb.observe(c, true[t, c])
            hist.observe(c, true[t, c])
            pg = np.full((L, E), np.nan)
            for d in range(1, min(max_d, L - 1 - c) + 1):
                pg[c + d] = pregate_probs(pg_logits[c, d - 1, t][None, :], K)
            P, H = hyb.predict(c, pg), hist.predict(c)
            for d in range(1, min(max_d, L - 1 - c) + 1):
                y = true[t, c + d]
                rec.count[d] += 1
                rec.add("pregate", d, pg_ids[c, d - 1, t], y)
                rec.add("hybrid", d, topk(P[c + d], K), y)
                rec.add("history", d, topk(H[c + d], K), y)
                if t > 0:
                    rec.add("last-token", d, true[t - 1, c + d], y)
    out = rec.table()
    if N > 1:      # last-token has no answer for the first token: rescale to the tokens it had
        out["last-token"] = {d: round(v * N / (N - 1), 4) for d, v in out["last-token"].items()}
    return out


def bench_model(path: str, text: str | None, tokens: int, max_d: int = MAX_D) -> dict:
    from .format import EfFile
    from .model import Model
    from .offload_bench import model_tokens
    if path == "demo":
        from .demo import default_model_path
        path = str(default_model_path(progress=False))
    ef = EfFile(path)
    ids = model_tokens(ef, text, tokens)
    if len(ids) < 2:
        raise EfError(f"{text or 'the default text'}: too few tokens to measure prediction ({len(ids)})")
    t0 = time.perf_counter()
    cap = capture(Model(ef, "numpy"), ids, max_d)
    t1 = time.perf_counter()
    recall = score_model(cap, max_d)
    cfg = ef.config
    return {"model": Path(path).name, "tokens": len(ids), "layers": len(cfg.moe_layers),
            "experts": cfg.n_experts, "top_k": cfg.top_k, "chance": round(cfg.top_k / cfg.n_experts, 4),
            "recall": recall, "seconds": {"prefill": round(t1 - t0, 2), "predict": round(time.perf_counter() - t1, 2)}}


# ---- traces (history only) ---------------------------------------------------------------------

def score_trace(experts: np.ndarray, n_experts: int, max_d: int = MAX_D) -> dict:
    """Recall by distance of history / last-token on a routing trace [N, L, K]."""
    N, L, K = experts.shape
    hist = HybridPredictor(L, n_experts, K)
    rec = _Recall(("history", "last-token"), max_d)
    for t in range(N):
        hist.begin_step()
        for c in range(L):
            hist.observe(c, experts[t, c])
            H = hist.predict(c)
            for d in range(1, min(max_d, L - 1 - c) + 1):
                y = experts[t, c + d]
                rec.count[d] += 1
                rec.add("history", d, topk(H[c + d], K), y)
                if t > 0:
                    rec.add("last-token", d, experts[t - 1, c + d], y)
    out = rec.table()
    if N > 1:
        out["last-token"] = {d: round(v * N / (N - 1), 4) for d, v in out["last-token"].items()}
    return out


def bench_trace(name: str, tokens: int | None, max_d: int = MAX_D) -> dict:
    from .offload.trace import load
    tr = load(name)
    if tokens:
        tr = tr.head(tokens)
    return {"trace": tr.name, "tokens": tr.n_tokens, "layers": tr.n_layers, "experts": tr.n_experts,
            "top_k": tr.top_k, "chance": round(tr.top_k / tr.n_experts, 4),
            "recall": score_trace(tr.experts, tr.n_experts, max_d)}


# ---- output ------------------------------------------------------------------------------------

def table(out: dict) -> str:
    lines = []
    m = out.get("model")
    rows = ([(f"{m['model']} ({m['tokens']} tok)", m)] if m else []) + \
        [(f"{r['trace']} ({r['tokens']} tok)", r) for r in out["traces"]]
    for title, r in rows:
        ds = sorted({d for v in r["recall"].values() for d in v})
        lines.append(f"{title}: top-{r['top_k']} of {r['experts']} recall by distance (chance {r['chance']})")
        lines.append("  predictor   " + " ".join(f"{'d=' + str(d):>6}" for d in ds))
        for name, v in r["recall"].items():
            lines.append(f"  {name:<11} " + " ".join(f"{v.get(d, float('nan')):6.3f}" for d in ds))
    return "\n".join(lines)


def plot(out: dict, folder: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = ([("real hidden states: " + out["model"]["model"], out["model"])] if out.get("model") else []) + \
        [(f"trace {r['trace']} (history only)", r) for r in out["traces"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    style = {"pregate": ("o-", "C0"), "hybrid": ("s-", "C1"), "history": ("^-", "C2"), "last-token": ("x:", "C3")}
    for ax, (title, r) in zip(axes[0], panels):
        for name, v in r["recall"].items():
            ds = sorted(v)
            fmt, color = style.get(name, (".-", None))
            ax.plot(ds, [v[d] for d in ds], fmt, color=color, label=name, ms=4)
        ax.axhline(r["chance"], color="gray", lw=0.8, ls="--", label="chance")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("distance d (layers ahead)", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-K recall", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "predict_accuracy.png"
    tmp = folder / ".predict_accuracy.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def _write_json(path: Path, out: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m efengine.predict_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="also write the JSON to this file")
    ap.add_argument("--plot", default=None, help="folder to write predict_accuracy.png into")
    ap.add_argument("--model", default="demo", help="a .ef path, 'demo' (default) or 'none' to skip")
    ap.add_argument("--text", default=None, help="held-out text (default: tests/data/english_eval.txt)")
    ap.add_argument("--tokens", type=int, default=1000, help="tokens of the text to run (default 1000)")
    ap.add_argument("--traces", default="gsm8k_2,humaneval_2", help="trace names or paths, comma-separated")
    ap.add_argument("--trace-tokens", type=int, default=None, help="only the first N tokens of each trace")
    ap.add_argument("--max-d", type=int, default=MAX_D, help="largest distance (layers ahead)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.max_d < 1 or a.tokens < 2:
        print("error: --max-d must be >= 1 and --tokens >= 2", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out: dict = {"benchmark": "predict_accuracy", "metric": "top-K recall of the true experts at layer c+d, "
                 "predicted after layer c of the same token", "max_d": a.max_d, "model": None, "traces": []}
    try:
        if a.model != "none":
            out["model"] = bench_model(a.model, a.text, a.tokens, a.max_d)
        for name in [t for t in a.traces.split(",") if t]:
            out["traces"].append(bench_trace(name, a.trace_tokens, a.max_d))
    except EfError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out["seconds"] = round(time.perf_counter() - t0, 2)
    print(table(out), file=sys.stderr)
    if a.json:
        _write_json(Path(a.json), out)
    if a.plot and (out["model"] or out["traces"]):
        print(f"plot: {plot(out, Path(a.plot))}", file=sys.stderr)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
