"""Bad input to efconvert: our own exception with a clear message, no output file, exit code 1
(130 for Ctrl-C), never a traceback."""
import errno
import json
import shutil

import numpy as np
import pytest

from efconvert import convert as conv
from efconvert.cli import main as efconvert_main
from efconvert.convert import OutputError, convert_hf
from efconvert.hf import save_arrays
from efengine import quant
from efengine.errors import CheckpointError, ConfigError, EfError


@pytest.fixture
def ckpt(tiny_ckpt, tmp_path):
    """A private copy of a tiny f32 Mixtral folder, free to break."""
    return shutil.copytree(tiny_ckpt("mixtral"), tmp_path / "ckpt")


def tensors(folder):
    from safetensors.numpy import load_file
    return load_file(folder / "model.safetensors")


def rewrite(folder, ts):
    save_arrays(folder / "model.safetensors", {n: ("F32", v) for n, v in ts.items()})


def edit_config(folder, **changes):
    c = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (folder / "config.json").write_text(json.dumps(c))


def fails(folder, out_dir, exc, *patterns, capsys=None):
    """convert_hf raises exc matching every pattern, leaves out_dir empty, and the CLI exits 1."""
    out = out_dir / "out" / "m.ef"
    with pytest.raises(exc) as info:
        convert_hf(folder, out, progress=False)
    for p in patterns:
        assert p in str(info.value), (p, str(info.value))
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    if capsys is not None:
        capsys.readouterr()
        assert efconvert_main([str(folder), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("efconvert: error:") and "Traceback" not in err and len(err.splitlines()) == 1
        assert not out.exists()
    return str(info.value)


# ---- config.json ---------------------------------------------------------------------------------

def test_missing_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").unlink()
    fails(ckpt, tmp_path, ConfigError, "config.json is missing", capsys=capsys)


def test_malformed_config(ckpt, tmp_path, capsys):
    (ckpt / "config.json").write_text("{not json")
    fails(ckpt, tmp_path, ConfigError, "config.json", "not valid JSON", capsys=capsys)


def test_config_without_architectures(ckpt, tmp_path):
    edit_config(ckpt, architectures=None)
    fails(ckpt, tmp_path, ConfigError, "architectures")


def test_config_lacking_a_key(ckpt, tmp_path):
    edit_config(ckpt, num_local_experts=None)
    fails(ckpt, tmp_path, ConfigError, "num_local_experts")


def test_unsupported_moe_architecture_names_supported_ones(ckpt, tmp_path, capsys):
    edit_config(ckpt, architectures=["DbrxForCausalLM"])
    msg = fails(ckpt, tmp_path, ConfigError, "DbrxForCausalLM", "not supported", capsys=capsys)
    assert "MixtralForCausalLM" in msg and "Qwen3MoeForCausalLM" in msg


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "GPT2LMHeadModel"])
def test_dense_model_is_named_dense(ckpt, tmp_path, arch, capsys):
    edit_config(ckpt, architectures=[arch], num_local_experts=None, num_experts_per_tok=None)
    fails(ckpt, tmp_path, ConfigError, arch, "dense model", "--moefy", capsys=capsys)


# ---- tensors -------------------------------------------------------------------------------------

def test_missing_tensors_are_named(ckpt, tmp_path, capsys):
    ts = tensors(ckpt)
    del ts["model.layers.1.block_sparse_moe.experts.2.w3.weight"], ts["model.layers.0.self_attn.k_proj.weight"]
    rewrite(ckpt, ts)
    fails(ckpt, tmp_path, CheckpointError, "2 tensors missing", "model.layers.1.block_sparse_moe.experts.2.w3.weight",
          "model.layers.0.self_attn.k_proj.weight", capsys=capsys)


def test_leftover_tensors_are_named(ckpt, tmp_path, capsys):
    ts = tensors(ckpt)
    ts["model.layers.0.mlp.mystery.weight"] = np.zeros((2, 2), np.float32)
    rewrite(ckpt, ts)
    fails(ckpt, tmp_path, CheckpointError, "unexpected", "model.layers.0.mlp.mystery.weight", capsys=capsys)


