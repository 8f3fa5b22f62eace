"""CUDA kernels of the cupy backend against their numpy twins (NumpyBackend, gpu_ref, quant).

GPU tests are marked `gpu` and skipped where CuPy or a CUDA device is missing; the twins
themselves are checked on the CPU. Inputs are fresh random draws each run (the seed is printed,
pytest shows it on failure); outputs are poisoned with NaN first where the kernel writes into a
given buffer, so an unwritten element fails. Tolerances are relative RMS errors set by the
arithmetic: float32 paths ~1e-6, fp16 activations with fp32 accumulation ~1e-3.
"""
from __future__ import annotations


import numpy as np
import pytest

from efengine import quant
from efengine.config import ModelConfig
from efengine.format import expert_layout
from efengine.ops import gpu_ref
from efengine.ops.numpy_backend import NumpyBackend


from gpu_check import HAVE_GPU, gpu, rel
from gpu_helpers import random_pool, rows_prep_case  # noqa: E402


if HAVE_GPU:
    import cupy as cp
    from efengine.ops import gpu_ops as ops
    from efengine.ops.cupy_backend import CupyBackend
    from efengine.ops.gpu_weights import ExpertHandle, GpuWeight

NB = NumpyBackend()
TOL_Q = 3e-3      # fp16 activations, fp16 partial sums of 8 products, fp32 accumulation
TOL_MM = 1e-2     # fp16 GEMM operands (prefill)
TOL_F32 = 2e-5


def stored(rng, qtype, shape, group):
    """Random weights -> (stored bytes, their exact float values)."""
    w = rng.standard_normal(shape).astype(np.float32) * 0.05
    buf = quant.quantize(w, qtype, group)
    return buf, quant.dequantize(buf, qtype, shape, group)


# ---- the twins, on the CPU ---------------------------------------------------------------------

def test_prep_ref_round_trip(rng):
    x = rng.standard_normal((3, 100)).astype(np.float32) * np.array([[1e-3], [1.0], [300.0]], np.float32)
    xh, xs, xc = gpu_ref.prep_ref(x, 128)
    back = gpu_ref.unprep_ref(xh, xc)
    assert np.all(back[:, 100:] == 0)
    assert rel(x, back[:, :100]) < 1e-3
    scaled = np.abs(gpu_ref.unprep_ref(xh, np.ones_like(xc))).reshape(3, 4, 32).max(axis=2)
    assert np.all((scaled[:, :3] >= 8) & (scaled[:, :3] < 16))     # every nonzero chunk in [8, 16)
    np.testing.assert_allclose(xs, gpu_ref.unprep_ref(xh, np.ones_like(xc)).reshape(3, 4, 32).sum(2), rtol=1e-6)


def test_moe_slots_ref_equals_numpy_backend(rng):
    D, I, E = 64, 96, 5
    lay, nb = expert_layout({"gate": ("q4", (I, D), 32), "up": ("q4", (I, D), 32), "down": ("q8", (D, I), 32)})
    pool = np.zeros((E, nb), np.uint8)
    for s in range(E):
        for p, t in lay.items():
            pool[s, t.offset:t.offset + t.nbytes] = quant.quantize(rng.standard_normal(t.shape) * 0.1, t.type, t.group)
    table = np.array([2, -1, 0, 4, 1])
    x = rng.standard_normal((2, D)).astype(np.float32)
    ids = np.array([[0, 3], [4, 2]])
    rw = rng.uniform(0, 1, (2, 2)).astype(np.float32)
    y, err = gpu_ref.moe_slots_ref(x, ids, rw, table, pool, lay)
    assert not err
    w = gpu_ref.blob_weights(pool[table[3]], lay)
    ref = NB.expert_ffn(x[:1], NB.load_expert(_Blob(w), 0, 0))[0] * rw[0, 1]
    assert rel(ref, y[1]) < 1e-5
    _, err = gpu_ref.moe_slots_ref(x, np.array([[1, 0]]), None, table, pool, lay)
    assert err


class _Blob:
    def __init__(self, w):
        self.w = w

    def expert_weights(self, layer, e):
        return self.w


# ---- dense GEMV and the prefill GEMM ------------------------------------------------------------

SHAPES = [((37, 200), 32), ((300, 1000), 64), ((70, 4096), 128), ((5, 24), 32)]


