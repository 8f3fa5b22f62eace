"""efconvert on tiny HF checkpoints: exact round trips, quantization reports, shards, fused experts,
random shapes, the CLI and `efengine info`."""
import json
import shutil

import numpy as np
import pytest

import efmodels
import tiny_models
from efconvert import shapes
from efconvert.cli import main as efconvert_main
from efconvert.convert import convert_hf
from efconvert.hf import Checkpoint, save_arrays
from efengine import quant
from efengine.format import EfFile
from efengine.info import main as info_main

FAMILIES = list(tiny_models.configs())


def hf_tensors(folder, bits=False):
    """Every tensor of an HF folder, read with torch's safetensors (independent of our reader).
    bits=True: 16-bit floats as their raw uint16 bits, else float32."""
    import torch
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        for n, t in load_file(p).items():
            if bits and t.dtype in (torch.bfloat16, torch.float16):
                out[n] = t.view(torch.int16).numpy().view(np.uint16)
            else:
                out[n] = t.float().numpy()
    return out


def expert_names(ef, family, layer, e):
    return {p: tmpl.format(l=layer, e=e) for p, tmpl in family.hf_expert_names.items()}


def assert_same_as_hf(ef, hf, family, bits=False):
    """Every dense tensor and every expert of ef equals the HF tensor it came from, exactly."""
    cfg = ef.config
    for canon, shape, _ in efmodels.expected_tensors(cfg):
        ref = hf[efmodels.hf_name(family, canon)]
        widened = ef.tensors[canon].type == "f32"
        got = ef.raw(canon).view(np.uint16).reshape(shape) if bits and not widened else ef.load(canon)
        if bits and widened:                               # norms are widened to f32: exact
            bf16 = ef.meta["source"]["dtypes"] == ["BF16"]
            ref = quant.bf16_to_f32(ref) if bf16 else ref.view(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, ref, err_msg=canon)
    lay = ef.expert_layout
    for layer in cfg.moe_layers:
        for e in range(cfg.n_experts):
            names = expert_names(ef, family, layer, e)
            if bits:
                blob = ef.expert_blob(layer, e)
                got = {p: blob[t.offset:t.offset + t.nbytes].view(np.uint16).reshape(t.shape) for p, t in lay.items()}
            else:
                got = ef.expert_weights(layer, e)
            for p in ("gate", "up", "down"):
                np.testing.assert_array_equal(got[p], hf[names[p]], err_msg=f"expert {layer}.{e} {p}")
    n_experts = len(cfg.moe_layers) * cfg.n_experts * 3
    assert len(hf) == len(ef.tensors) + n_experts, "every HF tensor lands in the .ef exactly once"


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_round_trip_is_exact(name, tiny_ckpt, tiny_ef):
    folder = tiny_ckpt(name)
    ef = EfFile(tiny_ef(name))
    ck = Checkpoint(folder)
    assert ef.config == ck.config and ef.arch == ck.family.name
    assert_same_as_hf(ef, hf_tensors(folder), ck.family)
    assert ef.verify() == []
    assert set(ef.meta["quant_error"].values()) == {0.0}
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "config.json"):
        assert ef.file(f) == (folder / f).read_bytes(), f
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tok = ef.meta["tokenizer"]
    assert tok["chat_template"] == tc["chat_template"] and tok["eos_token"] == tc["eos_token"]
    assert tok["bos_token"] == tc["bos_token"] and tok["add_bos_token"] == tc["add_bos_token"]
    assert ef.meta["quantization"]["experts"] == "f32"
    assert ef.meta["source"]["architecture"] == ck.hf_config["architectures"][0]


@pytest.mark.parametrize("name,dtype,stored", [("mixtral", "bfloat16", "bf16"), ("deepseek_v2", "bfloat16", "bf16"),
                                               ("qwen2_moe", "float16", "f16")])
