"""Bookkeeping of `efengine bench --offload` (O1) on numpy with a tiny model: trace replay through
the route hook, the blob-backed host store, the timed replay driver, Belady / LRU miss counts
and the bounds. The GPU run itself is the bench."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine.errors import ConfigError  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.offload import OffloadRuntime  # noqa: E402
from efengine.offload.cache import LRU  # noqa: E402
from efengine.offload.prefetch import ImmediateEngine  # noqa: E402
from efengine.offload.trace import Trace  # noqa: E402
from efengine import offload_gpu_bench as ob  # noqa: E402


def make_trace(n, L, E, A, seed=0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.array([[rng.choice(E, A, replace=False) for _ in range(L)] for _ in range(n)], dtype=np.int32)
    p = rng.uniform(0.1, 1.0, (n, L, A)).astype(np.float32)
    return Trace("synthetic", ids, p / p.sum(-1, keepdims=True), E)


@pytest.fixture(scope="module")
def setup(tiny_ef):
    ef = EfFile(tiny_ef("mixtral", experts="q4"))
    cfg = ef.config
    trace = ob.fit_trace(make_trace(14, len(cfg.moe_layers) + 1, cfg.n_experts, cfg.top_k), cfg)
    return ef, trace


def test_fit_trace_cuts_and_validates(setup):
    ef, trace = setup
    assert trace.n_layers == len(ef.config.moe_layers)
    with pytest.raises(ConfigError, match="layers"):
        ob.fit_trace(trace.head(3).__class__("t", trace.experts[:, :1], trace.probs[:, :1], 4), ef.config)


def test_replay_follows_the_trace_and_counts_like_the_simulator(setup):
    ef, trace = setup
    warm, tokens = 4, 10
    seen = []
    ref_model = Model(ef, "numpy")
    router = ob.TraceRouter(trace, ref_model.backend, ef.config.moe_layers)

    def spy(layer, logits, ids, w):
        out = router(layer, logits, ids, w)
        seen.append((router.t, layer, tuple(np.asarray(out[0])[0])))
        return out
    ref_model.route_hook = spy
    ob.replay(ref_model, router, warm, tokens)
    for t, layer, ids in seen:
        assert ids == tuple(trace.experts[t, ef.config.moe_layers.index(layer)])
    # offloaded, every blob exact: lossless against the resident replay, misses as the LRU simulator
    cfg = ef.config
    slots = 3
    store = ob.BlobStore(ef, ob.exact_blobs(ef))
    rt = OffloadRuntime(ef, "numpy", policy="ondemand", slots=slots, store=store, engine=ImmediateEngine())
    model = Model(ef, "numpy", experts=rt)
    r2 = ob.TraceRouter(trace, model.backend, cfg.moe_layers)
    model.route_hook = r2
    got = ob.replay(model, r2, warm, tokens, rt=rt)
    timed, warm_m = ob.demand_misses(trace, slots, LRU(), warm)
    assert got["misses"] == timed > 0 and got["tokens"] == tokens
    assert got["bytes_copied"] == timed * store.blob_nbytes
    bel = ob.belady_misses(trace, slots, warm)
    assert bel <= timed
    # the same logits as the resident model under the same routing
    cache_a, cache_b = ref_model.new_cache(8), model.new_cache(8)
    router.t = r2.t = 2
    np.testing.assert_array_equal(ref_model.forward(np.array([3]), cache_a), model.forward(np.array([3]), cache_b))


def test_blob_store_aliases_and_checks_sizes(setup):
    ef, _ = setup
    blobs = ob.exact_blobs(ef)[:3]
    st = ob.BlobStore(ef, blobs)
    assert st.blob(0, 0) is blobs[0] and st.blob(1, 0) is blobs[(st.E) % 3]
    with pytest.raises(ConfigError):
        ob.BlobStore(ef, [np.zeros(7, dtype=np.uint8)])


def test_bounds():
    r = {"time_per_token_s": 0.1, "misses_per_token": 10}
    b = ob.bounds(r, blob_bytes=50, h2d_Bps=10_000, resident_s=0.02, belady_per_tok=4, resident_graph_s=0.01)
    assert b["oracle_bound_s"] == pytest.approx(0.02)          # 4 * 0.005 = 0.02 = resident
    assert b["ondemand_efficiency"] == pytest.approx((10 * 0.005 + 0.02) / 0.1)
    assert b["ondemand_efficiency_vs_graph"] == pytest.approx((10 * 0.005 + 0.01) / 0.1)
    assert b["tokens_per_s"] == pytest.approx(10)
