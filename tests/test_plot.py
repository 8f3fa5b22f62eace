"""efengine/plot.py: timeline and policy plots drawn with matplotlib's Agg backend into files, from a
synthetic timeline, from the H100 O1 result in docs/results, and from the CPU trace bench."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from efengine.errors import EfError

pytest.importorskip("matplotlib")

from efengine import plot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
O1 = ROOT / "docs" / "results" / "o1_h100_graph.json"


def synthetic_timeline(steps=2, layers=4):
    ev, t = [], 0.0
    for s in range(steps):
        for l in range(layers):
            ev.append({"step": s, "layer": l, "kind": "copy", "t0": t, "t1": t + 2e-3, "expert": l * 8 + s})
            ev.append({"step": s, "layer": l, "kind": "stall", "t0": t + 1e-4, "t1": t + 2e-3, "expert": l * 8 + s})
            ev.append({"step": s, "layer": l, "kind": "compute", "t0": t + 2e-3, "t1": t + 2.5e-3, "expert": None})
            t += 2.5e-3
    return ev


def _png(p: Path) -> bool:
    return p.is_file() and p.stat().st_size > 2000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_png(tmp_path):
    out = plot.plot_timeline(synthetic_timeline(), tmp_path / "sub" / "t.png", "synthetic")
    assert out == tmp_path / "sub" / "t.png" and _png(out)
    assert not list(tmp_path.glob("sub/*.tmp.png"))          # written through a temp name


def test_bad_timelines_are_clear_errors(tmp_path):
    with pytest.raises(EfError, match="no events"):
        plot.plot_timeline([], tmp_path / "t.png")
    with pytest.raises(EfError, match="event 1"):
        plot.plot_timeline([synthetic_timeline()[0], {"kind": "nap", "t0": 0}], tmp_path / "t.png")
    assert not (tmp_path / "t.png").exists()


def test_o1_result_from_the_h100(tmp_path):
    res = json.loads(O1.read_text())
    cells, title = plot.cells_of(res)
    assert len(cells) == len(res["offload"]["cells"]) and "H100" in title
    timed = [c["policy"] for c in res["offload"]["cells"] if c.get("timeline")]
    files = plot.plot_result(res, tmp_path)
    assert files[0] == tmp_path / "policies.png" and all(map(_png, files))
    assert [f.name for f in files[1:]] == [f"timeline_{p}_25.png" for p in timed]   # one a policy
    for c in res["offload"]["cells"]:
        c.pop("timeline", None)
    assert plot.plot_result(res, tmp_path / "n") == [tmp_path / "n" / "policies.png"]
    res["offload"]["cells"][0]["timeline"] = synthetic_timeline(3, 32)
    files = plot.plot_result(res["offload"], tmp_path / "o")        # the "offload" part alone
    assert [f.name for f in files] == ["policies.png", "timeline_ondemand_25.png"] and all(map(_png, files))


def test_cli_redraws_a_result(tmp_path, capsys):
    assert plot.main([str(O1), "--out", str(tmp_path)]) == 0
    assert _png(tmp_path / "policies.png") and "policies.png" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text('{"nothing": 1}')
    assert plot.main([str(bad), "--out", str(tmp_path)]) == 1
    assert "no offload cells" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1


def test_offload_bench_timed_timelines_and_plots(tmp_path, capsys):
    """The CPU trace bench records timelines through the runtime and draws them."""
    import inspect

    from efengine import offload_bench
    from efengine.offload.replay import replay_trace
    if "timeline" not in inspect.signature(replay_trace).parameters:
        pytest.skip("this runtime does not record timelines yet (replay_trace(timeline=N))")
    rc = offload_bench.main(["--trace", "gsm8k_2", "--tokens", "12", "--cache", "0.5", "--policies",
                             "ondemand,belady", "--foresight", "", "--timed", "--timeline", "2",
                             "--plot", str(tmp_path)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    row = res["results"][0]["caches"][0]
    for pol in ("ondemand", "expertflow"):
        t = row["timed"][pol]
        tl = t["timeline"]
        assert {e["step"] for e in tl} == {0, 1} and {e["kind"] for e in tl} >= {"compute", "copy"}
        assert all(e["t1"] >= e["t0"] >= 0 for e in tl)
        assert t["oracle_bound_s"] > 0
        copies = sum(1 for e in tl if e["kind"] == "copy")
        assert copies > 0                                  # a cold cache copies on its first steps
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["policies.png", "timeline_expertflow_50.png", "timeline_ondemand_50.png"]
    assert all(_png(tmp_path / n) for n in names)


def test_missing_matplotlib_is_a_clear_error(monkeypatch):
    import builtins
    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(EfError, match=r"pip install efengine\[plot\]"):
        plot.check()


def test_bench_plot_flag_parses():
    from efengine import bench
    a = bench.parse(["--offload", "--plot", "out", "--policies", "ondemand"])
    assert a.plot == "out" and a.offload and a.host_bench is None
