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
