"""Run-ahead offloaded decode (ops/gpu_runahead.py, kernels/offload.cu): the gate kernel against
its numpy twin (a lookup of the ids in the host map), its wait for a missing expert, and the whole
decode against the resident graph: identical greedy tokens for every cache size. Marked gpu."""
from __future__ import annotations

import time

import numpy as np
import pytest

from gpu_check import HAVE_GPU
from offload_helpers import HostBlobs
from test_gpu_offload_decode import PROMPT, N, _cfg, _resident_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]


def _gate_setup(E: int, A: int, seed: int):
    import cupy
    import cupyx
    rng = np.random.default_rng(seed)
    mtab = cupyx.empty_pinned((E,), dtype=np.int32)
    mtab[...] = rng.permutation(1000)[:E]
    log = cupyx.empty_pinned((A + 1,), dtype=np.int32)
    log[...] = -7
    stall = cupyx.empty_pinned((1,), dtype=np.uint64)
    stall[0] = 0
    ids = cupy.asarray(rng.choice(E, A, replace=False).astype(np.int32))
    rw = cupy.asarray(rng.random(A, dtype=np.float32))
    dtab = cupy.full(E, -5, dtype=cupy.int32)
    pos = cupy.asarray(np.array([int(rng.integers(0, 500))], np.int32))
    err = cupy.zeros(1, dtype=cupy.int32)
    return rng, mtab, log, stall, ids, rw, dtab, pos, err


@pytest.mark.parametrize("E,A,forced", [(8, 2, False), (60, 4, False), (37, 7, True), (64, 32, True)])
def test_gate_matches_numpy_lookup(E, A, forced):
    import cupy
    from efengine.ops import gpu_ops as ops
    rng, mtab, log, stall, ids, rw, dtab, pos, err = _gate_setup(E, A, seed=E * 31 + A)
    fids = cupy.asarray(rng.choice(E, A, replace=False).astype(np.int32))
    fw = cupy.asarray(rng.random(A, dtype=np.float32))
    want_ids = cupy.asnumpy(fids if forced else ids)
    want_w = cupy.asnumpy(fw if forced else rw)
    ops.expert_gate(ids, rw, (fids, fw) if forced else None, mtab.ctypes.data, int(dtab.data.ptr),
                    log.ctypes.data, pos, stall.ctypes.data, err, A)
    cupy.cuda.Device().synchronize()
    want_tab = np.full(E, -5, np.int32)
    want_tab[want_ids] = mtab[want_ids]                  # the numpy twin: a lookup
    np.testing.assert_array_equal(cupy.asnumpy(dtab), want_tab)
    np.testing.assert_array_equal(cupy.asnumpy(ids), want_ids)
    np.testing.assert_array_equal(cupy.asnumpy(rw), want_w)
    np.testing.assert_array_equal(log[:A], want_ids)
    assert log[A] == int(pos.get()[0]) + 1 and int(stall[0]) == 0 and int(err.get()[0]) == 0


def test_gate_waits_for_a_published_slot_and_times_out():
    import cupy
    from efengine.ops import gpu_ops as ops
    E, A = 16, 4
    ops.load_offload_kernels()                        # as RunaheadDecodeGraph does (lazy loading)
    rng, mtab, log, stall, ids, rw, dtab, pos, err = _gate_setup(E, A, seed=5)
    missing = int(ids.get()[1])
    mtab[missing] = -1
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        ops.expert_gate(ids, rw, None, mtab.ctypes.data, int(dtab.data.ptr), log.ctypes.data, pos,
                        stall.ctypes.data, err, A)
    t0 = time.perf_counter()
    while log[A] != int(pos.get()[0]) + 1:           # the ids reach the host while it waits
        assert time.perf_counter() - t0 < 5
    time.sleep(0.05)
    assert not s.done                                 # still held by the missing expert
    other = cupy.cuda.Stream(non_blocking=True)
    ops.publish(mtab.ctypes.data + missing * 4, 123, other)     # as the copy stream does
    s.synchronize()
    assert int(dtab.get()[missing]) == 123 and int(err.get()[0]) == 0
    assert 0.04 < int(stall[0]) / 1e9 < 5                 # the wait, on the device clock

    mtab[missing] = -1                                # nobody publishes: the gate gives up
    with s:
        ops.expert_gate(ids, rw, None, mtab.ctypes.data, int(dtab.data.ptr), log.ctypes.data, pos,
                        stall.ctypes.data, err, A, timeout_s=0.02)
    s.synchronize()
    assert int(err.get()[0]) == 2 and int(dtab.get()[missing]) == -1


