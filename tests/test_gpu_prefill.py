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