@gpu
@pytest.mark.parametrize("qtype", ["q4", "q8", "f16", "bf16", "f32"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_gemv(rng, qtype, T):
    for (N, K), group in SHAPES:
        buf, wf = stored(rng, qtype, (N, K), group)
        W = GpuWeight(qtype, (N, K), group, cp.asarray(buf))
        x = (rng.standard_normal((T, K)) * rng.uniform(0.1, 30)).astype(np.float32)
        xd = cp.asarray(x)
        y = cp.full((T, N), np.nan, dtype=cp.float32)
        prep = None
        if W.quantized:
            prep = ops.XPrep(T, K, W.Kp)
            ops.rows_prep(xd, K, prep=prep)
        for t0, n in ops.token_chunks(T):
            desc = ops.gemv_desc([(W, y[t0:t0 + n], None, False)])
            ops.gemv_launch(desc, [W], n, xd[t0:t0 + n], prep and prep.rows(t0, t0 + n))
        ref = x.astype(np.float64) @ wf.T.astype(np.float64)
        err = rel(ref, cp.asnumpy(y))
        assert err < (TOL_Q if W.quantized else TOL_F32), (qtype, N, K, group, T, err)


@gpu
def test_gemv_multi_matrix_bias_and_accumulate(rng):
    K = 256
    ws = [stored(rng, "q4", (n, K), 64) for n in (48, 16, 16)]
    Ws = [GpuWeight("q4", b[1].shape, 64, cp.asarray(b[0])) for b in ws]
    x = rng.standard_normal((1, K)).astype(np.float32)
    xd = cp.asarray(x)
    prep = ops.XPrep(1, K, 256)
    ops.rows_prep(xd, K, prep=prep)
    bias = rng.standard_normal(48).astype(np.float32)
    base = rng.standard_normal((1, 16)).astype(np.float32)
    ys = [cp.full((1, 48), np.nan, dtype=cp.float32), cp.asarray(base), cp.full((1, 16), np.nan, dtype=cp.float32)]
    desc = ops.gemv_desc([(Ws[0], ys[0], cp.asarray(bias), False), (Ws[1], ys[1], None, True),
                          (Ws[2], ys[2], None, False)])
    ops.gemv_launch(desc, Ws, 1, None, prep)
    refs = [x @ w[1].T for w in ws]
    assert rel(refs[0] + bias, cp.asnumpy(ys[0])) < TOL_Q
    assert rel(base + refs[1], cp.asnumpy(ys[1])) < TOL_Q
    assert rel(refs[2], cp.asnumpy(ys[2])) < TOL_Q


@gpu
@pytest.mark.parametrize("qtype", ["q4", "q8", "f16", "bf16"])
def test_linear_prefill_path(rng, qtype):
    B = CupyBackend()
    buf, wf = stored(rng, qtype, (300, 520), 64)
    W = GpuWeight(qtype, (300, 520), 64, cp.asarray(buf))
    x = rng.standard_normal((40, 520)).astype(np.float32) * 5
    y = cp.asnumpy(B.linear(cp.asarray(x), W))
    assert rel(x.astype(np.float64) @ wf.T, y) < TOL_MM
    w16 = cp.asnumpy(W.f16())
    np.testing.assert_array_equal(w16, gpu_ref.dequant_f16_ref(buf, qtype, (300, 520), 64))


@gpu
def test_odd_group_widened_to_f16(rng):
    from efengine.ops.gpu_weights import make_weight
    buf, wf = stored(rng, "q4", (20, 100), 50)
    W = make_weight("q4", (20, 100), 50, cp.asarray(buf))
    assert W.qtype == "f16"
    x = rng.standard_normal((2, 100)).astype(np.float32)
    assert rel(x @ wf.T, cp.asnumpy(CupyBackend().linear(cp.asarray(x), W))) < TOL_Q


# ---- rows_prep: residual update, RMSNorm, xprep --------------------------------------------------

@gpu
def test_rows_prep(rng):
    c = rows_prep_case(rng)
    h, hd, prep, x32, KX = c["h"], c["hd"], c["prep"], c["x32"], c["prep"].KX
    assert rel(c["href"], cp.asnumpy(c["hout"])) < 1e-6
    np.testing.assert_array_equal(cp.asnumpy(hd), h)          # the input is not written
    assert rel(c["xref"], cp.asnumpy(x32)) < 1e-6
    xh, xs, xc = gpu_ref.prep_ref(cp.asnumpy(x32), KX)
    np.testing.assert_array_equal(cp.asnumpy(prep.xh).view(np.float16), xh)
    np.testing.assert_array_equal(cp.asnumpy(prep.xc), xc)
    np.testing.assert_allclose(cp.asnumpy(prep.xs), xs, rtol=1e-5, atol=1e-5)


@gpu
def test_rms_norm_op(rng):
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    w = rng.standard_normal(48).astype(np.float32)
    got = cp.asnumpy(CupyBackend().rms_norm(cp.asarray(x), cp.asarray(w), 1e-6))
    assert rel(NB.rms_norm(x, w, 1e-6), got) < 1e-6


# ---- routing ------------------------------------------------------------------------------------

def _cfg(**kw) -> ModelConfig:
    base = dict(arch="mixtral", vocab_size=64, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                intermediate_size=0, n_experts=8, top_k=2, moe_intermediate_size=16, moe_layers=(0,))
    base.update(kw)
    return ModelConfig(**base)


# route_warp has a variant by experts a lane (E <= 32, 64, 128, more): every one is taken here
ROUTES = [dict(), dict(norm_topk_prob=True), dict(n_experts=60, top_k=4), dict(moe_weighting="ones"),
          dict(n_experts=64, top_k=6, topk_method="group_limited_greedy", n_group=8, topk_group=3,
               routed_scaling_factor=16.0), dict(n_experts=128, top_k=8, norm_topk_prob=True),
          dict(n_experts=33, top_k=3), dict(n_experts=200, top_k=8, norm_topk_prob=True),
          dict(n_experts=512, top_k=32, norm_topk_prob=True),
          dict(n_experts=256, top_k=8, topk_method="group_limited_greedy", n_group=8, topk_group=4,
               routed_scaling_factor=2.5)]


@gpu
@pytest.mark.parametrize("kw", ROUTES)
def test_route(rng, kw):
    cfg = _cfg(**kw)
    logits = (rng.standard_normal((7, cfg.n_experts)) * 2).astype(np.float32)
    ids, w = ops.route(cp.asarray(logits), cfg)
    rids, rw = NB.route(logits, cfg)
    np.testing.assert_array_equal(cp.asnumpy(ids), rids)
    np.testing.assert_allclose(cp.asnumpy(w), rw, rtol=2e-6, atol=1e-7)


@gpu
@pytest.mark.parametrize("qtype", ["f32", "q8"])
def test_router_kernel(rng, qtype):
    cfg = _cfg(n_experts=60, top_k=4, hidden_size=200)
    buf, wf = stored(rng, qtype, (60, 200), 32)
    xbuf, xwf = stored(rng, qtype, (1, 200), 32)
    W, Xw = GpuWeight(qtype, (60, 200), 32, cp.asarray(buf)), GpuWeight(qtype, (1, 200), 32, cp.asarray(xbuf))
    x = rng.standard_normal((3, 200)).astype(np.float32) * 10
    xd = cp.asarray(x)
    prep = None
    if W.quantized:
        prep = ops.XPrep(3, 200, W.Kp)
        ops.rows_prep(xd, 200, prep=prep)
    ids = cp.full((3, 4), -7, dtype=cp.int32)
    w = cp.full((3, 4), np.nan, dtype=cp.float32)
    lg = cp.full((3, 60), np.nan, dtype=cp.float32)
    ex = cp.full(3, np.nan, dtype=cp.float32)
    ops.router(W, 3, xd, prep, cfg, ids, w, logits=lg, extra=Xw, extra_out=ex)
    ref_lg = x.astype(np.float64) @ wf.T
    assert rel(ref_lg, cp.asnumpy(lg)) < (TOL_Q if W.quantized else TOL_F32)
    # three numbers only: a looser bound than the 60-logit one above
    assert rel(x @ xwf.T, cp.asnumpy(ex)[:, None]) < (2 * TOL_Q if W.quantized else TOL_F32)
    rids, rw = NB.route(cp.asnumpy(lg), cfg)        # routing of the logits the kernel computed
    np.testing.assert_array_equal(cp.asnumpy(ids), rids)
    np.testing.assert_allclose(cp.asnumpy(w), rw, rtol=2e-6)


# ---- mixture of experts through the slot table ------------------------------------------------------

@gpu
@pytest.mark.parametrize("types", [("q4", "q4", 64), ("q8", "q4", 32), ("f16", "f16", 32), ("bf16", "q8", 32)])
def test_moe_slot_table(rng, types):
    gtype, dtype, group = types
    D, I, E, A, T, L = 160, 200, 6, 2, 2, 1
    pool, host, lay = random_pool(rng, D, I, 3, E, 5, gtype, dtype, group)
    table = np.full((3, E), -1, np.int32)
    table[L] = rng.permutation([0, 1, 2, 3, 4, -1])
    ids = np.array([[e for e in rng.permutation(E) if table[L, e] >= 0][:A] for _ in range(T)], np.int32)
    rw = rng.uniform(0.1, 1, (T, A)).astype(np.float32)
    x = rng.standard_normal((T, D)).astype(np.float32)
    y = _run_moe(pool, table, L, x, ids, rw)
    ref, err = gpu_ref.moe_slots_ref(x, ids, rw, table[L], host, lay)
    assert not err
    tol = TOL_Q if "q" in gtype + dtype else 1e-3
    assert rel(ref, y) < tol
    # a new table (same launch arguments) must be followed, and a missing expert flagged
    table[L] = np.roll(table[L], 1)
    ids[0, 0] = int(np.where(table[L] < 0)[0][0])
    y2 = _run_moe(pool, table, L, x, ids, rw)
    ref2, err2 = gpu_ref.moe_slots_ref(x, ids, rw, table[L], host, lay)
    assert err2 and int(pool.err.get()[0]) == 1
    assert rel(ref2, y2) < tol and np.all(y2[0] == 0)


def _run_moe(pool, table, L, x, ids, rw):
    T, A = ids.shape
    D = x.shape[1]
    pool.table[...] = cp.asarray(table)
    pool.err.fill(0)
    lay = pool.layout
    gate, up, down = (ops.Mat.of_part(lay.parts[p]) for p in ("gate", "up", "down"))
    xd = cp.asarray(x)
    prep = ops.XPrep(T, D, gate.Kp)
    ops.rows_prep(xd, D, prep=prep)
    src = ops.Experts(base=pool.base, stride=pool.stride, ids=cp.asarray(ids.reshape(-1)),
                      table=int(pool.table.data.ptr) + L * pool.E * 4, E=pool.E, err=pool.err)
    P = T * A
    h = cp.full((P, lay.I), np.nan, dtype=cp.float32)
    hprep = ops.XPrep(P, lay.I, max(down.Kp, ops.cdiv(lay.I, 32) * 32)) if down.qtype in ("q4", "q8") else None
    ops.moe_gateup(src, gate, up, P, A, xd, prep, h, hprep)
    y = cp.full((P, D), np.nan, dtype=cp.float32)
    ops.moe_down(src, down, P, h, hprep, cp.asarray(rw.reshape(-1)), y)
    return cp.asnumpy(y)


@gpu
@pytest.mark.parametrize("T", [1, 5, 20])
def test_expert_ffn_and_combine(rng, T):
    B = CupyBackend()
    pool, host, lay = random_pool(rng, 96, 160, 3, 1, 1, "q4", "q8", 32)
    handle = ExpertHandle(pool.base, pool.layout, pool.data)
    x = rng.standard_normal((T, 96)).astype(np.float32)
    got = cp.asnumpy(B.expert_ffn(cp.asarray(x), handle))
    ref = gpu_ref.expert_ffn_ref(x, gpu_ref.blob_weights(host[0], lay))
    assert rel(ref, got) < (TOL_Q if T <= 8 else TOL_MM)
    y = rng.standard_normal((T, 3, 96)).astype(np.float32)
    w = rng.standard_normal((T, 3)).astype(np.float32)
    np.testing.assert_array_equal(cp.asnumpy(B.moe_combine(cp.asarray(y), cp.asarray(w))), NB.moe_combine(y, w))


@gpu
def test_to_f16_rows(rng):
    x = rng.standard_normal((4, 300)).astype(np.float32) * np.array([[1e-4], [1.0], [1e3], [0.0]], np.float32)
    x16, inv = ops.to_f16_rows(cp.asarray(x))
    back = cp.asnumpy(x16).astype(np.float64) * cp.asnumpy(inv)[:, None]
    assert rel(x, back) < 1e-3 and np.all(back[3] == 0)
    amax = np.abs(cp.asnumpy(x16).astype(np.float32)).max(axis=1)
    assert np.all((amax[:3] >= 8) & (amax[:3] <= 16))


# ---- attention and rotary ------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("case", [(1, 37, 8, 2, 64, 64, 36), (1, 300, 32, 8, 128, 128, 299), (50, 50, 8, 2, 64, 64, 0),
                                  (20, 70, 4, 4, 48, 32, 50), (3, 9, 6, 3, 16, 16, 6), (2, 20, 4, 2, 6, 10, 10)])
