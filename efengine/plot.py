"""Plots of offload runs (matplotlib, optional: `pip install efengine[plot]`).

    python -m efengine.plot RESULT.json --out DIR      (redraw from a saved result)
    efengine bench --offload ... --plot DIR           python -m efengine.offload_bench --timed --plot DIR

Two kinds of figure:
  timeline_*.png   per-layer timeline of a few decode steps (OffloadStats.timeline events, format in
                   offload/stats.py): one row per model layer; the upper half shows compute (blue)
                   and stalls (red) of that layer, the lower half copies (orange) of its experts,
                   which run on the copy stream while other layers compute. Dotted lines start steps.
  policies.png     by cache size (fraction of all experts), one line per policy: tokens/s, stall
                   per token and misses per token, with the oracle bound (Belady misses, dashed).
Accepted results: `efengine bench --offload` JSON (whole, or its "offload" part: cells with policy,
cache_fraction, tokens_per_s, stall_per_token_s, misses_per_token, belady_misses_per_token,
oracle_bound_s, optional timeline) and `python -m efengine.offload_bench --timed` JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EfError

COLORS = {"compute": "#3b75af", "stall": "#d62728", "copy": "#ff7f0e"}


def _plt():
    """pyplot on the Agg backend (files only), or a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise EfError("plotting needs matplotlib: pip install efengine[plot] (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def check() -> None:
    """Fail before a long run when plots were asked for but cannot be drawn."""
    _plt()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


# ---- (i) timeline ----------------------------------------------------------------------------------
def check_events(events) -> list[dict]:
    if not isinstance(events, list) or not events:
        raise EfError("timeline: no events to draw (record with OffloadStats.timeline = [])")
    for k, ev in enumerate(events):
        if not isinstance(ev, dict) or ev.get("kind") not in COLORS or not {"step", "layer", "t0", "t1"} <= set(ev):
            raise EfError(f"timeline: event {k} is not {{step, layer, kind: compute|copy|stall, t0, t1}}: {ev!r}")
    return events


def plot_timeline(events: list[dict], path, title: str = "") -> Path:
    """One PNG of the events (times in seconds, drawn in ms)."""
    plt = _plt()
    events = check_events(events)
    layers = sorted({int(e["layer"]) for e in events})
    row = {l: k for k, l in enumerate(layers)}
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.22 * len(layers) + 1.5)))
    for kind in ("compute", "stall", "copy"):
        bars = [(1e3 * e["t0"], 1e3 * max(e["t1"] - e["t0"], 0.0), row[int(e["layer"])])
                for e in events if e["kind"] == kind]
        lane = 0.45 if kind == "copy" else 0.0             # y grows downward: copies low in the row
        for x, w, y in bars:
            ax.broken_barh([(x, w)], (y + lane - 0.45, 0.42), facecolors=COLORS[kind], linewidth=0)
    starts = {}
    for e in events:
        starts[e["step"]] = min(starts.get(e["step"], e["t0"]), e["t0"])
    for s, t in sorted(starts.items()):
        ax.axvline(1e3 * t, color="0.4", linestyle=":", linewidth=0.8)
        ax.text(1e3 * t, len(layers) - 0.4, f" step {s}", fontsize=7, va="bottom", color="0.3")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers], fontsize=6 if len(layers) > 16 else 8)
    ax.set_ylim(-0.6, len(layers) + 0.2)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("layer")
    stall = sum(e["t1"] - e["t0"] for e in events if e["kind"] == "stall")
    n_copy = sum(1 for e in events if e["kind"] == "copy")
    ax.set_title(f"{title}  ({len(starts)} steps, {n_copy} copies, stall {1e3 * stall:.1f} ms)".strip(), fontsize=9)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper left",
              bbox_to_anchor=(1.005, 1.0), fontsize=7)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


