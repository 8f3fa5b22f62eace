"""Grouped MoE prefill (efengine/ops/gpu_prefill.py, kernels/moe_gemm.cu) and Model._moe's grouped path.

CPU: the routing plan, the numpy twin against NumpyBackend's per-expert loop, and Model._moe's
grouped branch (through a numpy backend that has moe_prefill) giving the same bits as the loop,
with the provider errors and the defer_use protocol. GPU (marked `gpu`): the kernels against the
numpy twin on fresh random experts (shapes that are not multiples of the tiles, an expert with no
token, one with a single token, several weight types and groups), tolerance set by fp16 operands.
"""
from __future__ import annotations


import numpy as np
import pytest

from efengine import quant
from efengine.errors import EfError
from efengine.experts import ExpertProvider, ResidentExperts
from efengine.ops import gpu_prefill
from efengine.ops.numpy_backend import NumpyBackend

NB = NumpyBackend()
TOL_MM = 1e-2        # relative RMS: fp16 x, fp16 weights and fp16 h, fp32 accumulation


from gpu_check import HAVE_GPU
gpu = pytest.mark.gpu


# ---- CPU ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bm", [1, 3, 64])
def test_plan_covers_every_pair_once(rng, bm):
    T, A, E = 37, 3, 9
    ids = np.stack([rng.permutation(E - 1)[:A] for _ in range(T)]).astype(np.int32)   # expert E-1: none
    order, experts, tiles = gpu_prefill.plan(ids, bm)
    flat = ids.reshape(-1)
    assert sorted(order.tolist()) == list(range(T * A))
    assert np.all(np.diff(flat[order]) >= 0)                       # sorted by expert
    assert (E - 1) not in experts.tolist()
    seen = np.zeros(T * A, dtype=int)
    for ei, p0, n, _ in tiles.tolist():
        assert 1 <= n <= bm
        assert np.all(flat[order[p0:p0 + n]] == experts[ei])     # a tile holds one expert's pairs
        seen[p0:p0 + n] += 1
    assert np.all(seen == 1)


def _experts(rng, E, D, I):
    return {e: {p: rng.standard_normal(s).astype(np.float32) / np.sqrt(s[1])
                for p, s in (("gate", (I, D)), ("up", (I, D)), ("down", (D, I)))} for e in range(E)}


