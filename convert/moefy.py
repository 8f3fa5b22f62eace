"""MoE-fication: split each dense SwiGLU FFN into E equal experts and add a router choosing K.

Legend: F dense FFN width, D hidden, E experts, K active, I = F / E expert width, T calibration tokens.

The dense FFN is  y = down @ (silu(gate @ x) * (up @ x)),  a sum over F neurons. Grouping the
neurons into E sets and keeping the rows of gate/up and the columns of down of each set gives E
experts whose outputs add up to y exactly. With moe_weighting "ones" a chosen expert contributes
its exact partial sum, so K = E reproduces the dense model (only summation order differs).

Neurons are grouped by balanced k-means (every expert exactly I neurons) on what the neurons do:
their activation patterns over calibration tokens (neurons that fire together share an expert,
so the few experts a token needs hold most of its activation mass); without calibration data,
on their normalized gate and up rows. The router is linear (E x D, as every MoE router here): a
least-squares fit predicting, from the FFN input x, the norm of each expert's contribution on the
calibration tokens (the weight-only fallback scores an expert by the mean of its gate rows).
docs/demo.md has the measurements that chose these defaults.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, replace

import numpy as np

from efengine.config import ModelConfig
from efengine.errors import ConfigError
from efmodels.base import DENSE, EXPERTS, ROUTER

from . import calibration
from .gguf_convert import PlannedExperts, encode, plan_dense, stored_type
from .gguf_reader import GgufTensor

RIDGE = 1.0          # router fit: ridge relative to the mean eigenvalue of X^T X (docs/demo.md)
SHARED_FRACTION = 0.5   # of the FFN width that stays always on (docs/demo.md)


def default_shared(F: int, E: int) -> int:
    """SHARED_FRACTION of F, rounded so that the rest splits into E equal experts."""
    s = int(round(F * SHARED_FRACTION))
    return s - (s - F) % E if (F - s) % E else s


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def activations(gate: np.ndarray, up: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Neuron activations [T, F] of FFN inputs X [T, D]."""
    return (_silu(X @ gate.T) * (X @ up.T)).astype(np.float32)


def balanced_assign(dist: np.ndarray, size: int) -> np.ndarray:
    """Labels [F] giving each of the E columns exactly `size` rows, greedily by ascending distance.

    dist [F, E]; pairs are taken cheapest first, skipping full clusters and assigned rows.
    """
    F, E = dist.shape
    order = np.argsort(dist, axis=None, kind="stable")
    labels = np.full(F, -1, np.int64)
    room = np.full(E, size, np.int64)
    left = F
    for flat in order:
        i, e = divmod(int(flat), E)
        if labels[i] < 0 and room[e] > 0:
            labels[i] = e
            room[e] -= 1
            left -= 1
            if left == 0:
                break
    return labels


