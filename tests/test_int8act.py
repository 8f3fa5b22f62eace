"""int8 activations (act="int8"): the numpy twin of the dp4a kernels, on the CPU.

act_int8.quantize / kernel_bytes / chunk_dot are what the CUDA prep and dot compute
(tests/test_gpu_int8act.py holds the kernels to them); here they are checked against float64
arithmetic with bounds derived from the quantization step, and NumpyBackend(act="int8") against
the float path on a tiny quantized model. u = 2^-24 is float32's unit roundoff.
"""
from __future__ import annotations


import numpy as np
import pytest

from efengine import quant
from efengine.ops import act_int8
from efengine.ops.numpy_backend import NumpyBackend, QuantMatrix, _small_int8
from quant_helpers import stored  # noqa: E402

U = 2.0 ** -24


# ---- the prep ---------------------------------------------------------------------------------

def test_quantize_rules(rng):
    R, K, KX = 4, 200, 256
    x = (rng.standard_normal((R, K)) * rng.uniform(1e-3, 1e3, (R, 1))).astype(np.float32)
    x[1, 32:64] = 0.0                        # a zero chunk
    x[1, 64:96] = rng.standard_normal(32) * 1e-32     # a negligible chunk (amax < 2^-100)
    x[2, 100] = np.nan                       # NaN and inf chunks
    x[3, 5] = -np.inf
    q, d, qsum = act_int8.quantize(x, KX)
    assert q.dtype == np.int8 and q.shape == (R, KX) and d.shape == qsum.shape == (R, KX // 32)
    assert np.all(np.abs(q.astype(int)) <= 127)
    np.testing.assert_array_equal(qsum, q.reshape(R, -1, 32).astype(np.int64).sum(axis=2))
    assert d[1, 1] == 0 and d[1, 2] == 0 and not q[1, 32:96].any()
    assert np.isnan(d[2, 3]) and np.isnan(d[3, 0]) and not q[2, 96:128].any() and not q[3, :32].any()
    assert np.all(q[:, K:] == 0) and np.all(d[:, -1] == 0)                  # padding
    ok = np.isfinite(d) & (d > 0)
    ch = np.zeros((R, KX), np.float32)
    ch[:, :K] = np.nan_to_num(x)
    ch = ch.reshape(R, -1, 32)
    amax = np.abs(ch).max(axis=2)
    # the largest value of a chunk lands on +-127; d = amax * float32(1/127) exactly
    top = np.take_along_axis(np.abs(q.reshape(R, -1, 32)), np.abs(ch).argmax(axis=2)[..., None], 2)[..., 0]
    assert np.all(top[ok] == 127)
    np.testing.assert_array_equal(d[ok], (amax * np.float32(1 / 127))[ok])
    # |x - d q| <= d (1/2 + 512 u): rint error 1/2, the product x * (1/d) 383 u, d * q 128 u
    err = np.abs(ch.astype(np.float64) - act_int8.dequantize(q, np.where(ok, d, 0)).reshape(R, -1, 32))
    assert np.all(err[ok] <= (d[ok] * (0.5 + 512 * U))[:, None])


def test_kernel_byte_order_pairs_q4_nibbles(rng):
    """The byte order lets a q4 word's low nibbles (even k) meet the first activation word and its
    high nibbles the second: the dp4a sums in that order equal the dot product in k order."""
    q = rng.integers(-127, 128, (3, 64)).astype(np.int8)
    cb = act_int8.chunk_bytes(q)                              # [3, 2 chunks, 32]
    codes = rng.integers(0, 16, (5, 64)).astype(np.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)          # quant.py: low nibble = even k
    w32 = packed.view("<u4")                                  # [5, 8] words of 8 codes (2 chunks)
    x32 = np.ascontiguousarray(cb).reshape(3, 64).view("<u4")  # [3, 16] words of 4 codes

    def dp4a(a, b):                                           # a: unsigned bytes, b: signed bytes
        ab = np.frombuffer(np.uint32(a).tobytes(), np.uint8).astype(int)
        bb = np.frombuffer(np.uint32(b).tobytes(), np.int8).astype(int)
        return int((ab * bb).sum())

    for r in range(3):
        for n in range(5):
            s = sum(dp4a(w & 0x0F0F0F0F, x32[r, 2 * j]) + (dp4a(w & 0xF0F0F0F0, x32[r, 2 * j + 1]) >> 4)
                    for j, w in enumerate(w32[n]))
            assert s == int(codes[n].astype(int) @ q[r].astype(int))
    # x_korder (dot.cuh): byte_perm(even word, odd word, 0x5140 / 0x7362) restores k order for q8
    def perm(a, b, sel):
        src = np.frombuffer(np.array([a, b], "<u4").tobytes(), np.uint8)
        return bytes(src[(sel >> (4 * i)) & 7] for i in range(4))
    korder = b"".join(perm(x32[r, 2 * j], x32[r, 2 * j + 1], sel) for r in range(3) for j in range(8)
                      for sel in (0x5140, 0x7362))
    np.testing.assert_array_equal(np.frombuffer(korder, np.int8).reshape(3, 64), q)
    # a row as stored: 2 planes of 16 bytes a chunk; codes_of inverts it
    kb = act_int8.kernel_bytes(q)
    np.testing.assert_array_equal(kb.reshape(3, 2, 2, 16)[:, 1, 0], cb[:, 0, 16:])    # plane 1 of chunk 0
    np.testing.assert_array_equal(act_int8.codes_of(kb), q)


# ---- the dot ------------------------------------------------------------------------------------

CASES = [("q4", (37, 4192), 32), ("q8", (37, 4192), 32), ("q4", (64, 200), 64), ("q8", (20, 1000), 128)]


@pytest.mark.parametrize("case", CASES)
def test_chunk_dot_is_the_dequantized_product(rng, case):
    """d (s sum(c q) + m sum(q)) over chunks = dequant(W) . dequant(x): the function the numpy
    backend computes; exact in float64 up to its own rounding (1e-12)."""
    qtype, (N, K), group = case
    buf, wf = stored(rng, qtype, (N, K), group)
    x = rng.standard_normal((3, K)).astype(np.float32) * 3
    Kp = -(-K // group) * group
    q, d, qs = act_int8.quantize(x, Kp)
    y, mag = act_int8.chunk_dot(buf, qtype, (N, K), group, q, d, qs)
    ref = (q[:, :Kp] * np.repeat(d.astype(np.float64), 32, axis=1)[:, :Kp]) @ _exact_weights(buf, qtype, (N, K), group).T
    assert np.all(np.abs(y - ref) <= 1e-12 * mag)
    assert np.all(mag >= np.abs(y))


def _exact_weights(buf, qtype, shape, group):
    """s * c (+ m) in float64 (exact), [N, Kp]."""
    v = quant.views(buf, qtype, shape, group)
    codes = quant.unpack_q4(v["q"]) if qtype == "q4" else v["q"]
    w = codes.astype(np.float64) * np.repeat(v["s"].astype(np.float64), group, axis=1)
    return w + np.repeat(v["m"].astype(np.float64), group, axis=1) if qtype == "q4" else w


def _error_bound(x, wf, K):
    """Per output: sum over chunks of d (1/2 + 512 u) sum_k |w_k| (activation rounding) + K u
    sum_k |w_k x_k| (float32 product of float32 operands, any summation order; 1% for |d q| vs |x|)."""
    KX = -(-K // 32) * 32
    _, d, _ = act_int8.quantize(x, KX)
    aw = np.zeros((wf.shape[0], KX))
    aw[:, :K] = np.abs(wf)
    step = (d * (0.5 + 512 * U)).astype(np.float64)                       # [T, C]
    quant_part = step @ aw.reshape(wf.shape[0], -1, 32).sum(axis=2).T     # [T, N]
    return quant_part + K * U * (np.abs(x).astype(np.float64) @ np.abs(wf).T.astype(np.float64)) * 1.01


@pytest.mark.parametrize("qtype", ["q4", "q8"])
def test_numpy_int8_linear_within_quantization_bound(rng, qtype):
    N, K, group = 96, 1000, 32
    buf, wf = stored(rng, qtype, (N, K), group)
    B = NumpyBackend(act="int8")
    x = (rng.standard_normal((5, K)) * 2).astype(np.float32)
    y = B.linear(x, QuantMatrix(wf))
    exact = x.astype(np.float64) @ wf.T.astype(np.float64)
    err = np.abs(y - exact)
    bound = _error_bound(x, wf, K)
    assert np.all(err <= bound)
    assert quant.rel_rms(exact, y) > 100 * quant.rel_rms(exact, x @ wf.T)    # it did quantize x
    # more rows than a GEMV step: float activations, as the GPU's prefill GEMMs
    x9 = np.concatenate([x, x[:4]])
    np.testing.assert_array_equal(B.linear(x9, QuantMatrix(wf)), x9 @ wf.T)


def test_min_term_from_code_sums_is_more_accurate(rng):
    """The min term m * d * sum(q) (ours) against m * sum(x) (float chunk sums): with the usual
    centred groups ours has the smaller error; both measured against the float64 product."""
    N, K, group = 256, 4096, 32
    buf, wf = stored(rng, "q4", (N, K), group)
    x = rng.standard_normal((4, K)).astype(np.float32)
    q, d, qs = act_int8.quantize(x, K)
    ours, _ = act_int8.chunk_dot(buf, "q4", (N, K), group, q, d, qs)
    m = np.repeat(quant.views(buf, "q4", (N, K), group)["m"].astype(np.float64), group // 32, axis=1)
    xsum = x.astype(np.float64).reshape(4, -1, 32).sum(axis=2)
    other = ours + np.einsum("rc,nc->rn", xsum - d.astype(np.float64) * qs, m)     # m (sum x - d sum q)
    exact = x.astype(np.float64) @ wf.T.astype(np.float64)
    e_ours, e_other = quant.rel_rms(exact, ours), quant.rel_rms(exact, other)
    print(f"relative RMS error: min term from code sums {e_ours:.2e}, from float sums {e_other:.2e}")
    assert e_ours < e_other


# ---- a tiny model ---------------------------------------------------------------------------------

def test_tiny_model_int8_close_to_f16(tiny_ef):
    """A tiny q4/q8 model decoded token by token with int8 activations against the float path: the
    logits move by the quantization noise only (KL and max difference printed), greedy picks agree;
    a prefill longer than a GEMV step is unchanged (float activations there, as on the GPU)."""
    from efengine.format import EfFile
    from efengine.model import Model
    ef = EfFile(tiny_ef("qwen2_moe", experts="q4", dense="q8", group=32))
    m16, m8 = Model(ef, NumpyBackend()), Model(ef, NumpyBackend(act="int8"))
    toks = np.random.default_rng(3).integers(0, ef.config.vocab_size, 24)
    c16, c8 = m16.new_cache(40), m8.new_cache(40)
    np.testing.assert_array_equal(m16.forward(toks[:12], c16), m8.forward(toks[:12], c8))
    kls, diffs, same = [], [], 0
    for t in toks[12:]:
        a, b = m16.forward([t], c16)[0].astype(np.float64), m8.forward([t], c8)[0].astype(np.float64)
        pa, pb = np.exp(a - a.max()), np.exp(b - b.max())
        pa, pb = pa / pa.sum(), pb / pb.sum()
        kls.append(float((pa * np.log(pa / pb)).sum()))
        diffs.append(float(np.abs(a - b).max() / np.abs(a).max()))
        same += int(a.argmax() == b.argmax())
    print(f"int8 vs f16 logits over {len(kls)} decode steps: KL mean {np.mean(kls):.2e} max {max(kls):.2e}, "
          f"max |diff| / max |logit| {max(diffs):.2e}, greedy agreement {same}/{len(kls)}")
    assert 0 < max(diffs) < 0.05 and max(kls) < 1e-2 and same >= len(kls) - 1


# ---- code boundaries: why whole-model comparisons count tokens (test_gpu_int8act) ------------------

class _OtherRounding(NumpyBackend):
    """The same int8 function rounded differently: products and norms in float64, rounded once to
    float32. Its results differ from the twin's by float32 roundings, as the GPU's (fp32 sums in
    another order) do."""

    def _mm(self, x, w):
        return np.matmul(x.astype(np.float64), w.T.astype(np.float64)).astype(np.float32)

    def linear(self, x, W):
        return self._mm(_small_int8(x, True), W.w) if isinstance(W, QuantMatrix) else self._mm(x, W)

    def rms_norm(self, x, w, eps):
        x64 = x.astype(np.float64)
        return (w * (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps))).astype(np.float32)

    def expert_ffn(self, x, h):
        x = _small_int8(x, h.int8[0])
        hid = self.silu_mul(self._mm(x, h.gate), self._mm(x, h.up))
        return self._mm(_small_int8(hid, h.int8[1]), h.down)


def sync_cache(cache, src, n: int, to_host=np.asarray) -> None:
    """cache := the first n positions of src (another model's KV cache): the next step starts from
    src's state."""
    for l in range(len(cache.k)):
        cache.k[l][:n] = to_host(src.k[l][:n])
        cache.v[l][:n] = to_host(src.v[l][:n])
    cache.pos = n


BOUNDARY_TIGHT = 1e-5       # test_gpu_int8act: logits of a token whose int8 codes all agree
BOUNDARY_RATE = 0.02        # test_gpu_int8act: design rate of tokens with a code boundary hit


def test_int8_code_boundary_hits_are_rare_and_whole(tiny_ef):
    """The premises of test_gpu_int8act's whole-model check, on the CPU: the twin against itself
    rounded differently (_OtherRounding), token by token from the same state (KV cache synced).
    Where every int8 code agrees, the logits differ by roundings only: far below BOUNDARY_TIGHT.
    Where a value sits within the rounding difference of a code boundary (x/d within ~1e-5 of
    k + 1/2) the codes differ by one step there; that moves the next preps' inputs by ~1e-3 and flips
    more codes (a fraction ~ 1e-3 * |x/d| of them), so such a token ends at the scale of the
    quantization noise itself (its distance to the twin ~ its distance to the float model): no
    tolerance separates it from a wrong result. Such tokens are counted instead: their rate is
    about sum over a token's codes of |x_a/d_a - x_b/d_b| (the chance that a boundary lies between
    the two values), ~0.009 on the GPU's test model (1728 codes a token, ~5e-6 code steps apart)."""
    from efengine.format import EfFile
    from efengine.model import Model
    ef = EfFile(tiny_ef("qwen2_moe", experts="q8", dense="q4", group=32))
    mo, m8, m16 = Model(ef, _OtherRounding(act="int8")), Model(ef, NumpyBackend(act="int8")), Model(ef, NumpyBackend())
    rng = np.random.default_rng(11)
    e8, e16 = [], []
    for _ in range(10):
        co, c8, c16 = mo.new_cache(40), m8.new_cache(40), m16.new_cache(40)
        for p in range(40):
            tok = int(rng.integers(ef.config.vocab_size))
            sync_cache(c8, co, p)
            sync_cache(c16, co, p)
            g = mo.forward([tok], co)
            e8.append(quant.rel_rms(m8.forward([tok], c8), g))
            e16.append(quant.rel_rms(m16.forward([tok], c16), g))
    e8, e16 = np.array(e8), np.array(e16)
    hit = e8 > BOUNDARY_TIGHT
    print(f"{e8.size} tokens: {hit.sum()} boundary hits; others max {e8[~hit].max():.1e}; float model "
          f"min {e16.min():.1e}; hits' e8 / e16 {np.round(e8[hit] / e16[hit], 2).tolist()}")
    assert e8[~hit].max() < 0.1 * BOUNDARY_TIGHT
    assert hit.mean() <= BOUNDARY_RATE
    assert e16.min() > 100 * BOUNDARY_TIGHT      # the float model is far outside BOUNDARY_TIGHT
