"""efengine/host_bench.py on the CPU: its temp file, page-cache control, the numpy staging ways and
the JSON. (The CUDA ways run on the GPU machine: python -m efengine.host_bench.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from efengine import host_bench

BLOB = 1 << 20


def test_make_file_and_page_cache(tmp_path):
    path = host_bench.make_file(tmp_path, 5, BLOB, seed=3)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    assert mm.size == 5 * BLOB
    stamps = [int(np.frombuffer(bytes(mm[k * BLOB:k * BLOB + 8]), dtype=np.int64)[0]) for k in range(5)]
    assert stamps == [0, 1, 2, 3, 4]                               # blobs differ
    assert np.array_equal(mm[8:BLOB], mm[BLOB + 8:2 * BLOB])       # one random block behind them
    int(mm[::4096].sum())
    assert host_bench.cached_fraction(mm) in (None, 1.0)           # just read: every page cached
    del mm
    if host_bench.drop_cache(path) and host_bench.fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlay"):
        frac = host_bench.cached_fraction(np.memmap(path, dtype=np.uint8, mode="r"))
        assert frac is None or frac < 0.5


def test_numpy_stage_copies_everything():
    blobs = [np.full(BLOB, k, dtype=np.uint8) for k in range(6)]
    assert host_bench.numpy_stage(blobs, 2, ring=2) > 0


def test_cpu_run_reports_every_way(tmp_path):
    res = host_bench.run(6 * BLOB / 1e9, blob_nbytes=BLOB, threads=[1, 2], folder=str(tmp_path), cpu=True,
                         log=lambda m: None)
    assert res["backend"] == "numpy" and res["blobs"] == 6 and res["bytes"] == 6 * BLOB
    rows = {(r["method"], r.get("cache")) for r in res["methods"]}
    assert rows == {("numpy_stage_1", "cold"), ("numpy_stage_1", "warm"), ("numpy_stage_2", "cold"),
                    ("numpy_stage_2", "warm"), ("numpy_ram", None)}
    assert all(r["GBps"] > 0 for r in res["methods"])
    warm = [r for r in res["methods"] if r.get("cache") == "warm"]
    assert all(r["cached_before"] in (None, 1.0) for r in warm)
    assert set(res["fastest"]) == {"cold", "warm"}
    assert res["fastest"]["warm"]["method"].startswith("numpy_stage")
    assert not list(tmp_path.iterdir())                            # the temp file is gone


def test_cli_json_and_errors(tmp_path, capsys):
    out = tmp_path / "hb.json"
    rc = host_bench.main(["--gb", str(3 * BLOB / 1e9), "--blob-mb", str(BLOB / 1e6), "--threads", "1",
                          "--dir", str(tmp_path), "--cpu", "--json", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed and printed["blobs"] == 3
    assert host_bench.main(["--gb", "0.000001", "--cpu", "--dir", str(tmp_path)]) == 1
    assert "need >= 2" in capsys.readouterr().err
    assert host_bench.main(["--threads", "x", "--cpu"]) == 2


@pytest.mark.gpu
def test_cuda_ways(tmp_path):
    cp = pytest.importorskip("cupy")
    if not cp.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    res = host_bench.run(0.2, blob_nbytes=16 * BLOB, threads=[1, 4], folder=str(tmp_path), log=lambda m: None)
    names = {r["method"] for r in res["methods"]}
    assert {"pinned_tier", "staging_1", "staging_4", "registered"} <= names
    tier = next(r for r in res["methods"] if r["method"] == "pinned_tier")
    assert tier["direct_copies"] == res["blobs"] and tier["GBps"] > 1
    st = next(r for r in res["methods"] if r["method"] == "staging_4")
    assert st["staged_copies"] == res["blobs"]