def balanced_kmeans(points: np.ndarray, k: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Labels [F] of k equal clusters of unit-normalized points [F, n] (cosine k-means)."""
    F = points.shape[0]
    if F % k:
        raise ConfigError(f"--moefy {k}: the FFN width {F} is not a multiple of {k}")
    p = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    # k-means++ style seeding: spread the first centroids out
    cent = [p[rng.integers(F)]]
    for _ in range(1, k):
        d = np.min(1.0 - p @ np.stack(cent).T, axis=1).clip(0)
        cent.append(p[rng.choice(F, p=d / d.sum()) if d.sum() > 0 else rng.integers(F)])
    cent = np.stack(cent)
    labels = None
    for _ in range(iters):
        new = balanced_assign(1.0 - p @ cent.T, F // k)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for e in range(k):
            c = p[labels == e].sum(axis=0)
            cent[e] = c / max(np.linalg.norm(c), 1e-12)
    return labels


def groups_of(labels: np.ndarray, k: int) -> np.ndarray:
    """[E, I] neuron indices of each expert, ascending (memory order stays close to the original)."""
    return np.stack([np.flatnonzero(labels == e) for e in range(k)])


def cluster_neurons(gate: np.ndarray, up: np.ndarray, E: int, acts: np.ndarray | None = None,
                    seed: int = 0) -> np.ndarray:
    """[E, I] neuron groups: by co-activation (acts [T, F]) when given, else by weights."""
    if acts is not None:
        feats = np.abs(acts).T                    # [F, T]: when each neuron is active
    else:
        feats = np.concatenate([gate / np.linalg.norm(gate, axis=1, keepdims=True),
                                up / np.linalg.norm(up, axis=1, keepdims=True)], axis=1)
    return groups_of(balanced_kmeans(feats.astype(np.float32), E, seed=seed), E)


def expert_norms(groups: np.ndarray, down: np.ndarray, acts: np.ndarray) -> np.ndarray:
    """[T, E] norm of each expert's output on each calibration token."""
    return np.stack([np.linalg.norm(acts[:, g] @ down[:, g].T, axis=1) for g in groups], axis=1)


def fit_router(groups: np.ndarray, gate: np.ndarray, down: np.ndarray | None = None,
               X: np.ndarray | None = None, acts: np.ndarray | None = None, ridge: float = RIDGE) -> np.ndarray:
    """Router [E, D]: least squares of expert output norms on X [T, D] when calibration data is
    given, else each expert's mean gate row."""
    if X is None:
        return np.stack([gate[g].mean(axis=0) for g in groups]).astype(np.float32)
    target = expert_norms(groups, down, acts)                       # [T, E]
    D = X.shape[1]
    A = X.T.astype(np.float64) @ X + ridge * np.trace(X.T @ X) / D * np.eye(D)
    R = np.linalg.solve(A, X.T.astype(np.float64) @ target)        # [D, E]
    return R.T.astype(np.float32)


# ---- one layer ----------------------------------------------------------------------------------

def split_layer(gate: np.ndarray, up: np.ndarray, down: np.ndarray, X: np.ndarray, E: int, shared: int,
                ridge: float = RIDGE, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shared neurons [S], expert groups [E, I], router [E, D]) of one FFN, from its inputs X [T, D].

    The S neurons carrying the most output on average form an always-on shared expert; the rest
    are clustered by co-activation into E experts; the router predicts each expert's output norm.
    """
    F = gate.shape[0]
    if (F - shared) % E or not 0 <= shared < F:
        raise ConfigError(f"--moefy {E} with {shared} shared neurons: {F - shared} routed neurons do not "
                          f"split into {E} equal experts")
    acts = activations(gate, up, X)
    importance = (np.abs(acts) * np.linalg.norm(down, axis=0)).mean(axis=0)
    shared_ids = np.sort(np.argsort(-importance, kind="stable")[:shared])
    rest = np.setdiff1d(np.arange(F), shared_ids)
    groups = rest[cluster_neurons(gate[rest], up[rest], E, acts[:, rest], seed=seed)]
    router = fit_router(groups, gate, down, X, acts, ridge)
    return shared_ids, groups, router


# ---- the conversion plan --------------------------------------------------------------------------

@dataclass(frozen=True)
class FloatTensor:
    """A tensor computed during conversion (a column subset, a router), stored like its source:
    `nearest` is the (type, group) "native" precision gives it."""
    name: str
    values: np.ndarray
    nearest: tuple

    @property
    def shape(self) -> tuple:
        return tuple(self.values.shape)

    @property
    def data(self) -> np.ndarray:
        return self.values

    def native_type(self):
        return None

    def nearest_type(self) -> tuple:
        return self.nearest

    def float32(self) -> np.ndarray:
        return self.values


def take_rows(t, rows: np.ndarray, name: str):
    """Rows of a weight, exact: GGUF blocks lie along rows, so quantized rows move unchanged."""
    if isinstance(t, GgufTensor) and t.rows is None:
        return GgufTensor(name, t.gtype, (len(rows), t.shape[1]), t.data, np.asarray(rows))
    return FloatTensor(name, np.ascontiguousarray(t.float32()[rows]), t.nearest_type())


def mixed_nearest(t) -> tuple:
    """"native" precision of a column subset of t: its 4-bit groups get mixed, so no q4 grouping
    holds the values exactly and a second 4-bit rounding would add error; q8 adds almost none."""
    qtype, group = t.nearest_type()
    return ("q8", group) if qtype == "q4" else (qtype, group)


class _DenseSource:
    """The dense model being MoE-fied, as a weight source for Model (float32 on demand)."""

    def __init__(self, cfg: ModelConfig, tensors: dict):
        self.config, self.tensors = cfg, tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str) -> np.ndarray:
        return self.tensors[name].float32()


def calibration_sequences(files: dict, vocab: int) -> tuple[list[list[int]], str]:
    """Token ids of the calibration texts (chats through the model's template), or, for a model
    without a tokenizer, fixed pseudo-random ids (a weaker calibration, recorded in the meta)."""
    if not files.get("tokenizer.json"):
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, 128).tolist() for _ in range(8)], "random token ids (no tokenizer)"
    from efengine.chat import ChatTemplate
    from efengine.tokenizer import Tokenizer
    tok = Tokenizer.from_files(files)
    template = ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    seqs = [tok.encode(p) for p in calibration.PARAGRAPHS]
    for user, reply in calibration.CHATS:
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        seqs.append(tok.encode(template.render(msgs, add_generation_prompt=False), add_special=False))
    return seqs, "efconvert/calibration.py (English paragraphs and chats)"


def ffn_inputs(cfg: ModelConfig, tensors: dict, seqs: list[list[int]],
               progress: bool | None) -> list[np.ndarray]:
    """[T, D] inputs of every layer's FFN (after its norm) while the dense model reads seqs."""
    from efengine.model import Model
    model = Model(_DenseSource(cfg, tensors))
    seen: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]
    dense_ffn = model.ffn

    def record(layer, x):
        seen[layer].append(np.array(x, np.float32))
        return dense_ffn(layer, x)
    model.ffn = record
    for ids in _bar(seqs, progress, "moefy: calibration"):
        model.forward(np.asarray(ids), model.new_cache(len(ids)), last_only=True)
    return [np.concatenate(s) for s in seen]


def _bar(items, progress: bool | None, desc: str):
    from tqdm import tqdm
    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(items, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def moefied_config(cfg: ModelConfig, E: int, K: int, shared: int) -> ModelConfig:
    if cfg.arch != "llama" or cfg.is_moe:
        raise ConfigError(f"--moefy applies to dense Llama models; this one is {cfg.arch}"
                          + (" with experts already" if cfg.is_moe else ""))
    if not (isinstance(E, int) and E >= 1 and isinstance(K, int) and 1 <= K <= E):
        raise ConfigError(f"--moefy {E} --top-k {K}: need 1 <= top-k <= experts")
    F = cfg.intermediate_size
    if not 0 <= shared < F or (F - shared) % E:
        raise ConfigError(f"--moefy {E}: the FFN width {F} minus {shared} shared neurons "
                          f"is not a multiple of {E}")
    return replace(cfg, moe_layers=tuple(range(cfg.n_layers)), n_experts=E, top_k=K,
                   moe_intermediate_size=(F - shared) // E, intermediate_size=0, moe_weighting="ones",
                   norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=1 if shared else 0,
                   shared_intermediate_size=shared, shared_expert_gate=False)


def moefy_plan(cfg: ModelConfig, dense_plan: list, prec: dict, group: int, errs, E: int, K: int,
               shared: int | None = None, files: dict | None = None, progress: bool | None = None,
               ridge: float = RIDGE, seed: int = 0):
    """(MoE config, planned dense tensors, PlannedExperts, meta) of a dense Llama split into experts.

    dense_plan: (canonical name, class, tensor) of the dense model; shared: neurons of the
    always-on shared expert (default SHARED_FRACTION of the FFN width, rounded to whole experts).
    """
    F = cfg.intermediate_size
    if shared is None:
        shared = default_shared(F, E)
    new = moefied_config(cfg, E, K, shared)
    tensors = {canon: t for canon, _, t in dense_plan}
    seqs, source = calibration_sequences(files or {}, cfg.vocab_size)
    X = ffn_inputs(cfg, tensors, seqs, progress)
    splits = []
    for l in _bar(range(cfg.n_layers), progress, "moefy: experts"):
        w = {p: tensors[f"blk.{l}.ffn_{p}.weight"].float32() for p in ("gate", "up", "down")}
        splits.append(split_layer(w["gate"], w["up"], w["down"], X[l], E, shared, ridge, seed))
    X = None
    keep = [(c, cls, t) for c, cls, t in dense_plan if not re.search(r"\.ffn_(gate|up|down)\.weight$", c)]
    extra = []
    for l, (sh, _, router) in enumerate(splits):
        extra.append((f"blk.{l}.ffn_gate_inp.weight", ROUTER, FloatTensor("router", router, ("f32", 64))))
        if shared:
            g, u, d = (tensors[f"blk.{l}.ffn_{p}.weight"] for p in ("gate", "up", "down"))
            extra += [(f"blk.{l}.ffn_gate_shexp.weight", DENSE, take_rows(g, sh, "shared gate")),
                      (f"blk.{l}.ffn_up_shexp.weight", DENSE, take_rows(u, sh, "shared up")),
                      (f"blk.{l}.ffn_down_shexp.weight", DENSE,
                       FloatTensor("shared down", np.ascontiguousarray(d.float32()[:, sh]), mixed_nearest(d)))]
    meta = {"experts": E, "top_k": K, "shared_neurons": shared, "ffn_width": F, "weighting": "ones",
            "clustering": "balanced k-means of neuron co-activation",
            "router": f"least squares of expert output norms (ridge {ridge})",
            "calibration": source, "calibration_tokens": int(sum(map(len, seqs)))}
    return new, plan_dense(keep + extra, prec, group, errs), _experts(new, tensors, splits, prec, group, errs), meta


def _experts(cfg: ModelConfig, tensors: dict, splits: list, prec: dict, group: int, errs) -> PlannedExperts:
    """Experts of every layer: gate/up rows copied as stored, down columns gathered and stored."""
    l0 = {p: tensors[f"blk.0.ffn_{p}.weight"] for p in ("gate", "up", "down")}
    g0 = splits[0][1][0]
    zeros = np.zeros((cfg.hidden_size, len(g0)), np.float32)
    sample = {"gate": take_rows(l0["gate"], g0, "gate"), "up": take_rows(l0["up"], g0, "up"),
              "down": FloatTensor("down", zeros, mixed_nearest(l0["down"]))}
    specs = {}
    for p, t in sample.items():
        qtype, grp = stored_type(t, prec[EXPERTS], group)
        specs[p] = (qtype, t.shape, grp)
    cache: dict = {}

    def produce(i: int, e: int) -> dict:
        if cache.get("layer") != i:      # dequantize each layer's down once, as its experts go by
            cache.update(layer=i, down=tensors[f"blk.{i}.ffn_down.weight"].float32())
        ids = splits[i][1][e]
        parts = {"gate": take_rows(tensors[f"blk.{i}.ffn_gate.weight"], ids, f"blk.{i} expert {e} gate"),
                 "up": take_rows(tensors[f"blk.{i}.ffn_up.weight"], ids, f"blk.{i} expert {e} up"),
                 "down": FloatTensor(f"blk.{i} expert {e} down", np.ascontiguousarray(cache["down"][:, ids]),
                                     sample["down"].nearest)}
        return {p: encode(t, specs[p][0], specs[p][2], EXPERTS, errs) for p, t in parts.items()}
    src = sum(int(tensors[f"blk.{l}.ffn_{p}.weight"].data.nbytes)
              for l in range(cfg.n_layers) for p in ("gate", "up", "down"))
    return PlannedExperts(tuple(cfg.moe_layers), cfg.n_experts, specs, produce, src)
