"""Shared pieces of the GPU tests (imported by files whose tests are marked `gpu`; CuPy and the
GPU modules are imported on call, so collecting them on a machine without a GPU works)."""
from __future__ import annotations

import numpy as np

from efengine import quant


def random_pool(rng, D: int, I: int, n_layers: int, E: int, slots: int, gtype: str, dtype: str, group: int):
    """An ExpertPool of `slots` random experts (gate / up [I, D] in gtype, down [D, I] in dtype)
    -> (pool, host bytes [slots, blob], layout)."""
    import cupy as cp
    from efengine.format import expert_layout
    from efengine.ops.gpu_weights import ExpertLayout, ExpertPool
    lay, nb = expert_layout({"gate": (gtype, (I, D), group), "up": (gtype, (I, D), group),
                             "down": (dtype, (D, I), group)})
    host = np.zeros((slots, nb), np.uint8)
    for s in range(slots):
        for t in lay.values():
            host[s, t.offset:t.offset + t.nbytes] = quant.quantize(
                rng.standard_normal(t.shape) * t.shape[1] ** -0.5, t.type, t.group)
    pool = ExpertPool(ExpertLayout(lay, nb), slots, n_layers, E)
    pool.data[...] = cp.asarray(host)
    return pool, host, lay


def assert_replay_matches_eager(g, tok: int, pos: int) -> None:
    """A DecodeGraph's step launched eagerly and replayed from its graph give the same logits bit
    for bit (the graph is left one step further, at the replayed step)."""
    import cupy as cp
    g.start(tok, pos)
    g.step_eager()
    g.stream.synchronize()
    eager = cp.asnumpy(g.logits)
    g.start(tok, pos)
    g.replay(1)
    g.stream.synchronize()
    np.testing.assert_array_equal(cp.asnumpy(g.logits), eager)


def forward_following_ties(ref, gpu, tokens, ref_cache, gpu_cache, rel_gap: float = 1e-2):
    """One forward of the same tokens on the GPU model, then on the reference -> (ref logits, GPU
    logits, tokens switched). Where the GPU chose other experts for a token than the reference
    would, and only across a near tie (the GPU's extra experts' router logits within rel_gap of the
    token's largest |logit| below the reference's k-th), the reference takes the GPU's choice (its
    weights recomputed by the reference's routing rules). Why: fp16 GEMM operands move router logits
    by ~1e-3 of their scale, enough to flip such a tie, after which that token's output (and
    attention through it) differs entirely. A choice that differs by more stays the reference's own,
    so a real mismatch still fails the comparison."""
    import cupy as cp
    from efengine import routing
    cfg, rec, switched = ref.cfg, [], []

    def record(layer, logits, ids, w):
        rec.append(cp.asnumpy(ids))
        return ids, w

    def follow(layer, logits, ids, w):
        g, z, ids = rec.pop(0), np.asarray(logits, np.float32), np.array(ids, np.int32)
        for t in np.flatnonzero((np.sort(ids, 1) != np.sort(g, 1)).any(1)):
            extra = np.setdiff1d(g[t], ids[t])
            if z[t, ids[t]].min() - z[t, extra].min() <= rel_gap * np.abs(z[t]).max():
                ids[t] = g[t]
                switched.append((layer, int(t)))
        p = routing.group_mask(routing.router_probs(z), cfg)
        return ids, routing.topk_weights(p, ids, cfg)

    gpu.route_hook, ref.route_hook = record, follow
    try:
        lg = gpu.forward(tokens, gpu_cache)
        lr = ref.forward(tokens, ref_cache)
    finally:
        gpu.route_hook = ref.route_hook = None
    return lr, lg, switched


def rows_prep_case(rng, act: str = "f16", R: int = 3, K: int = 333, A: int = 2, KX: int = 384):
    """rows_prep on random rows with every input it takes (A expert buffers, a gated second add,
    norm weights), output buffers pre-filled with NaN / 0xFFFF -> dict: h (host input), hd (its
    device copy after the call), hout, x32, prep (device outputs), href, xref (gpu_ref's)."""
    import cupy as cp
    from efengine.ops import gpu_ops as ops
    from efengine.ops import gpu_ref
    h = rng.standard_normal((R, K)).astype(np.float32)
    yb = rng.standard_normal((R, A, K)).astype(np.float32)
    a2 = rng.standard_normal((R, K)).astype(np.float32)
    g = rng.standard_normal(R).astype(np.float32)
    nw = rng.uniform(0.5, 1.5, K).astype(np.float32)
    hd = cp.asarray(h)
    hout = cp.full((R, K), np.nan, dtype=cp.float32)
    x32 = cp.full((R, K), np.nan, dtype=cp.float32)
    prep = ops.XPrep(R, K, KX, act)
    prep.xh.fill(0xFFFF)
    ops.rows_prep(hd, K, ybuf=cp.asarray(yb), A=A, add2=cp.asarray(a2), add2_gate=cp.asarray(g),
                  nw=cp.asarray(nw), eps=1e-5, x32=x32, prep=prep, hout=hout)
    href, xref = gpu_ref.rows_prep_ref(h, yb, a2, g, nw, 1e-5)
    return dict(h=h, hd=hd, hout=hout, x32=x32, prep=prep, href=href, xref=xref)
