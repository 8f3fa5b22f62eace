"""The .ef file: Writer -> EfFile round trip, atomic writing, and every way reading must refuse."""
import json
import struct

import numpy as np
import pytest

from efengine import format as eff
from efengine import quant
from efengine.config import ModelConfig
from efengine.errors import FormatError

RNG = np.random.default_rng(7)
CFG = ModelConfig(arch="mixtral", vocab_size=32, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  intermediate_size=0, n_experts=3, top_k=2, moe_intermediate_size=40, moe_layers=(0, 1))
TENSORS = {"a.f32": ("f32", (5, 7)), "b.f16": ("f16", (9,)), "c.bf16": ("bf16", (4, 3)),
           "d.q8": ("q8", (6, 100)), "e.q4": ("q4", (8, 64))}
SPECS = {"gate": ("q4", (40, 64), 32), "up": ("q8", (40, 64), 32), "down": ("f16", (64, 40), 32)}


def weights():
    return {n: RNG.standard_normal(shape).astype(np.float32) for n, (_, shape) in TENSORS.items()}


def write(path, ws=None, experts=None):
    ws = ws or weights()
    experts = experts or {(i, e): {p: RNG.standard_normal(s).astype(np.float32) for p, (_, s, _) in SPECS.items()}
                          for i in range(2) for e in range(3)}
    with eff.Writer(path, "mixtral", CFG.to_dict(), {"source": "test"}) as w:
        for n, (qt, shape) in TENSORS.items():
            w.plan_tensor(n, qt, shape)
        w.plan_experts([0, 1], 3, SPECS)
        w.plan_file("tokenizer.json", 11)
        w.begin()
        for n, (qt, _) in TENSORS.items():
            w.write_tensor(n, quant.quantize(ws[n], qt))
        lay, size = eff.expert_layout(SPECS)
        for (i, e), parts in experts.items():
            blob = np.zeros(size, np.uint8)
            for p, t in lay.items():
                blob[t.offset:t.offset + t.nbytes] = quant.quantize(parts[p], t.type, t.group)
            w.write_expert(i, e, blob)
        w.write_file("tokenizer.json", b'{"x": true}')
        w.meta["late"] = 42
    return ws, experts


@pytest.fixture
def ef_file(tmp_path):
    path = tmp_path / "m.ef"
    ws, experts = write(path)
    return path, ws, experts


def test_round_trip(ef_file):
    path, ws, experts = ef_file
    ef = eff.EfFile(path)
    assert ef.arch == "mixtral" and ef.config == CFG
    assert ef.meta == {"source": "test", "late": 42}
    for n, (qt, shape) in TENSORS.items():
        want = quant.dequantize(quant.quantize(ws[n], qt), qt, shape)
        np.testing.assert_array_equal(ef.load(n), want)
        assert ef.raw(n).ctypes.data % eff.ALIGN == 0
    np.testing.assert_array_equal(ef.load("a.f32"), ws["a.f32"])
    assert ef.expert_layers == [0, 1] and ef.n_experts == 3 and ef.blob_nbytes % eff.ALIGN == 0
    for (i, e), parts in experts.items():
        got = ef.expert_weights(i, e)
        for p, (qt, shape, group) in SPECS.items():
            want = quant.dequantize(quant.quantize(parts[p], qt, group), qt, shape, group)
            np.testing.assert_array_equal(got[p], want)
        assert ef.expert_offset(i, e) % eff.ALIGN == 0
    assert ef.file("tokenizer.json") == b'{"x": true}' and ef.file("nope") is None
    assert ef.verify() == []


def test_exception_while_writing_leaves_nothing(tmp_path):
    path = tmp_path / "m.ef"
    with pytest.raises(RuntimeError):
        with eff.Writer(path, "mixtral", CFG.to_dict()) as w:
            w.plan_tensor("a", "f32", (4,))
            w.begin()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unwritten_pieces_fail_and_leave_nothing(tmp_path):
    path = tmp_path / "m.ef"
    with pytest.raises(FormatError, match="never written"):
        with eff.Writer(path, "mixtral", CFG.to_dict()) as w:
            w.plan_tensor("a", "f32", (4,))
            w.plan_tensor("b", "f32", (4,))
            w.begin()
            w.write_tensor("a", np.zeros(4, np.float32))
    assert list(tmp_path.iterdir()) == []