def test_reference_is_the_per_expert_loop(rng):
    T, A, E, D, I = 20, 2, 5, 24, 40
    w = _experts(rng, E, D, I)
    ids = np.stack([rng.permutation(E)[:A] for _ in range(T)]).astype(np.int32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    ref = gpu_prefill.reference(x, ids, w)
    for t in range(T):
        for a in range(A):
            h = NB.load_expert(_WSource(w), 0, int(ids[t, a]))
            np.testing.assert_allclose(ref[t * A + a], NB.expert_ffn(x[t:t + 1], h)[0], rtol=1e-4, atol=1e-5)


class _WSource:
    def __init__(self, w):
        self.w = w

    def expert_weights(self, layer, e):
        return self.w[e]


class GroupedNumpy(NumpyBackend):
    """NumpyBackend with a moe_prefill (per expert, same arithmetic as the loop): drives Model._moe's
    grouped branch on the CPU."""
    MOE_PREFILL_MIN_T = 2

    def __init__(self):
        self.calls = 0
        self.experts_per_call = []

    def moe_prefill(self, x, ids, handles):
        self.calls += 1
        self.experts_per_call.append(len(handles))
        A = ids.shape[1]
        order, experts, tiles = gpu_prefill.plan(ids, bm=ids.size)
        y = np.empty((ids.size, x.shape[1]), dtype=np.float32)
        for ei, p0, n, _ in tiles.tolist():
            slots = order[p0:p0 + n]
            y[slots] = self.expert_ffn(x[slots // A], handles[int(experts[ei])])
        return y


class _Deferring(ResidentExperts):
    """A provider with the offload runtime's defer_use / engine.fence protocol (records calls)."""

    def __init__(self, source, backend, n_slots):
        super().__init__(source, backend)
        self.defer_use, self.n_slots, self.fenced, self.engine = None, n_slots, [], self

    def begin_layer(self, layer, ids):
        for e, h in super().begin_layer(layer, ids):
            yield e, h
            if self.defer_use is not None:
                self.defer_use.append((layer, e))

    def fence(self, slot):
        assert self.defer_use is None          # fenced after the launch, defer mode over
        self.fenced.append(slot)


def _model(tiny_ef, backend, experts=None):
    from efengine.format import EfFile
    from efengine.model import Model
    src = EfFile(tiny_ef("qwen2_moe"))
    return Model(src, backend, experts=experts(src) if experts else None)


def test_model_grouped_branch_same_bits(tiny_ef):
    prompt = np.arange(1, 14) % 100
    ref = _model(tiny_ef, "numpy")
    g = GroupedNumpy()
    m = _model(tiny_ef, g)
    a = ref.forward(prompt, ref.new_cache(32))
    c = m.new_cache(32)
    b = m.forward(prompt, c)
    assert g.calls == sum(m.cfg.is_moe_layer(l) for l in range(m.cfg.n_layers))
    np.testing.assert_array_equal(a, b)
    m.forward([5], c)                      # one token: the loop, not moe_prefill
    assert g.calls == sum(m.cfg.is_moe_layer(l) for l in range(m.cfg.n_layers))


def test_model_grouped_defer_use(tiny_ef):
    g = GroupedNumpy()
    m = _model(tiny_ef, g, lambda s: _Deferring(s, g, n_slots=64))
    m.forward(np.arange(1, 14) % 100, m.new_cache(32))
    assert g.calls > 0 and m.experts.fenced and m.experts.defer_use is None
    g2 = GroupedNumpy()
    m2 = _model(tiny_ef, g2, lambda s: _Deferring(s, g2, n_slots=1))   # cannot pin a layer: loop
    prompt = np.arange(1, 14) % 100
    b = m2.forward(prompt, m2.new_cache(32))
    # one expert a call (the same kernels as the grouped launch, so the same bits), nothing fenced
    assert g2.calls > 0 and set(g2.experts_per_call) == {1} and not m2.experts.fenced
    a = _model(tiny_ef, "numpy")
    np.testing.assert_array_equal(a.forward(prompt, a.new_cache(32)), b)


class _Bad(ExpertProvider):
    def __init__(self, inner, mode):
        self.inner, self.mode = inner, mode

    def begin_layer(self, layer, ids):
        got = list(self.inner.begin_layer(layer, ids))
        if self.mode == "missing":
            got = got[1:]
        else:
            got = got + got[:1]
        yield from got


@pytest.mark.parametrize("mode,msg", [("missing", "did not provide"), ("twice", "unexpectedly")])
def test_model_grouped_provider_errors(tiny_ef, mode, msg):
    g = GroupedNumpy()
    m = _model(tiny_ef, g, lambda s: _Bad(ResidentExperts(s, g), mode))
    with pytest.raises(EfError, match=msg):
        m.forward(np.arange(1, 14) % 100, m.new_cache(32))


# ---- GPU ---------------------------------------------------------------------------------------

@gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("case", gpu_prefill.CHECKS, ids=lambda c: "-".join(map(str, c)))
def test_grouped_kernels_match_numpy(rng, case):
    r = gpu_prefill.check_case(rng, *case)
    print(r)
    assert r["grouped"] and r["finite"]
    assert r["rel_rms"] < TOL_MM
    assert r["max_rel"] < 3 * TOL_MM
    assert r["device_plan_equal"]          # moe_prefill_device: the same bits as the host plan
    assert r["tile_rows_equal"]            # 128 / 256-row tiles (8 / 16 warps): the same bits as 64-row ones


@gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("T,A,E,bm", [(1, 2, 8, 64), (300, 4, 60, 64), (70, 6, 64, 64), (400, 2, 8, 128)])
def test_device_plan_groups_every_pair_once(rng, T, A, E, bm):
    """mg_plan: tables as plan() makes them, up to the order of pairs within an expert."""
    import cupy as cp
    from efengine.ops.gpu_kernels import i32, launch
    ids = np.stack([rng.permutation(E - 3)[:A] for _ in range(T)]).astype(np.int32)   # 3 experts unused
    P = T * A
    n_max = -(-P // bm) + E
    tabs = cp.full(2 * P + 4 * n_max, -7, dtype=cp.int32)
    launch(gpu_prefill.MODULE, "mg_plan", (1,), (1024,), (cp.asarray(ids), i32(P), i32(A), i32(E), i32(bm),
           tabs[:P], tabs[P:2 * P], tabs[2 * P:], i32(n_max)), shared=8 * E)
    t = cp.asnumpy(tabs)
    arow, slot, tiles = t[:P], t[P:2 * P], t[2 * P:].reshape(n_max, 4)
    flat = ids.reshape(-1)
    assert sorted(slot.tolist()) == list(range(P)) and np.array_equal(arow, slot // A)
    assert np.all(np.diff(flat[slot]) >= 0)                         # grouped in expert order
    _, _, host_tiles = gpu_prefill.plan(ids, bm)
    used = tiles[tiles[:, 2] > 0]
    np.testing.assert_array_equal(used[:, 1:], host_tiles[:, 1:])   # same tiles (expert index = id here)
    np.testing.assert_array_equal(used[:, 0], np.unique(flat)[host_tiles[:, 0]])
    assert np.all(tiles[len(used):] == 0)                           # spare tiles are empty


@gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
def test_model_prefill_groups_on_device_same_bits():
    """A resident pool: Model._moe groups a prefill on the device (no host round trip) and gets the
    very bits of the host-grouped path (a provider that does not offer layer_handles)."""
    from efengine.model import Model
    from efengine.ops.gpu_synth import DeviceRandomSource
    from efengine.ops.gpu_weights import PoolExperts
    from test_gpu_model import cfg_of

    class HostGrouped(PoolExperts):
        def layer_handles(self, layer):
            return None

    src = DeviceRandomSource(cfg_of("qwen"), experts="q4", dense="q8", group=32, seed=3)
    pool = src.pool()
    dev, host = Model(src, "cupy", experts=PoolExperts(pool)), Model(src, "cupy", experts=HostGrouped(pool))
    calls = []
    run = dev.backend.moe_prefill_device
    dev.backend.moe_prefill_device = lambda *a: calls.append(1) or run(*a)
    prompt = np.random.default_rng(0).integers(0, src.config.vocab_size, 40)
    a, b = dev.forward(prompt, dev.new_cache(64)), host.forward(prompt, host.new_cache(64))
    assert len(calls) == 2                                          # both MoE layers
    np.testing.assert_array_equal(a, b)


@gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
def test_grouped_is_deterministic_and_backend_falls_back(rng):
    import cupy as cp
    from efengine.ops.cupy_backend import CupyBackend
    from efengine.ops.gpu_weights import ExpertHandle
    B = CupyBackend()
    T, A, E, D, I = 45, 2, 4, 72, 100
    ids = np.stack([rng.permutation(E)[:A] for _ in range(T)]).astype(np.int32)
    x = cp.asarray(rng.standard_normal((T, D)).astype(np.float32))
    for qtype, grouped in (("q4", True), ("f16", False)):          # f16 rows of 100: not 16-byte chunks
        lay, blobs, w = gpu_prefill.random_experts(rng, E, D, I, qtype, 32)
        dev = cp.asarray(blobs)
        hs = {e: ExpertHandle(int(dev[e].data.ptr), lay, dev) for e in range(E)}
        assert gpu_prefill.grouped_ok(hs) == grouped
        y1 = cp.asnumpy(B.moe_prefill(x, ids, hs))
        y2 = cp.asnumpy(B.moe_prefill(x, ids, dict(reversed(list(hs.items())))))
        np.testing.assert_array_equal(y1, y2)
        assert quant.rel_rms(gpu_prefill.reference(cp.asnumpy(x), ids, w), y1) < TOL_MM
