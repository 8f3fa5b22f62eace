"""Reference quantizers (efengine/quant.py): layout, error bounds, exactness, determinism."""
import numpy as np
import pytest

from efengine import quant
from efengine.errors import ConfigError

RNG = np.random.default_rng(1234)


def gaussian(shape, std=0.02):
    return (RNG.standard_normal(shape) * std).astype(np.float32)


def plain_q8(w, group):
    """The q8 formulas of quant.py's docstring, written out with no chunking or in-place tricks."""
    n, k = w.shape
    kp = -(-k // group) * group
    g = np.zeros((n, kp), np.float32)
    g[:, :k] = w
    g = g.reshape(n, -1, group)
    s = (np.abs(g).max(axis=2) / np.float32(127)).astype(np.float16)
    inv = np.where(s > 0, np.float32(1) / np.maximum(s.astype(np.float32), np.float32(1e-30)), np.float32(0))
    q = np.clip(np.rint(g * inv[..., None].astype(np.float32)), -127, 127).astype(np.int8)
    return q.reshape(n, kp), s


def plain_q4(w, group):
    n, k = w.shape
    kp = -(-k // group) * group
    g = np.zeros((n, kp), np.float32)
    g[:, :k] = w
    g = g.reshape(n, -1, group)
    m = g.min(axis=2).astype(np.float16)
    s = ((g.max(axis=2) - m.astype(np.float32)) / np.float32(15)).astype(np.float16)
    inv = np.where(s > 0, np.float32(1) / np.maximum(s.astype(np.float32), np.float32(1e-30)), np.float32(0))
    q = np.clip(np.rint((g - m.astype(np.float32)[..., None]) * inv[..., None].astype(np.float32)), 0, 15)
    q = q.astype(np.uint8).reshape(n, kp)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8), s, m


@pytest.mark.parametrize("shape,group", [((64, 256), 64), ((37, 100), 32), ((5, 70), 64), ((300, 130), 128)])
def test_quantizers_match_plain_formulas_bit_exactly(shape, group):
    w = gaussian(shape)
    w[0, :8] = 0.0                       # an all-zero start of a group: scale 0 must not divide
    for got, want in zip(quant.quantize_q8(w, group), plain_q8(w, group)):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(quant.quantize_q4(w, group), plain_q4(w, group)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("qtype", ["q4", "q8"])
def test_row_chunking_does_not_change_bytes(qtype, monkeypatch):
    w = gaussian((513, 192))
    whole = quant.quantize(w, qtype, 64)
    deq = quant.dequantize(whole, qtype, w.shape, 64)
    for chunk in (192 * 7, 1):                           # 7 rows a chunk (last one short), 1 row
        monkeypatch.setattr(quant, "_CHUNK", chunk)
        np.testing.assert_array_equal(quant.quantize(w, qtype, 64), whole)
        np.testing.assert_array_equal(quant.dequantize(whole, qtype, w.shape, 64), deq)


@pytest.mark.parametrize("qtype,bound", [("q8", 0.01), ("q4", 0.1)])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_bounds_on_gaussian_weights(qtype, bound, group):
    w = gaussian((256, 512))
    r = quant.dequantize(quant.quantize(w, qtype, group), qtype, w.shape, group)
    err = quant.rel_rms(w, r)
    assert err < bound
    # and not suspiciously small: a quantizer that stored floats would pass the bound too
    assert err > bound / 20


@pytest.mark.parametrize("qtype", ["q4", "q8"])
@pytest.mark.parametrize("shape", [(100, 256), (33, 70)])
def test_error_reported_while_quantizing_matches_dequantize(qtype, shape, monkeypatch):
    monkeypatch.setattr(quant, "_CHUNK", 640)            # several chunks accumulate into err
    w = gaussian(shape)
    err = [0.0]
    buf = quant.quantize(w, qtype, 64, err=err)
    d = quant.dequantize(buf, qtype, shape, 64).astype(np.float64) - w
    assert err[0] == pytest.approx(float((d ** 2).sum()), rel=1e-5)
    np.testing.assert_array_equal(buf, quant.quantize(w, qtype, 64))   # asking for err changes nothing


def test_q4_reproduces_values_on_its_grid_exactly():
    n, k, group = 16, 256, 64
    G = k // group
    s = RNG.uniform(1e-3, 1e-2, (n, G)).astype(np.float16).astype(np.float32)
    m = RNG.uniform(-0.1, 0.0, (n, G)).astype(np.float16).astype(np.float32)
    q = RNG.integers(0, 16, (n, G, group))
    q[:, :, 0], q[:, :, 1] = 0, 15       # each group spans the whole code range
    w = (q.astype(np.float32) * s[..., None] + m[..., None]).reshape(n, k)
    r = quant.dequantize(quant.quantize(w, "q4", group), "q4", w.shape, group)
    np.testing.assert_array_equal(r, w)


def test_q8_reproduces_values_on_its_grid_exactly():
    n, k, group = 16, 256, 64
    s = RNG.uniform(1e-4, 1e-3, (n, k // group)).astype(np.float16).astype(np.float32)
    q = RNG.integers(-127, 128, (n, k // group, group))
    q[:, :, 0] = 127
    w = (q.astype(np.float32) * s[..., None]).reshape(n, k)
    r = quant.dequantize(quant.quantize(w, "q8", group), "q8", w.shape, group)
    np.testing.assert_array_equal(r, w)


@pytest.mark.parametrize("qtype", ["q4", "q8", "f16", "bf16"])
def test_dequantize_quantize_is_idempotent(qtype):
    w = gaussian((48, 200))
    once = quant.dequantize(quant.quantize(w, qtype, 64), qtype, w.shape, 64)
    twice = quant.dequantize(quant.quantize(once, qtype, 64), qtype, w.shape, 64)
    np.testing.assert_array_equal(twice, once)
    assert not np.array_equal(once, w)   # the first pass did round


def test_float_types():
    w = gaussian((3, 5), std=3.0)
    np.testing.assert_array_equal(quant.dequantize(quant.quantize(w, "f32"), "f32", w.shape), w)
    np.testing.assert_array_equal(quant.dequantize(quant.quantize(w, "f16"), "f16", w.shape),
                                  w.astype(np.float16).astype(np.float32))
    # bf16: round to nearest, ties to even; NaN stays NaN
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7, np.nan, -2.5], np.float32)
    got = quant.bf16_to_f32(quant.f32_to_bf16(x))
    np.testing.assert_array_equal(got[[0, 1, 2, 3, 5]], np.array([1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5], np.float32))
    assert np.isnan(got[4])
    bits = quant.f32_to_bf16(w)
    np.testing.assert_array_equal(quant.quantize(bits, "bf16").view(np.uint16).reshape(w.shape), bits)


def test_zero_and_constant_groups():
    w = np.zeros((2, 128), np.float32)
    w[1, :64] = 0.37
    for qt in ("q4", "q8"):
        r = quant.dequantize(quant.quantize(w, qt, 64), qt, w.shape, 64)
        np.testing.assert_array_equal(r[0], 0.0)
        np.testing.assert_allclose(r[1, :64], 0.37, rtol=2e-3)
        np.testing.assert_array_equal(r[1, 64:], 0.0)


def test_padding_along_k():
    w = gaussian((4, 70))
    buf = quant.quantize(w, "q4", 64)
    assert buf.nbytes == quant.nbytes("q4", (4, 70), 64)
    r = quant.dequantize(buf, "q4", w.shape, 64)
    assert r.shape == (4, 70) and quant.rel_rms(w, r) < 0.1


def test_layout_alignment_and_sizes():
    parts, total = quant.layout("q4", (100, 300), 64)
    assert [p.name for p in parts] == ["q", "s", "m"]
    assert all(p.offset % quant.PART_ALIGN == 0 for p in parts)
    assert parts[0].shape == (100, 160) and parts[1].shape == (100, 5)
    assert total == parts[2].offset + 100 * 5 * 2
    parts, total = quant.layout("q8", (10, 64), 32)
    assert [(p.name, p.shape) for p in parts] == [("q", (10, 64)), ("s", (10, 2))]
    assert quant.nbytes("bf16", (3, 7)) == 42


@pytest.mark.parametrize("args", [("q3", (4, 4), 64), ("q4", (4,), 64), ("q4", (4, 4), 7), ("q8", (4, 4), 0)])
def test_layout_rejects_bad_requests(args):
    with pytest.raises(ConfigError):
        quant.layout(*args)


def test_views_reject_short_buffers():
    with pytest.raises(ValueError):
        quant.views(np.zeros(10, np.uint8), "q4", (4, 64), 64)
