"""The offload runtime is lossless: whatever the policy, budget or copy timing, a tiny model's
logits equal the all-resident run bit for bit (numpy). Also: its bookkeeping, stats and errors."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine.errors import ConfigError  # noqa: E402
from efengine.format import EfFile  # noqa: E402
from efengine.model import Model  # noqa: E402
from efengine.offload import OffloadRuntime, build_provider  # noqa: E402
from efengine.offload.prefetch import ImmediateEngine, ThreadEngine, VirtualEngine  # noqa: E402
from offload_helpers import greedy_logits  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_ef):
    """family -> (EfFile, resident logits)."""
    out = {}
    for fam, experts in (("mixtral", "q4"), ("qwen2_moe", "f32"), ("deepseek_v2", "q8")):
        ef = EfFile(tiny_ef(fam, experts=experts))
        out[fam] = (ef, greedy_logits(Model(ef, "numpy"), steps=5))
    return out


def offloaded(ef, policy, slots, engine=None, **kw):
    rt = OffloadRuntime(ef, "numpy", policy=policy, slots=slots, engine=engine, **kw)
    model = Model(ef, "numpy", experts=rt)
    rt.attach(model)
    return rt, model


@pytest.mark.parametrize("fam", ["mixtral", "qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("policy", ["ondemand", "pregate", "expertflow"])
def test_bit_identical_to_resident(models, fam, policy):
    ef, ref = models[fam]
    total = len(ef.expert_layers) * ef.n_experts
    for slots, engine in ((1, None), (3, ThreadEngine(bandwidth=50e6)), (total // 2, VirtualEngine(1e9)),
                          (total, None)):
        rt, model = offloaded(ef, policy, slots, engine)
        got = greedy_logits(model, steps=5)
        rt.cache.check()
        rt.close()
        assert np.array_equal(got, ref), (fam, policy, slots)
        s = rt.summary()
        assert s["tokens"] == 9 + 5 and s["steps"] == 6
        assert s["misses"] >= 1
        if slots >= total:                     # everything fits: each expert is loaded at most once
            assert s["misses"] <= total and s["prefetch_wasted"] == 0


def test_stats_log_and_prefetch_accounting(models):
    ef, ref = models["mixtral"]
    rt, model = offloaded(ef, "expertflow", 6)
    assert np.array_equal(greedy_logits(model, steps=8)[: len(ref)], ref)
    s = rt.summary()
    assert len(rt.stats.log) == s["steps"] == 9
    assert sum(e["misses"] for e in rt.stats.log) == s["misses"]
    assert all({"horizon", "occupancy", "stall_s", "bytes"} <= set(e) for e in rt.stats.log)
    assert s["bytes_copied"] == s["copies"] * ef.blob_nbytes
    assert s["copies"] == s["misses"] + s["prefetch_issued"]
    assert s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert 1 <= s["horizon"] <= 2 and s["prediction_recall_by_distance"]
    assert rt.horizon.log and "formula" in rt.horizon.log[-1]
    rt.close()


def test_the_pool_serves_the_right_bytes(models):
    """Loads land in the slot the table names (checked against the file itself)."""
    ef, _ = models["mixtral"]
    rt, model = offloaded(ef, "ondemand", 4)
    greedy_logits(model, steps=2)
    for (layer, e), slot in rt.pool.where.items():
        assert rt.pool.table[layer, e] == slot
        assert np.array_equal(rt.pool.data[slot], ef.expert_blob(layer, e))
        w = ef.expert_weights(layer, e)
        assert np.array_equal(rt.pool.handle(layer, e).down, w["down"])
    rt.close()


def test_budgets_and_errors(models):
    ef, _ = models["mixtral"]
    total = len(ef.expert_layers) * ef.n_experts
    assert OffloadRuntime(ef, policy="ondemand", fraction=0.5).n_slots == total // 2
    assert OffloadRuntime(ef, policy="ondemand", budget_bytes=3 * ef.blob_nbytes + 1).n_slots == 3
    assert OffloadRuntime(ef, policy="ondemand").n_slots == total
    with pytest.raises(ConfigError, match="holds no expert"):
        OffloadRuntime(ef, budget_bytes=10)
    with pytest.raises(ConfigError, match="one of slots, fraction or budget_bytes"):
        OffloadRuntime(ef, slots=2, fraction=0.5)
    with pytest.raises(ConfigError, match="fraction"):
        OffloadRuntime(ef, fraction=1.5)
    with pytest.raises(ConfigError, match="unknown offload policy"):
        OffloadRuntime(ef, policy="magic")
    rt = OffloadRuntime(ef, slots=2)
    with pytest.raises(ConfigError, match="experts=this runtime"):
        rt.attach(Model(ef, "numpy"))
    from efengine.offload import dense_nbytes
    p = build_provider(ef, "numpy", gpu_mem=dense_nbytes(ef) + 5 * ef.blob_nbytes, policy="pregate")
    assert p.n_slots == 5 and p.policy.name == "pregate"
    with pytest.raises(ConfigError, match="gpu_mem"):
        build_provider(ef, "numpy", gpu_mem=1000)


def test_engine_with_offload_generates_the_same_text(tiny_ef):
    from efengine.engine import Engine
    from efengine.offload import dense_nbytes
    path = tiny_ef("qwen2_moe")
    with Engine(path, device="cpu") as eng:
        ref = eng.logits([1, 2, 3, 4, 5])
    ef = EfFile(path)
    budget = dense_nbytes(ef) + 3 * ef.blob_nbytes
    for policy in ("ondemand", "expertflow"):
        with Engine(path, device="cpu", gpu_mem=budget, policy=policy) as eng:
            assert eng.model.experts.n_slots == 3 and eng.model.experts.model is eng.model
            assert np.array_equal(eng.logits([1, 2, 3, 4, 5]), ref)


def test_host_store_tiers(models):
    from efengine.offload.store import HostStore
    ef, _ = models["mixtral"]
    mm = HostStore(ef)
    assert mm.L == len(ef.expert_layers) and mm.blob_nbytes == ef.blob_nbytes and mm.ram is None
    ram = HostStore(ef, host_bytes=2 * ef.blob_nbytes + 5)       # a RAM tier of two blobs, LRU
    assert ram.ram_slots == 2
    for i, e in [(0, 1), (1, 2), (0, 1), (2, 3), (0, 1), (1, 2)]:
        assert np.array_equal(ram.blob(i, e), ef.expert_blob(ef.expert_layers[i], e))
    assert ram.reads == 4                       # (0,1) stayed; (1,2) was pushed out by (2,3)
    w = ram.decode(ram.blob(1, 2))
    ref = ef.expert_weights(ef.expert_layers[1], 2)
    assert all(np.array_equal(w[p], ref[p]) for p in ("gate", "up", "down"))
    pinned = []
    tier = HostStore(ef, host_bytes=10 * ef.blob_nbytes, alloc=lambda n: pinned.append(n) or np.empty(n, np.uint8))
    assert pinned == [10 * ef.blob_nbytes]
    seen = []
    tier.warm(seen.append)
    assert seen == list(range(10)) and tier.reads == 10
    assert np.array_equal(tier.blob(1, 1), ef.expert_blob(ef.expert_layers[1], 1)) and tier.reads == 10


def test_sources_without_blobs_are_packed(models):
    """An in-memory source (expert_weights only) is packed as float32 blobs: still lossless."""
    from efengine.offload.store import HostStore
    ef, ref = models["qwen2_moe"]

    class InMemory:
        config, expert_layers, n_experts = ef.config, ef.expert_layers, ef.n_experts

        def has(self, name):
            return ef.has(name)

        def load(self, name):
            return ef.load(name)

        def expert_weights(self, layer, e):
            return ef.expert_weights(layer, e)
    src = InMemory()
    st = HostStore(src)
    assert st.packed and st.blob_nbytes == sum(v.nbytes for v in ef.expert_weights(ef.expert_layers[0], 0).values())
    rt = OffloadRuntime(src, "numpy", policy="expertflow", slots=3)
    model = Model(src, "numpy", experts=rt)
    rt.attach(model)
    assert np.array_equal(greedy_logits(model, steps=5), ref)
    rt.close()


def test_gpu_budget_above_free_memory_is_a_clear_error(monkeypatch):
    """The check runs before anything is allocated; a stand-in cupy reports 1 GiB free."""
    import sys
    import types

    from efengine.errors import ConfigError
    from efengine.offload import _check_free

    runtime = types.SimpleNamespace(memGetInfo=lambda: (1 << 30, 80 << 30))
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime)))
    _check_free(1 << 29, "cupy")                     # half the free memory: fine
    _check_free(4 << 30, "numpy")                    # the numpy backend has no GPU to check
    with pytest.raises(ConfigError, match="more than the GPU's free memory"):
        _check_free(2 << 30, "cupy")


def test_expertflow_prefetches_a_prefills_experts_layers_ahead(models):
    """A prompt's tokens use every expert of a layer: the pre-gate on the prompt's hidden states
    expects all of them, so expertflow protects and prefetches whole layers ahead (not top_k of
    each) and only the first MoE layer misses; ondemand misses every expert of every layer."""
    ef, _ = models["mixtral"]
    L, E = len(ef.expert_layers), ef.n_experts
    prompt = np.arange(40) % ef.config.vocab_size
    ref = Model(ef, "numpy").forward(prompt, Model(ef, "numpy").new_cache(64))
    got = {}
    for policy in ("ondemand", "expertflow"):
        rt, model = offloaded(ef, policy, slots=E + E // 2, engine=ImmediateEngine())
        logits = model.forward(prompt, model.new_cache(64))
        assert np.array_equal(logits, ref), policy
        got[policy] = rt.summary()
        if policy == "expertflow":        # decode a little, then a second prompt: its first layer's
            cache = model.new_cache(64)   # experts are copied before it computes (no hidden state yet)
            for t in prompt[:3]:
                model.forward(np.array([t]), cache)
            assert np.array_equal(model.forward(prompt, model.new_cache(64)), ref)
            assert rt.stats.log[-1]["misses"] == 0
        rt.cache.check()
        rt.close()
    assert got["ondemand"]["misses"] == L * E
    ef_ = got["expertflow"]
    assert ef_["misses"] == E and ef_["late"] == 0
    assert ef_["prefetch_used"] == ef_["prefetch_issued"] == (L - 1) * E
