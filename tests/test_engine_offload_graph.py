"""Which offloaded Engine decodes go through the run-ahead graph (gpu_step.OffloadStepper), on the
CPU: the config / route_bias rule (offload_graph_note) and the CPU engine staying eager. The graph
path itself runs on the GPU (tests/test_gpu_engine.py)."""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine.engine import Engine  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.gpu_step import offload_graph_note  # noqa: E402
from efengine.offload_gpu_bench import _graph_ok  # noqa: E402


def test_offload_graph_note_by_family(tiny_ef):
    """The offloaded graph takes what the bench's segmented graph takes (GQA, no qk-norm, MoE);
    every refusal says why and that decode stays eager."""
    expect = {"mixtral": "", "qwen2_moe": "", "qwen3_moe": "qk-norm", "olmoe": "qk-norm",
              "deepseek_v2": "qk-norm"}
    for name, why in expect.items():
        with EfFile(tiny_ef(name)) as ef:
            cfg = ef.config
        note = offload_graph_note(cfg)
        assert (note == "") == _graph_ok(cfg), name
        assert why in note and (note == "" or note.startswith("eager decode")), (name, note)
        dense = dataclasses.replace(cfg, moe_layers=())
        assert "routed experts" in offload_graph_note(dense) and not _graph_ok(dense)


def test_route_bias_keeps_offload_decode_eager(tiny_ef):
    with EfFile(tiny_ef("mixtral")) as ef:
        cfg = ef.config
    assert offload_graph_note(cfg, 0.0) == ""
    assert "route_bias" in offload_graph_note(cfg, 0.1)


@pytest.mark.parametrize("kw", [{"policy": "ondemand"}, {"policy": "expertflow", "route_bias": 0.1}])
def test_cpu_offload_engine_decodes_eagerly(tiny_ef, kw):
    """No graph on the CPU, and no note either: there is no graph path to fall back from."""
    with Engine(tiny_ef("mixtral"), device="cpu", **kw) as eng:
        assert eng.decode_mode == "eager" and eng.graph_note == ""
        eng.generate("Once upon a time", max_tokens=4, temperature=0, ignore_eos=True)
        assert eng.stepper is None and eng.stats.decode_steps == 3


class _Stepper:
    """Stands in for OffloadStepper on the CPU: Model.forward one token a step (advancing the cache
    as a graph step does); step number `fail` raises as a timed-out gate does, leaving the cache."""

    def __init__(self, eng, fail: int):
        self.eng, self.cache, self.fail, self.steps = eng, eng._cache, fail, 0

    def step(self, token: int):
        import numpy as np
        from efengine.errors import ConfigError
        self.steps += 1
        if self.steps == self.fail:
            raise ConfigError("a run-ahead gate waited too long for an expert's copy")
        return self.eng.model.forward(np.array([token]), self.cache, last_only=True)[0]


def test_failed_offload_graph_step_falls_back_losslessly(tiny_ef):
    """A graph-offload step that fails is redone by Model.forward (same tokens as an eager engine),
    with a warning and graph_note, and decode stays eager; a resident graph's failure propagates."""
    from efengine.errors import ConfigError
    path = tiny_ef("mixtral")
    with Engine(path, device="cpu", policy="ondemand") as ref, Engine(path, device="cpu", policy="ondemand") as eng:
        want = ref.generate("Once upon a time", max_tokens=10, temperature=0, ignore_eos=True)
        eng._graph = "graph-offload"
        made = []
        eng._make_stepper = lambda: made.append(_Stepper(eng, fail=4)) or made[-1]
        with pytest.warns(UserWarning, match="graph-offload step failed"):
            got = eng.generate("Once upon a time", max_tokens=10, temperature=0, ignore_eos=True)
        assert got == want and eng.last_tokens == ref.last_tokens and len(made) == 1
        assert eng.decode_mode == "eager" and "graph-offload step failed" in eng.graph_note and eng.stepper is None
        assert eng._cache.pos == len(eng._cached) == ref._cache.pos
        eng._graph, made[:] = "graph", []
        eng.reset()
        eng._make_stepper = lambda: _Stepper(eng, fail=1)
        with pytest.raises(ConfigError, match="gate"):
            eng.generate("Once upon a time", max_tokens=4, temperature=0, ignore_eos=True)