def test_slot_guard_waits_for_the_claim_only():
    import cupy
    from efengine.ops import gpu_ops as ops
    ops.load_offload_kernels()
    progress = cupy.full(1, 2 * 5 + 1, dtype=cupy.int32)        # layer 5 claimed
    err = cupy.zeros(1, dtype=cupy.int32)
    s = cupy.cuda.Stream(non_blocking=True)
    ops.slot_guard(progress, 4, err, s)                          # another layer: passes
    s.synchronize()
    ops.slot_guard(progress, 5, err, s)
    time.sleep(0.03)
    assert not s.done
    with cupy.cuda.Stream(non_blocking=True) as other:
        ops.step_done(progress)                                  # the claim ends
    other.synchronize()
    s.synchronize()
    assert int(progress.get()[0]) == -1 and int(err.get()[0]) == 0


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("policy", ["ondemand", "pregate", "expertflow"])
def test_runahead_decode_equals_resident_graph(policy, shared):
    from efengine.model import Model
    from efengine.offload import OffloadRuntime
    from efengine.offload.cuda_engine import CudaEngine
    from efengine.ops.gpu_runahead import RunaheadDecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(shared)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=11)
    first, ref = _resident_tokens(dev)
    src = HostBlobs(dev)
    n_moe = len(cfg.moe_layers)
    for slots in (cfg.top_k, cfg.top_k + 3, n_moe * cfg.n_experts // 2, n_moe * cfg.n_experts):
        eng = CudaEngine(n_staging=2)
        rt = OffloadRuntime(src, "cupy", policy=policy, slots=slots, engine=eng)
        m = Model(src, "cupy", experts=rt)
        c = m.new_cache(64)
        assert int(m.forward(np.array(PROMPT), c)[-1].argmax()) == first
        g = RunaheadDecodeGraph(m, rt, c)
        assert g.generate(first, N) == ref, slots
        g.finish()
        rt.cache.check()
        s = rt.summary()
        if slots < n_moe * cfg.n_experts // 2:
            assert s["misses"] > 0 and s["stall_s"] > 0
        if policy == "pregate" and slots > cfg.top_k + 3:    # predictions came through the log
            assert s["prefetch_issued"] > 0 and s["pregate_scored"] > 0
        rt.close()


def test_runahead_trace_plan_and_refusals():
    """A forcing hook: run-ahead and the segmented path give the same tokens, which differ from
    the router's own (the plan reached the kernels)."""
    from efengine.model import Model
    from efengine.offload import OffloadRuntime
    from efengine.offload.cuda_engine import CudaEngine
    from efengine.ops.gpu_offload_decode import OffloadDecodeGraph
    from efengine.ops.gpu_runahead import RunaheadDecodeGraph
    from efengine.ops.gpu_synth import DeviceRandomSource
    cfg = _cfg(False)
    dev = DeviceRandomSource(cfg, experts="q4", dense="q8", group=32, seed=3)
    first, ref = _resident_tokens(dev)

    def hook(layer, logits, ids, w):
        return np.array([[(layer + 5) % 8, 7 - layer]], np.int32), np.array([[0.7, 0.3]], np.float32)

    out = []
    for cls in (OffloadDecodeGraph, RunaheadDecodeGraph):
        rt = OffloadRuntime(HostBlobs(dev), "cupy", policy="ondemand", slots=3, engine=CudaEngine())
        m = Model(dev, "cupy", experts=rt)
        c = m.new_cache(64)
        m.forward(np.array(PROMPT), c)
        out.append(cls(m, rt, c, route_hook=hook).generate(first, N))
        assert rt.summary()["misses"] > 0
        rt.close()
    assert out[0] == out[1] and out[0] != ref