# ---- (ii) policies by budget ----------------------------------------------------------------------
def cells_of(res: dict) -> tuple[list[dict], str]:
    """(cells, title) from any accepted result (see the module docstring)."""
    if not isinstance(res, dict):
        raise EfError("result: expected a JSON object")
    if isinstance(res.get("offload"), dict):
        dev = res.get("device", "")
        cells, title = cells_of(res["offload"])
        return cells, f"{title} on {dev}".strip()
    if isinstance(res.get("cells"), list):
        o = res
        return res["cells"], (f"{o.get('scenario', '')} {o.get('model', '')} trace {o.get('route_trace', '')} "
                               f"({o.get('path', '')} path)")
    if isinstance(res.get("results"), list):
        cells, names = [], []
        for r in res["results"]:
            names.append(str(r.get("trace", r.get("model", ""))))
            for row in r.get("caches", []):
                for pol, t in (row.get("timed") or {}).items():
                    if "time_per_token_s" not in t:
                        continue
                    c = dict(t, policy=pol, cache_fraction=row["cache"],
                             tokens_per_s=1.0 / t["time_per_token_s"] if t["time_per_token_s"] else None)
                    c.setdefault("belady_misses_per_token", row.get("misses_per_token", {}).get("belady"))
                    cells.append(c)
        return cells, "simulated replay (virtual clock) of " + ", ".join(names)
    raise EfError("result: no offload cells found (expected 'offload', 'cells' or 'results' with timed rows)")


def plot_policies(cells: list[dict], path, title: str = "") -> Path:
    plt = _plt()
    need = ("policy", "cache_fraction", "tokens_per_s", "stall_per_token_s", "misses_per_token")
    cells = [c for c in cells if all(c.get(k) is not None for k in need)]
    if not cells:
        raise EfError(f"result: no cell has all of {', '.join(need)}")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("tokens_per_s", "tokens/s", 1.0), ("stall_per_token_s", "stall per token (ms)", 1e3),
              ("misses_per_token", "misses per token", 1.0))
    for pol in dict.fromkeys(c["policy"] for c in cells):
        mine = sorted((c for c in cells if c["policy"] == pol), key=lambda c: c["cache_fraction"])
        x = [100 * c["cache_fraction"] for c in mine]
        for ax, (key, _, scale) in zip(axes, panels):
            ax.plot(x, [scale * c[key] for c in mine], marker="o", label=pol)
    by_frac = {}
    for c in cells:                                  # one oracle figure per cache size
        by_frac.setdefault(c["cache_fraction"], c)
    xs = sorted(by_frac)
    if all(by_frac[f].get("oracle_bound_s") for f in xs):
        axes[0].plot([100 * f for f in xs], [1.0 / by_frac[f]["oracle_bound_s"] for f in xs], "k--", label="oracle bound")
    if all(by_frac[f].get("belady_misses_per_token") is not None for f in xs):
        axes[2].plot([100 * f for f in xs], [by_frac[f]["belady_misses_per_token"] for f in xs], "k--", label="Belady")
    for ax, (_, label, _) in zip(axes, panels):
        ax.set_xlabel("expert cache (% of all experts)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    out = _save(fig, Path(path))
    plt.close(fig)
    return out


# ---- both, from a result -------------------------------------------------------------------------
def plot_result(res: dict, out_dir, max_timelines: int = 6) -> list[Path]:
    """policies.png and one timeline PNG per cell that carries a timeline (at most max_timelines)."""
    out_dir = Path(out_dir)
    cells, title = cells_of(res)
    written = [plot_policies(cells, out_dir / "policies.png", title)]
    timed = [c for c in cells if c.get("timeline")]
    for c in timed[:max_timelines]:
        name = f"timeline_{c['policy']}_{round(100 * c['cache_fraction'])}.png"
        written.append(plot_timeline(c["timeline"], out_dir / name,
                                     f"{c['policy']}, cache {100 * c['cache_fraction']:.0f}%"))
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m efengine.plot", description=__doc__.split("\n")[0])
    p.add_argument("result", help="result JSON of efengine bench --offload or efengine.offload_bench --timed")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the PNG files")
    a = p.parse_args(argv)
    try:
        try:
            res = json.loads(Path(a.result).read_text())
        except OSError as e:
            raise EfError(f"{a.result}: cannot read ({e.strerror})") from None
        except ValueError as e:
            raise EfError(f"{a.result}: not JSON ({e})") from None
        for f in plot_result(res, a.out):
            print(f)
    except EfError as e:
        print(f"efengine.plot: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
