"""Host tier (--host-mem): sizing against available RAM, fallbacks with warnings, parallel staging,
the mapped expert region, and lossless offloaded runs whatever the tier (numpy). GPU parts (pinned
tier, staging threads, a registered mapping) are marked gpu."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from efengine.errors import ConfigError
from efengine.format import EfFile
from efengine.offload import store as store_mod
from efengine.offload.store import HostStore, ParallelCopy, open_store, plan_tier

from gpu_check import HAVE_GPU, cp
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]
GiB = 1 << 30


@pytest.fixture(scope="module")
def ef(tiny_ef):
    return EfFile(tiny_ef("mixtral", experts="q4"))


def test_plan_tier_sizes_and_fallbacks():
    avail = 20 * GiB                                     # margin max(2 GiB, 10%) = 2 GiB -> 18 GiB room
    assert plan_tier(None, 10 * GiB, avail) == (10 * GiB, None)      # default: everything fits
    assert plan_tier(0, 10 * GiB, avail) == (0, None)                # --host-mem 0: no tier
    assert plan_tier(30 * GiB, 10 * GiB, avail) == (10 * GiB, None)  # more than all experts: capped
    n, msg = plan_tier(None, 19 * GiB, avail)            # all experts do not fit: staging, said once
    assert n == 0 and "all experts" in msg and "19.00 GiB" in msg and "20.00 GiB" in msg
    n, msg = plan_tier(int(18.5 * GiB), 30 * GiB, avail)
    assert n == 0 and "--host-mem" in msg and "18.50 GiB" in msg and "staging" in msg
    assert plan_tier(5 * GiB, 30 * GiB, avail) == (5 * GiB, None)
    assert plan_tier(5, 30, None)[0] in (0, 5)           # real /proc/meminfo: tiny always fits


def test_mem_available_reads_meminfo():
    a = store_mod.mem_available()
    assert a is None or a > 0
    info = store_mod.mem_info()
    if "MemAvailable" in info:
        assert a == info["MemAvailable"] and info["MemTotal"] >= a


@pytest.mark.parametrize("threads", [1, 3])
def test_parallel_copy(threads):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (9 << 20) + 1234, dtype=np.uint8)  # not a whole number of chunks
    dst = np.zeros(src.size + 100, dtype=np.uint8)
    cp_ = ParallelCopy(threads, min_chunk=1 << 20)
    cp_(dst, src)
    assert np.array_equal(dst[:src.size], src) and not dst[src.size:].any()
    small = np.arange(10, dtype=np.uint8)
    cp_(dst, small)                                      # one chunk: copied inline
    assert np.array_equal(dst[:10], small)
    with pytest.raises(ConfigError, match="destination"):
        cp_(np.zeros(5, np.uint8), small)
    cp_.close()
    with pytest.raises(ConfigError, match="threads"):
        ParallelCopy(0)


def test_failed_tier_allocation_warns_and_stages(ef):
    def refuse(n):
        raise MemoryError("no pinned memory today")
    with pytest.warns(UserWarning, match=r"could not allocate .* GiB .*no pinned memory today.*staging"):
        st = HostStore(ef, host_bytes=4 * ef.blob_nbytes, alloc=refuse)
    assert st.ram is None and st.tier_bytes == 0
    assert np.array_equal(st.blob(1, 2), ef.expert_blob(ef.expert_layers[1], 2))


def test_tier_filled_by_threads_serves_the_same_bytes(ef):
    st = HostStore(ef, host_bytes=3 * ef.blob_nbytes, copy_threads=3)
    for i, e in [(0, 0), (1, 3), (2, 1), (0, 2), (1, 3), (2, 2)]:
        assert np.array_equal(st.blob(i, e), ef.expert_blob(ef.expert_layers[i], e))
    assert st.reads == 5 and st.tier_bytes == 3 * ef.blob_nbytes
    st.close()


def test_mapped_region_is_every_blob_back_to_back(ef):
    st = HostStore(ef)
    region = st.mapped_region()
    assert region is not None and region.nbytes == st.L * st.E * st.blob_nbytes
    for i in range(st.L):
        for e in range(st.E):
            f = i * st.E + e
            assert np.array_equal(region[f * st.blob_nbytes:(f + 1) * st.blob_nbytes],
                                  ef.expert_blob(ef.expert_layers[i], e))


def test_open_store_rules(ef, monkeypatch):
    total = len(ef.expert_layers) * ef.n_experts
    blob = ef.blob_nbytes
    big = 64 * GiB
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # none of these may warn
        assert open_store(ef, None, device_slots=3, available=big).tier_bytes == total * blob
        assert open_store(ef, None, device_slots=total, available=big).tier_bytes == 0   # all resident
        assert open_store(ef, 0, device_slots=3, available=big).tier_bytes == 0
        assert open_store(ef, 6 * blob, device_slots=3, available=big).ram_slots == 6
    with pytest.warns(UserWarning, match="no more than the GPU cache's 4"):
        assert open_store(ef, 4 * blob, device_slots=4, available=big).tier_bytes == 0
    with pytest.warns(UserWarning, match="all experts would take"):
        assert open_store(ef, None, device_slots=3, available=1 << 20).tier_bytes == 0
    monkeypatch.setattr(store_mod, "mem_available", lambda: 1 << 20)
    with pytest.warns(UserWarning, match="--host-mem would take"):
        assert open_store(ef, 6 * blob, device_slots=3).tier_bytes == 0


def _budget(ef, slots):
    from efengine.offload import dense_nbytes
    return dense_nbytes(ef) + slots * ef.blob_nbytes


@pytest.mark.parametrize("host_mem", [None, 0, "5x", "huge"])
def test_engine_host_mem_is_lossless(tiny_ef, ef, host_mem, monkeypatch):
    pytest.importorskip("torch")
    from efengine.engine import Engine
    path = tiny_ef("mixtral", experts="q4")
    with Engine(path, device="cpu") as eng:
        ref = eng.logits([1, 2, 3, 4, 5, 6])
    total = len(ef.expert_layers) * ef.n_experts
    want = {None: total, 0: 0, "5x": 5, "huge": 0}[host_mem]
    arg = {"5x": 5 * ef.blob_nbytes, "huge": 5 * ef.blob_nbytes}.get(host_mem, host_mem)
    if host_mem == "huge":                      # more than this machine's RAM: staged, with a warning
        monkeypatch.setattr(store_mod, "mem_available", lambda: 1 << 20)
        ctx = pytest.warns(UserWarning, match="--host-mem would take")
    else:
        ctx = warnings.catch_warnings()
    with ctx:
        if host_mem != "huge":
            warnings.simplefilter("error")
        with Engine(path, device="cpu", gpu_mem=_budget(ef, 3), policy="ondemand", host_mem=arg) as eng:
            assert eng.model.experts.store.ram_slots == want
            assert np.array_equal(eng.logits([1, 2, 3, 4, 5, 6]), ref)
            assert eng.model.experts.summary()["misses"] > 0


def test_host_mem_parsing_and_cli_flag(tiny_ef):
    from efengine.cli import build_parser
    from efengine.engine import Engine
    a = build_parser().parse_args(["generate", "m.ef", "-p", "x", "--host-mem", "0"])
    assert a.host_mem == "0"
    path = tiny_ef("mixtral", experts="q4")
    with Engine(path, device="cpu", policy="ondemand", host_mem="0") as eng:
        assert eng.host_mem == 0 and eng.model.experts.store.tier_bytes == 0
    with pytest.raises(ConfigError, match="invalid memory size"):
        Engine(path, device="cpu", policy="ondemand", host_mem="lots")


def test_register_needs_cuda(ef):
    from efengine.offload import build_provider
    with pytest.raises(ConfigError, match="cupy"):
        build_provider(ef, "numpy", policy="ondemand", register=True)


# ---- GPU ------------------------------------------------------------------------------------------
class _Pool:
    def __init__(self, slots, n):
        self.data = cp.zeros((slots, n), dtype=cp.uint8)
        self.base, self.stride = int(self.data.data.ptr), n

    def slot_array(self, slot):
        return self.data[slot]


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
def test_cuda_staging_threads_copy_exact_bytes(threads):
    from efengine.offload.cuda_engine import CudaEngine
    rng = np.random.default_rng(2)
    blobs = [rng.integers(0, 256, (24 << 20) + 4096 * k, dtype=np.uint8) for k in range(5)]
    pool = _Pool(2, blobs[-1].size)
    eng = CudaEngine(n_staging=2, staging_threads=threads)
    for k, b in enumerate(blobs):                  # more blobs than staging buffers and slots
        eng.fence(k % 2)
        eng.submit(b.size, None, slot=k % 2, blob=b, pool=pool)
        if k >= 3:
            eng.stream.synchronize()
            assert np.array_equal(cp.asnumpy(pool.data[k % 2, :b.size]), b)
    assert eng.staged_copies == 5 and eng.direct_copies == 0
    eng.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
def test_registered_mapping_is_copied_directly(tmp_path):
    from efengine.offload.cuda_engine import CudaEngine, _pinned, register_host
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 6 * (8 << 20), dtype=np.uint8)
    path = tmp_path / "blobs.bin"
    data.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    blobs = [mm[k * (8 << 20):(k + 1) * (8 << 20)] for k in range(6)]
    assert not _pinned(np.asarray(blobs[1]))
    reg = register_host(mm[4096:])                 # an unaligned start is widened to whole pages
    assert reg.ptr % 4096 == 0 and reg.nbytes >= mm.nbytes - 4096
    eng = CudaEngine(direct_pinned=True)
    eng.registrations.append(reg)
    pool = _Pool(6, 8 << 20)
    for k, b in enumerate(blobs[1:], 1):
        assert _pinned(np.asarray(b))
        eng.submit(b.size, None, slot=k, blob=b, pool=pool)
    eng.stream.synchronize()
    assert eng.direct_copies == 5
    assert np.array_equal(cp.asnumpy(pool.data[1:]).reshape(-1), data[8 << 20:])
    eng.close()
    assert not reg.registered


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")
@pytest.mark.parametrize("how", ["pinned", "staging", "register"])
def test_cuda_engine_host_tiers_are_lossless(tiny_ef, ef, how):
    from efengine.engine import Engine
    path = tiny_ef("mixtral", experts="q4")
    with Engine(path, device="cuda", policy="ondemand") as eng:     # every expert cached: same kernels
        ref = eng.logits([1, 2, 3, 4, 5, 6])
    kw = {"pinned": {}, "staging": {"host_mem": 0}, "register": {}}[how]
    with Engine(path, device="cuda", gpu_mem=_budget(ef, 3), policy="ondemand", **kw) as eng:
        rt = eng.model.experts
        if how == "register":          # Engine has no register flag: rebuild its provider with one
            from efengine.model import Model
            from efengine.offload import build_provider
            rt.close()
            rt = build_provider(eng.ef, "cupy", gpu_mem=_budget(ef, 3), policy="ondemand", register=True)
            eng.model = Model(eng.ef, "cupy", experts=rt)
            rt.attach(eng.model)
            assert len(rt.engine.registrations) == 1
        assert rt.store.tier_bytes == (rt.store.L * rt.store.E * ef.blob_nbytes if how == "pinned" else 0)
        got = eng.logits([1, 2, 3, 4, 5, 6])
        s = rt.summary()
        assert s["misses"] > 0
        assert (rt.engine.direct_copies > 0) == (how != "staging")
        assert (rt.engine.staged_copies > 0) == (how == "staging")
        np.testing.assert_array_equal(got, ref)