# ---- refusing bad files ------------------------------------------------------------------------

def _header(path):
    data = bytearray(path.read_bytes())
    magic, ver, flags, hlen, off = eff.PREFIX.unpack(bytes(data[:eff.PREFIX.size]))
    return data, json.loads(bytes(data[eff.PREFIX.size:eff.PREFIX.size + hlen])), off


def _rewrite(path, data, header, off):
    hb = json.dumps(header).encode()
    data[:eff.PREFIX.size] = eff.PREFIX.pack(eff.MAGIC, header.get("version", 1), 0, len(hb), off)
    data[eff.PREFIX.size:off] = hb + b" " * (off - eff.PREFIX.size - len(hb))
    path.write_bytes(bytes(data))


def test_wrong_magic(ef_file):
    path = ef_file[0]
    data = bytearray(path.read_bytes())
    data[:8] = b"GGUF\x03\x00\x00\x00"
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="not a .ef file"):
        eff.EfFile(path)


def test_newer_version(ef_file):
    path = ef_file[0]
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", eff.VERSION + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="newer"):
        eff.EfFile(path)


@pytest.mark.parametrize("keep", [0, 20, 200, "data"])
def test_truncated_file(ef_file, keep):
    path = ef_file[0]
    data = path.read_bytes()
    n = len(data) - 4096 if keep == "data" else keep
    path.write_bytes(data[:n])
    with pytest.raises(FormatError):
        eff.EfFile(path)


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="cannot open"):
        eff.EfFile(tmp_path / "none.ef")


def test_header_not_json(ef_file):
    path = ef_file[0]
    data = bytearray(path.read_bytes())
    data[eff.PREFIX.size:eff.PREFIX.size + 4] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="JSON"):
        eff.EfFile(path)


@pytest.mark.parametrize("edit,match", [
    (lambda h, size: h["tensors"]["a.f32"].update(offset=size), "outside the file"),
    (lambda h, size: h["tensors"]["a.f32"].update(offset=h["tensors"]["a.f32"]["offset"] + 8), "aligned"),
    (lambda h, size: h["tensors"]["d.q8"].update(nbytes=12), "needed"),
    (lambda h, size: h["tensors"]["e.q4"].update(type="q5"), "unknown type"),
    (lambda h, size: h["files"]["tokenizer.json"].update(nbytes=size), "outside the file"),
    (lambda h, size: h["experts"].update(count=1000), "outside the file"),
    (lambda h, size: h["experts"]["layout"]["down"].update(offset=1 << 30), "outside its blob"),
    (lambda h, size: h.pop("tensors"), "lacks"),
])
def test_bad_header_entries(ef_file, edit, match):
    path = ef_file[0]
    data, header, off = _header(path)
    edit(header, len(data))
    _rewrite(path, data, header, off)
    with pytest.raises(FormatError, match=match):
        eff.EfFile(path)


@pytest.mark.parametrize("where", ["tensor", "expert", "file"])
def test_verify_names_a_flipped_byte(ef_file, where):
    path = ef_file[0]
    ef = eff.EfFile(path)
    off = {"tensor": ef.tensors["d.q8"].offset + 3, "expert": ef.expert_offset(1, 2) + 17,
           "file": ef.files["tokenizer.json"]["offset"] + 1}[where]
    ef.close()
    data = bytearray(path.read_bytes())
    data[off] ^= 0x40
    path.write_bytes(bytes(data))
    bad = eff.EfFile(path).verify()
    assert bad == [{"tensor": "d.q8", "expert": "expert 1.2", "file": "file tokenizer.json"}[where]]
