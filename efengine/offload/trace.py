"""Routing traces: which experts each decoded token used at each layer, recorded from a real model.

A trace file is JSON lines, one object per (token, layer):
  {"problem_id": 0, "layer": 3, "experts": [7, 0], "gating_probs": [0.8, 0.2], "token_idx": 5}
(`token_pos` instead of `token_idx` in some files). Records of one forward call come layer-major
(all tokens of layer 0, then layer 1, ...), so a call ends where the layer number goes down or the
problem changes; a token is (call, position). Tokens that lack some layer are skipped: the last
token of a request is often cut short.

Shapes: N tokens, L layers, A active experts per token (top-k).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FormatError


def _trace_dir() -> Path:
    """Where short trace names resolve: $EFENGINE_TRACES, else the project's `shared/data/traces`
    beside the checkout (as developers and CI have it), else beside the current folder."""
    env = os.environ.get("EFENGINE_TRACES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]            # the checkout holding efengine/
    for cand in (here.parent / "shared" / "data" / "traces", here / "shared" / "data" / "traces",
                 Path.cwd().parent / "shared" / "data" / "traces"):
        if cand.is_dir():
            return cand
    return here.parent / "shared" / "data" / "traces"


TRACE_DIR = _trace_dir()


@dataclass(frozen=True)
class Trace:
    """Routing of N decoded tokens in execution order."""
    name: str
    experts: np.ndarray      # [N, L, A] int32, expert ids in the router's rank order
    probs: np.ndarray        # [N, L, A] float32, gating probabilities of those experts
    n_experts: int           # E: at least max id + 1 (the model's count when validated)
    skipped: int = 0         # tokens dropped for lacking layers

    @property
    def n_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def validate(self, n_layers: int, n_experts: int, top_k: int | None = None) -> "Trace":
        """Check this trace fits a model with n_layers MoE layers of n_experts experts (and top_k)."""
        problems = []
        if self.n_layers != n_layers:
            problems.append(f"{self.n_layers} MoE layers, the model has {n_layers}")
        if int(self.experts.max(initial=0)) >= n_experts:
            problems.append(f"expert id {int(self.experts.max())}, the model has {n_experts} experts per layer")
        if top_k is not None and self.top_k != top_k:
            problems.append(f"top-{self.top_k} routing, the model routes top-{top_k}")
        if problems:
            raise ConfigError(f"route trace {self.name}: does not fit the model: " + "; ".join(problems))
        return Trace(self.name, self.experts, self.probs, n_experts, self.skipped)

    def head(self, n: int) -> "Trace":
        return Trace(self.name, self.experts[:n], self.probs[:n], self.n_experts, self.skipped)


def resolve(name_or_path: str | Path) -> Path:
    """A trace path, or a short name like 'gsm8k_2' looked up in the shared trace folder."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for cand in (TRACE_DIR / f"{name_or_path}_routing.jsonl", TRACE_DIR / f"{name_or_path}.jsonl",
                 TRACE_DIR / str(name_or_path)):
        if cand.exists():
            return cand
    raise ConfigError(f"route trace {name_or_path!r}: no such file (looked in the current folder and {TRACE_DIR})")


def _records(path: Path):
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise FormatError(f"{path}: cannot read route trace ({e.strerror})") from None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            pos = r["token_idx"] if "token_idx" in r else r["token_pos"]
            yield (int(r.get("problem_id", 0)), int(r["layer"]), int(pos),
                   [int(e) for e in r["experts"]], [float(p) for p in r.get("gating_probs") or []])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}:{no}: not a routing record ({type(e).__name__}: {e}); expected "
                              "layer, experts, gating_probs and token_idx or token_pos") from None


def load(name_or_path: str | Path) -> Trace:
    """Read a JSON-lines routing trace into arrays (tokens in execution order, full tokens only)."""
    path = resolve(name_or_path)
    tokens: dict[tuple[int, int], dict[int, tuple[list, list]]] = {}
    call, prev = -1, None
    k_seen = set()
    for problem, layer, pos, experts, probs in _records(path):
        if layer < 0 or min(experts, default=0) < 0:
            raise FormatError(f"{path}: negative layer or expert id (layer {layer}, experts {experts})")
        if prev is None or problem != prev[0] or layer < prev[1]:
            call += 1
        prev = (problem, layer)
        if len(probs) != len(experts):
            probs = [1.0 / len(experts)] * len(experts)
        tokens.setdefault((call, pos), {})[layer] = (experts, probs)
        k_seen.add(len(experts))
    if not tokens:
        raise FormatError(f"{path}: empty route trace")
    if len(k_seen) != 1:
        raise FormatError(f"{path}: records route to different numbers of experts {sorted(k_seen)}")
    n_layers = 1 + max(max(t) for t in tokens.values())
    full = [tokens[k] for k in sorted(tokens) if len(tokens[k]) == n_layers]
    if not full:
        raise FormatError(f"{path}: no token has all {n_layers} layers")
    experts = np.array([[t[l][0] for l in range(n_layers)] for t in full], dtype=np.int32)
    probs = np.array([[t[l][1] for l in range(n_layers)] for t in full], dtype=np.float32)
    name = path.name.removesuffix(".jsonl").removesuffix("_routing")
    return Trace(name, experts, probs, int(experts.max()) + 1, skipped=len(tokens) - len(full))


def access_sequence(trace: Trace) -> np.ndarray:
    """The per-step expert sets in execution order: [N*L, A] global ids layer*E + expert."""
    n, l, a = trace.experts.shape
    ids = trace.experts.astype(np.int64) + (np.arange(l, dtype=np.int64) * trace.n_experts)[None, :, None]
    return ids.reshape(n * l, a)