def test_16_bit_passthrough_keeps_the_bits(name, dtype, stored, tiny_ckpt, tmp_path):
    folder = tiny_ckpt(name, dtype=dtype)
    ef = EfFile(convert_hf(folder, tmp_path / "m.ef", experts=stored, dense=stored, progress=False))
    assert {t.type for t in ef.expert_layout.values()} == {stored}
    assert_same_as_hf(ef, hf_tensors(folder, bits=True), Checkpoint(folder).family, bits=True)
    assert set(ef.meta["quant_error"].values()) == {0.0}


def test_bf16_to_f32_is_exact(tiny_ckpt, tmp_path):
    folder = tiny_ckpt("qwen3_moe", dtype="bfloat16")
    ef = EfFile(convert_hf(folder, tmp_path / "m.ef", experts="f32", dense="f32", progress=False))
    assert_same_as_hf(ef, hf_tensors(folder), Checkpoint(folder).family)


def test_sharded_checkpoint_gives_the_same_file(tiny_ckpt, tiny_ef, tmp_path):
    folder = tiny_ckpt("qwen2_moe", max_shard_size="300KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    sharded = EfFile(convert_hf(folder, tmp_path / "s.ef", experts="f32", dense="f32", progress=False))
    single = EfFile(tiny_ef("qwen2_moe"))
    assert sharded.header["tensors"] == single.header["tensors"]
    assert sharded.header["experts"] == single.header["experts"]   # crc32 of every blob included
    assert_same_as_hf(sharded, hf_tensors(folder), Checkpoint(folder).family)


def test_quantized_precision_per_class_and_error_report(tiny_ckpt, tiny_ef):
    name = "qwen2_moe"
    ef = EfFile(tiny_ef(name, experts="q4", dense="q8", embed="f16"))
    cfg, fam, hf = ef.config, Checkpoint(tiny_ckpt(name)).family, hf_tensors(tiny_ckpt(name))
    want = {"experts": "q4", "dense": "q8", "embed": "f16", "norm": "f32", "router": "f32"}
    err, ref = {c: 0.0 for c in want}, {c: 0.0 for c in want}
    for canon, _, cls in efmodels.expected_tensors(cfg):
        assert ef.tensors[canon].type == want[cls], canon
        r, g = hf[efmodels.hf_name(fam, canon)].astype(np.float64), ef.load(canon)
        err[cls] += ((g - r) ** 2).sum()
        ref[cls] += (r ** 2).sum()
    for layer in cfg.moe_layers:
        for e in range(cfg.n_experts):
            got = ef.expert_weights(layer, e)
            for p, n in expert_names(ef, fam, layer, e).items():
                err["experts"] += ((got[p] - hf[n].astype(np.float64)) ** 2).sum()
                ref["experts"] += (hf[n].astype(np.float64) ** 2).sum()
    report = ef.meta["quant_error"]
    for cls in want:
        measured = float(np.sqrt(err[cls] / ref[cls]))
        assert report[cls] == pytest.approx(measured, rel=1e-4, abs=1e-12), cls
    assert 0.01 < report["experts"] < 0.1 and 0.001 < report["dense"] < 0.01
    assert report["norm"] == report["router"] == 0.0 and 0 < report["embed"] < 1e-3
    assert {t.type for t in ef.expert_layout.values()} == {"q4"}


def test_thread_count_does_not_change_a_byte(tiny_ckpt, tmp_path):
    folder = tiny_ckpt("deepseek_v2_grouped")
    a = convert_hf(folder, tmp_path / "a.ef", experts="q4", dense="q8", progress=False, threads=1)
    b = convert_hf(folder, tmp_path / "b.ef", experts="q4", dense="q8", progress=False, threads=3)
    assert a.read_bytes() == b.read_bytes()


def fuse_experts(src, dst, rename_moe=False):
    """Rewrite a folder with transformers 5's fused expert tensors (and Mixtral's mlp naming)."""
    shutil.copytree(src, dst)
    for p in dst.glob("*.safetensors"):
        p.unlink()
    hf = hf_tensors(src)
    cfg = Checkpoint(src).config
    fam = Checkpoint(src).family
    out = {}
    for layer in cfg.moe_layers:
        names = [expert_names(None, fam, layer, e) for e in range(cfg.n_experts)]
        prefix = fam.hf_expert_names["gate"].split(".{e}.")[0].format(l=layer)
        if rename_moe:
            prefix = prefix.replace("block_sparse_moe", "mlp")
        out[prefix + ".gate_up_proj"] = np.stack([np.concatenate([hf[n["gate"]], hf[n["up"]]]) for n in names])
        out[prefix + ".down_proj"] = np.stack([hf[n["down"]] for n in names])
        for n in names:
            for v in n.values():
                del hf[v]
    for n, v in hf.items():
        out[n.replace(".block_sparse_moe.", ".mlp.") if rename_moe else n] = v
    save_arrays(dst / "model.safetensors", {n: ("F32", v) for n, v in out.items()})
    return dst


@pytest.mark.parametrize("name,rename", [("mixtral", True), ("qwen3_moe", False)])
def test_fused_experts_of_transformers_5(name, rename, tiny_ckpt, tiny_ef, tmp_path):
    fused = fuse_experts(tiny_ckpt(name), tmp_path / "fused", rename_moe=rename)
    ef = EfFile(convert_hf(fused, tmp_path / "f.ef", experts="f32", dense="f32", progress=False))
    ref = EfFile(tiny_ef(name))
    assert ef.header["tensors"] == ref.header["tensors"] and ef.header["experts"] == ref.header["experts"]


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_converts_and_reports(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "m.ef"
    assert efconvert_main([str(tiny_ckpt("olmoe")), str(out), "--experts", "q4", "--dense", "q8", "--group", "32"]) == 0
    err = capsys.readouterr().err
    assert "wrote" in err and "experts  q4" in err and "Traceback" not in err
    ef = EfFile(out)
    assert ef.expert_layout["gate"].group == 32 and ef.meta["quantization"]["group"] == 32


def test_cli_lists_shapes(capsys):
    assert efconvert_main(["--list-shapes"]) == 0
    listed = capsys.readouterr().out
    for name in ("mixtral-8x7b", "qwen1.5-moe-a2.7b", "deepseek-v2-lite", "qwen3-30b-a3b", "olmoe-1b-7b"):
        assert name in listed


@pytest.mark.parametrize("name,total,active", [("mixtral-8x7b", 46.7, 12.9), ("qwen1.5-moe-a2.7b", 14.3, 2.7),
                                               ("deepseek-v2-lite", 15.7, 2.7), ("qwen3-30b-a3b", 30.5, 3.3),
                                               ("olmoe-1b-7b", 6.9, 1.3)])
def test_shapes_have_the_published_sizes(name, total, active):
    _, cfg, _ = shapes.shape_config(name)
    n, a = shapes.n_params(cfg)
    assert n / 1e9 == pytest.approx(total, rel=0.01) and a / 1e9 == pytest.approx(active, rel=0.05)


# ---- random shapes -------------------------------------------------------------------------------

def check_random(path, vocab):
    from jinja2 import Template
    from tokenizers import Tokenizer

    ef = EfFile(path)
    assert ef.verify() == []
    for canon, t in ef.tensors.items():
        w = ef.load(canon)
        assert np.isfinite(w).all() and np.abs(w).max() > 0, canon
        expect = 1.0 if canon.endswith("norm.weight") else 0.0
        assert abs(float(w.mean()) - expect) < 0.01 and (expect or 0.01 < float(w.std()) < 0.04), canon
    for layer in ef.expert_layers[:1]:
        for e in (0, ef.n_experts - 1):
            for p, w in ef.expert_weights(layer, e).items():
                assert np.isfinite(w).all() and 0.01 < float(w.std()) < 0.04, (layer, e, p)
    a, b = ef.expert_weights(ef.expert_layers[0], 0), ef.expert_weights(ef.expert_layers[-1], 1)
    assert not np.array_equal(a["gate"], b["gate"])
    tok = Tokenizer.from_str(ef.file("tokenizer.json").decode())
    assert tok.get_vocab_size() == vocab == ef.config.vocab_size
    text = "Hello, wörld! 日本"
    assert tok.decode(tok.encode(text).ids) == text
    meta = ef.meta["tokenizer"]
    chat = Template(meta["chat_template"]).render(messages=[{"role": "user", "content": "hi"}],
                                                  add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.token_to_id(meta["eos_token"]) == meta["eos_token_id"]
    return ef


def test_random_full_size_shape_truncated(tmp_path):
    out = tmp_path / "r.ef"
    args = ["--random", "olmoe-1b-7b", str(out), "--layers", "1", "--experts", "q4", "--dense", "q4"]
    assert efconvert_main(args) == 0
    ef = check_random(out, 50304)
    assert ef.config.n_layers == 1 and ef.n_experts == 64 and ef.expert_layout["gate"].shape == (1024, 2048)
    ef.close()
    out.unlink()                         # 0.4 GB: do not leave it in pytest's kept temp folders


@pytest.mark.parametrize("experts,dense", [("q8", "f16"), ("bf16", "f32")])
def test_random_every_type(experts, dense, tmp_path, monkeypatch):
    small = dict(shapes.SHAPES["deepseek-v2-lite"], vocab_size=1000, hidden_size=256, moe_intermediate_size=96,
                 intermediate_size=384, n_routed_experts=8, num_experts_per_tok=2, num_hidden_layers=3,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_attention_heads=4,
                 num_key_value_heads=4)
    monkeypatch.setitem(shapes.SHAPES, "small-test", small)
    from efconvert.random_model import write_random
    ef = check_random(write_random("small-test", tmp_path / "r.ef", experts=experts, dense=dense, progress=False), 1000)
    assert {t.type for t in ef.expert_layout.values()} == {experts}
    assert ef.tensors["blk.0.attn_kv_b.weight"].type == dense and ef.tensors["blk.0.attn_norm.weight"].type == "f32"


# ---- efengine info -------------------------------------------------------------------------------

def test_info_text_and_json(tiny_ef, capsys):
    path = tiny_ef("deepseek_v2", experts="q4", dense="q8")
    assert info_main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "deepseek_v2" in text and "8 per layer in 2 MoE layers" in text and "total" in text
    assert info_main([str(path), "--json", "--verify"]) == 0
    s = json.loads(capsys.readouterr().out)
    ef = EfFile(path)
    assert s["experts"]["blob_bytes"] == ef.blob_nbytes and s["verify"] == {"ok": True, "bad": []}
    assert s["classes"]["experts"]["types"] == ["q4"] and s["classes"]["norm"]["types"] == ["f32"]
    assert sum(c["bytes"] for c in s["classes"].values()) + sum(s["files"].values()) <= s["bytes"]


def test_info_verify_names_a_flipped_byte(tiny_ef, tmp_path, capsys):
    path = tmp_path / "m.ef"
    shutil.copy(tiny_ef("mixtral"), path)
    ef = EfFile(path)
    off = ef.expert_offset(2, 3) + 100
    data = bytearray(path.read_bytes())
    data[off] ^= 1
    path.write_bytes(bytes(data))
    assert info_main([str(path), "--verify"]) == 1
    assert "expert 2.3" in capsys.readouterr().out


def test_info_refuses_a_foreign_file(tmp_path, capsys):
    p = tmp_path / "x.ef"
    p.write_bytes(b"GGUF" + bytes(100))
    assert info_main([str(p)]) == 1
    assert "not a .ef file" in capsys.readouterr().err