def test_harmless_extras_are_ignored(ckpt, tmp_path):
    ts = tensors(ckpt)
    ts["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    rewrite(ckpt, ts)
    assert convert_hf(ckpt, tmp_path / "m.ef", experts="f32", dense="f32", progress=False).exists()


def test_shape_mismatch_names_tensor_and_shapes(ckpt, tmp_path, capsys):
    ts = tensors(ckpt)
    ts["model.layers.2.block_sparse_moe.experts.1.w2.weight"] = np.zeros((64, 40), np.float32)
    rewrite(ckpt, ts)
    fails(ckpt, tmp_path, CheckpointError, "model.layers.2.block_sparse_moe.experts.1.w2.weight", "[64, 40]",
          "expected [64, 48]", capsys=capsys)


def test_non_float_weights(ckpt, tmp_path):
    ts = tensors(ckpt)
    arrays = {n: ("F32", v) for n, v in ts.items()}
    arrays["model.norm.weight"] = ("I32", ts["model.norm.weight"].view(np.int32))
    save_arrays(ckpt / "model.safetensors", arrays)
    fails(ckpt, tmp_path, CheckpointError, "model.norm.weight", "I32")


# ---- safetensors files ---------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated_safetensors(ckpt, tmp_path, keep, capsys):
    p = ckpt / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:keep])
    fails(ckpt, tmp_path, CheckpointError, "model.safetensors", "truncated" if keep != 100 else "", capsys=capsys)


def test_corrupt_safetensors_header(ckpt, tmp_path):
    p = ckpt / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"
    p.write_bytes(bytes(data))
    fails(ckpt, tmp_path, CheckpointError, "model.safetensors", "corrupt")


def test_no_safetensors_at_all(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    fails(ckpt, tmp_path, CheckpointError, "no .safetensors", "pytorch_model.bin")


def test_index_naming_a_missing_shard(tiny_ckpt, tmp_path):
    folder = shutil.copytree(tiny_ckpt("qwen2_moe", max_shard_size="300KB"), tmp_path / "ckpt")
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.unlink()
    fails(folder, tmp_path, CheckpointError, shard.name, "missing")


def test_source_not_a_folder(tmp_path):
    fails(tmp_path / "nowhere", tmp_path, CheckpointError, "not a folder")


# ---- options and output --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,flag", [({"experts": "q3"}, "--experts"), ({"dense": "int8"}, "--dense"),
                                     ({"embed": "fp8"}, "--embed"), ({"group": 33}, "--group")])
def test_bad_options(ckpt, tmp_path, kw, flag):
    with pytest.raises(ConfigError, match=flag):
        convert_hf(ckpt, tmp_path / "m.ef", progress=False, **kw)
    assert not (tmp_path / "m.ef").exists()


def test_bad_flag_is_a_usage_error(ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        efconvert_main([str(ckpt), str(tmp_path / "m.ef"), "--experts", "q3"])
    assert e.value.code == 2


def test_unwritable_output_folder(ckpt, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        convert_hf(ckpt, blocker / "m.ef", progress=False)
    assert efconvert_main([str(ckpt), str(blocker / "m.ef")]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_output_is_a_folder(ckpt, tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        convert_hf(ckpt, tmp_path, progress=False)


def test_disk_full(ckpt, tmp_path, monkeypatch, capsys):
    from efengine import format as eff
    real = eff.Writer.write_expert

    def full(self, i, e, blob, crc=None):
        if (i, e) == (1, 2):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, i, e, blob, crc)
    monkeypatch.setattr(eff.Writer, "write_expert", full)
    out_dir = tmp_path / "out"
    fails(ckpt, tmp_path, OutputError, "no space left on device", capsys=capsys)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_ctrl_c_leaves_no_output_and_exits_130(ckpt, tmp_path, monkeypatch, capsys):
    real, calls = quant.quantize, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(quant, "quantize", interrupted)
    out = tmp_path / "out" / "m.ef"
    with pytest.raises(KeyboardInterrupt):
        convert_hf(ckpt, out, progress=False)
    assert list(out.parent.iterdir()) == []
    calls.clear()
    capsys.readouterr()
    assert efconvert_main([str(ckpt), str(out)]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(out.parent.iterdir()) == []


def test_error_classes_are_efengine_errors():
    assert issubclass(OutputError, EfError) and conv.OutputError is OutputError
