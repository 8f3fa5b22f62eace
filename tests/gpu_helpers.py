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
