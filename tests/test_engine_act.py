"""Engine(act=...) and `--act` on the CPU: the activation format reaches the backend that decodes.

NumpyBackend(act="int8") is the twin of the GPU's int8 path (ops/act_int8.py): decode steps of
quantized matrices take fake-quantized activations. The model is a tiny Mixtral with q4 experts and
q8 dense matrices (group 32, a group the GPU keeps quantized), so int8 changes the numbers.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine import cli, quant  # noqa: E402
from efengine.engine import Engine  # noqa: E402
from efengine.errors import ConfigError  # noqa: E402
from efengine.gpu_step import graph_config  # noqa: E402
from efengine.ops import get_backend  # noqa: E402

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def qmodel(tiny_ef):
    return tiny_ef("mixtral", experts="q4", dense="q8", group=32)


def test_int8_engine_decodes_with_the_int8_twin(qmodel):
    """Greedy tokens of Engine(act="int8") are those of a Model on NumpyBackend(act="int8") run by
    hand (same function, so exactly), and its decode logits are not the f16 engine's."""
    from efengine.format import EfFile
    from efengine.model import Model
    from efengine.ops.numpy_backend import NumpyBackend
    with Engine(qmodel, device="cpu", act="int8") as e8, Engine(qmodel, device="cpu") as e16:
        assert e8.act == "int8" and e8.model.backend.act == "int8" and e16.model.backend.act == "f16"
        assert e8.decode_mode == "eager" and e16.decode_mode == "eager"
        e8.generate(PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        got = list(e8.last_tokens)
        assert e8.stats.generated_tokens == 8 and e8.stats.decode_steps == 7 and e8.stats.decode_s > 0
        assert e8.stepper is None
        ids = e8.tokenize(PROMPT)
        # a short step (<= act_int8.MAX_ROWS rows) takes int8 activations in the int8 engine only
        l8, l16 = e8.logits(ids[:4]), e16.logits(ids[:4])
    assert not np.array_equal(l8, l16)
    assert quant.rel_rms(l16.astype(np.float64), l8.astype(np.float64)) < 0.1      # 0.037 seen; broken ~1
    with EfFile(qmodel) as ef:
        m = Model(ef, NumpyBackend(act="int8"))
        cache = m.new_cache(64)
        logits = m.forward(np.asarray(ids), cache, last_only=True)[-1]
        want = []
        for _ in range(8):
            want.append(int(np.argmax(logits)))
            logits = m.forward(np.asarray(want[-1:]), cache, last_only=True)[-1]
    assert got == want


def test_bad_act_is_a_config_error(qmodel):
    for bad in ("int4", "F16", ""):
        with pytest.raises(ConfigError, match=re.escape(f"activation format {bad!r}")):
            Engine(qmodel, device="cpu", act=bad)
    with pytest.raises(ConfigError, match="int4"):
        get_backend("numpy", act="int4")
    assert get_backend("numpy").act == "f16" and get_backend("numpy", act="int8").act == "int8"


def test_cli_act_option(qmodel, capsys):
    p = cli.build_parser()
    assert p.parse_args(["generate", str(qmodel), "--act", "int8"]).act == "int8"
    assert p.parse_args(["generate", str(qmodel)]).act is None
    assert p.parse_args(["perplexity", str(qmodel), "f.txt", "--act", "f16"]).act == "f16"
    rc = cli.main(["generate", str(qmodel), "--act", "int4", "-p", "x"])
    err = capsys.readouterr().err
    assert rc == 1 and "int4" in err and len(err.strip().splitlines()) == 1


def test_cli_generate_with_int8(qmodel, capsys, monkeypatch):
    import efengine.engine as engine_mod
    seen = []

    class Spy(Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen.append(self.model.backend.act)
    monkeypatch.setattr(engine_mod, "Engine", Spy)
    argv = ["generate", str(qmodel), "-p", PROMPT, "-n", "7", "--temp", "0", "--ignore-eos", "--device", "cpu", "-q"]
    assert cli.main(argv + ["--act", "int8"]) == 0
    out = capsys.readouterr().out
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert seen == ["int8", "f16"]
    with Engine(qmodel, device="cpu", act="int8") as eng:
        assert out == eng.generate(PROMPT, max_tokens=7, temperature=0, ignore_eos=True) + "\n"


def test_graph_config_by_family(tiny_ef):
    """Which configs the Engine sends to the CUDA-graph decode (DecodeGraph: GQA without qk-norm)."""
    from efengine.format import EfFile
    expect = {"mixtral": True, "qwen2_moe": True, "qwen3_moe": False, "deepseek_v2": False}
    for name, ok in expect.items():
        with EfFile(tiny_ef(name)) as ef:
            assert graph_config(ef.config) is ok, name