def test_attention(rng, case):
    T, S, H, G, dq, dv, pos0 = case
    q = rng.standard_normal((T, H, dq)).astype(np.float32)
    k = rng.standard_normal((S, G, dq)).astype(np.float32)
    v = rng.standard_normal((S, G, dv)).astype(np.float32)
    ref = NB.attention(q, k[:pos0 + T], v[:pos0 + T], pos0, dq ** -0.5)
    got = CupyBackend().attention(cp.asarray(q), cp.asarray(k[:pos0 + T]), cp.asarray(v[:pos0 + T]), pos0, dq ** -0.5)
    assert rel(ref, cp.asnumpy(got)) < TOL_F32
    # forced key splits (the decode graph's way: in-kernel merge of partial softmaxes); 40 splits:
    # more than a warp's lanes, and splits with no visible key
    for nsplit in (5, 40):
        work = ops.AttnWork(T, H, G, dv, nsplit)
        out = cp.full((T, H, dv), np.nan, dtype=cp.float32)
        prep = ops.XPrep(T, H * dv, H * dv) if dv % 32 == 0 else None
        ops.attention(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(np.array([pos0], np.int32)),
                      dq ** -0.5, out=out, work=work, S=S, prep=prep)
        got = cp.asnumpy(out)
        assert rel(ref, got) < TOL_F32, nsplit
        assert int(work.counters.sum()) == 0
    if prep is not None:          # the fused xprep of the o projection's input
        xh, xs, xc = gpu_ref.prep_ref(got.reshape(T, H * dv), H * dv)
        np.testing.assert_array_equal(cp.asnumpy(prep.xh).view(np.float16), xh)
        np.testing.assert_array_equal(cp.asnumpy(prep.xc), xc)


@gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope(rng, interleaved):
    T, h, r = 5, 3, 24
    big = rng.standard_normal((T, h, r + 8)).astype(np.float32)
    x = big[:, :, 8:]                       # a strided view, as model.py passes
    ang = rng.uniform(-20, 20, (T, r // 2)).astype(np.float32)
    ref = NB.rope(x, np.cos(ang), np.sin(ang), interleaved)
    got = CupyBackend().rope(cp.asarray(big)[:, :, 8:], cp.asarray(np.cos(ang)), cp.asarray(np.sin(ang)), interleaved)
    np.testing.assert_array_equal(cp.asnumpy(got), ref)


@gpu
def test_qkv_rope_store(rng):
    T, H, G, d, P, pos0 = 2, 4, 2, 16, 10, 3
    q = rng.standard_normal((T, H * d)).astype(np.float32)
    k = rng.standard_normal((T, G * d)).astype(np.float32)
    v = rng.standard_normal((T, G * d)).astype(np.float32)
    ang = rng.uniform(-5, 5, (P, d // 2)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    qd = cp.asarray(q)
    kc, vc = cp.zeros((P, G, d), cp.float32), cp.zeros((P, G, d), cp.float32)
    ops.qkv_rope_store(qd, cp.asarray(k), cp.asarray(v), H, G, d, cp.asarray(cos), cp.asarray(sin),
                       cp.asarray(np.array([pos0], np.int32)), kc, vc)
    c, s = cos[pos0:pos0 + T], sin[pos0:pos0 + T]
    np.testing.assert_array_equal(cp.asnumpy(qd).reshape(T, H, d), NB.rope(q.reshape(T, H, d), c, s))
    np.testing.assert_array_equal(cp.asnumpy(kc)[pos0:pos0 + T], NB.rope(k.reshape(T, G, d), c, s))
    np.testing.assert_array_equal(cp.asnumpy(vc)[pos0:pos0 + T], v.reshape(T, G, d))
    assert not cp.asnumpy(kc)[:pos0].any()


# ---- embedding, elementwise ------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("qtype", ["q4", "q8", "f16", "bf16", "f32"])
def test_embed(rng, qtype):
    buf, wf = stored(rng, qtype, (50, 72), 32)
    W = GpuWeight(qtype, (50, 72), 32, cp.asarray(buf))
    ids = rng.integers(0, 50, 9)
    got = cp.asnumpy(CupyBackend().embed(cp.asarray(ids), W))
    np.testing.assert_array_equal(got, wf[ids])


@gpu
def test_silu_mul_sigmoid(rng):
    B = CupyBackend()
    g, u = (rng.standard_normal((4, 33)) * 5).astype(np.float32), rng.standard_normal((4, 33)).astype(np.float32)
    assert rel(NB.silu_mul(g, u), cp.asnumpy(B.silu_mul(cp.asarray(g), cp.asarray(u)))) < 1e-6
    assert rel(NB.sigmoid(g), cp.asnumpy(B.sigmoid(cp.asarray(g)))) < 1e-6
