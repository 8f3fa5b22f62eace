"""Engine on the GPU: resident decode through the CUDA graph (gpu_step.GraphStepper) and offloaded
decode through the run-ahead graph (gpu_step.OffloadStepper) against the CPU engine, on a tiny
Mixtral .ef built at test time. Marked `gpu`; skipped without CUDA.

The GPU's fp16 activations move this model's logits by ~1e-3 (rel RMS; the graph and Model.forward
on the GPU agree to ~1e-4), so greedy tokens can only be compared where the CPU's top two are apart:
every step of the prompts used here has them at least TIE of max |logit| apart (checked on the CPU
side first, so a model change that makes a near tie fails as such, not as a GPU mismatch). Each
step's logits are also compared. With int8 activations the engines drift further apart (5e-3 to
2.9e-2 seen on the H100, graph and eager alike), though on one forward of the same 5 tokens this
model's GPU int8 logits are within 1.3e-7 of the numpy int8 twin's: the prompt's prefill (more
than 8 tokens) takes float activations, fp16 GEMM operands on the GPU (~2e-3 from fp32), and every
int8 step after it quantizes slightly different inputs; at D = 64 a row has only two int8 chunks,
so a flipped code costs ~1e-2 (int8 against float is 2.8e-2 here). Hence TOL_INT8 / TIE_INT8;
test_gpu_int8act.py checks the int8 kernels themselves. Such drift also moves router logits: a
router choice whose A-th and next logits are closer than ROUTER_TIE_INT8 of the largest |logit| can
go either way (H100: layer 2 at decode step 2 of this prompt, a 4.1e-3 gap, the GPU took the other
expert and the step's logits parted by 0.12), after which the two caches differ. So the int8
comparison stops at the first step with such a router choice on the CPU and must cover at least
MIN_STEPS_INT8 steps before it.

Offloaded (gpu_mem of 3 or 6 of the 12 experts, every policy): the same tokens as the resident
graph and the CPU; logits within EAGER of the same engine's eager steps (Model.forward through the
runtime after the same prefill: a capture that spoiled a cached K/V row would show here), within
SAME of the resident graph's (whose prefill groups experts on the device instead) and equal
across policies. H100: this file and test_host_tier's GPU tests, 15 of 15 pass (run before the
Engine's eager redo of a failed graph-offload step existed; these tests do not reach it).
"""
from __future__ import annotations

import numpy as np
import pytest

import time

from efengine import quant

from gpu_check import HAVE_GPU

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")]
pytest.importorskip("torch")
pytest.importorskip("transformers")

from efengine.engine import Engine  # noqa: E402

TIE = 5e-3          # top-two gap / max |logit| under which greedy tokens may part
TOL = 2e-2          # rel RMS of a step's logits (fp16 GEMM prefill; 1e-3 to 2e-3 seen)
TIE_INT8, TOL_INT8 = 2e-2, 5e-2
ROUTER_TIE_INT8, MIN_STEPS_INT8 = 1e-2, 2
SAME = 5e-3         # rel RMS, offloaded graph against the resident graph (the prefill's kernels differ)
EAGER = 1e-3        # rel RMS, offloaded graph against Model.forward's steps on the same prefill (~1e-4)
POLICIES = ("ondemand", "pregate", "expertflow")
PROMPT, MORE = "Once upon a time", " of the"
CASES = [("q4", "q8", 32), ("f32", "f32", 64)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def model(request, tiny_ef):
    experts, dense, group = request.param
    return tiny_ef("mixtral", experts=experts, dense=dense, group=group)


def recorded(eng: Engine, prompt: str, n: int, gaps: list | None = None) -> tuple[list[int], np.ndarray]:
    """Greedy generation of n tokens -> (tokens, logits [n, V] each token was picked from). With
    `gaps` (a CPU engine), also each step's narrowest router choice: min over layers and tokens of
    (A-th largest - next router logit) / max |logit|."""
    seen, narrow = [], [np.inf]
    pre, dec = eng._prefill, eng._decode

    def keep(x):
        seen.append(np.array(x, dtype=np.float32))
        if gaps is not None:
            gaps.append(narrow[0])
            narrow[0] = np.inf
        return x

    def router_gap(layer, logits, ids, w):
        z = np.sort(np.asarray(logits, np.float64), axis=1)[:, ::-1]
        A = np.asarray(ids).shape[1]
        if z.shape[1] > A:
            narrow[0] = min(narrow[0], float(((z[:, A - 1] - z[:, A]) / np.abs(z).max(1)).min()))
        return ids, w
    eng._prefill, eng._decode = (lambda ids: keep(pre(ids))), (lambda tok: keep(dec(tok)))
    if gaps is not None:
        eng.model.route_hook = router_gap
    try:
        eng.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True)
    finally:
        del eng._prefill, eng._decode
        eng.model.route_hook = None
    return list(eng.last_tokens), np.stack(seen)


def before_router_tie(cpu: tuple, gpu: tuple, gaps: list) -> tuple[tuple, tuple]:
    """The steps of both recordings before the CPU's first router choice within ROUTER_TIE_INT8."""
    n = next((i for i, g in enumerate(gaps) if g < ROUTER_TIE_INT8), len(gaps))
    assert n >= MIN_STEPS_INT8, f"a router near tie at step {n}: too few steps to compare"
    return (cpu[0][:n], cpu[1][:n]), (gpu[0][:n], gpu[1][:n])


def assert_same(cpu: tuple, gpu: tuple, where: str, tie: float = TIE, tol: float = TOL) -> None:
    (ct, cl), (gt, gl) = cpu, gpu
    assert len(ct) == len(gt) == len(cl) == len(gl), where
    for i in range(len(ct)):
        top2 = np.sort(cl[i])[-2:]
        assert top2[1] - top2[0] > tie * np.abs(cl[i]).max(), f"{where}: near tie at step {i} on the CPU"
        err = quant.rel_rms(cl[i].astype(np.float64), gl[i].astype(np.float64))
        assert err < tol, f"{where}: step {i} logits rel RMS {err:.2e}"
        assert gt[i] == ct[i], f"{where}: step {i}: GPU {gt} CPU {ct}"


def test_graph_decode_matches_cpu(model):
    with Engine(model, device="cpu") as cpu, Engine(model, device="cuda") as gpu:
        assert gpu.decode_mode == "graph" and gpu._pool is not None
        assert_same(recorded(cpu, PROMPT, 12), recorded(gpu, PROMPT, 12), "first call")
        assert gpu.stepper is not None and gpu.stepper.steps == 11
        st = gpu.stats
        assert st.generated_tokens == 12 and st.decode_steps == 11 and st.decode_s > 0 and st.decode_tps > 0
        assert gpu._cache.pos == len(gpu._cached) == len(gpu.tokenize(PROMPT)) + 11


def test_prefix_reuse_rewind_reset_and_new_cache(model):
    with Engine(model, device="cpu") as cpu, Engine(model, device="cuda") as gpu:
        first = recorded(gpu, PROMPT, 12)
        assert_same(recorded(cpu, PROMPT, 12), first, "first call")
        stepper = gpu.stepper
        # shares the prompt with the cache, then differs from the generated tokens: a rewind
        assert_same(recorded(cpu, PROMPT + MORE, 8), recorded(gpu, PROMPT + MORE, 8), "prefix call")
        assert gpu.stats.cached_tokens == cpu.stats.cached_tokens > 0
        assert gpu.stepper is stepper and stepper.steps == 11 + 7
        gpu.reset()
        again = recorded(gpu, PROMPT, 12)
        assert again[0] == first[0] and gpu.stepper is stepper
        # a new cache object: the graph holds the old arrays' addresses, so a new stepper
        gpu._cache, gpu._cached = gpu.model.new_cache(gpu.n_ctx), []
        assert recorded(gpu, PROMPT, 12)[0] == first[0] and gpu.stepper is not stepper
        # logits() (prefill from position 0) between generations leaves the graph path working
        ids = gpu.tokenize(PROMPT)
        assert quant.rel_rms(cpu.logits(ids).astype(np.float64), gpu.logits(ids).astype(np.float64)) < TOL
        assert recorded(gpu, PROMPT, 12)[0] == first[0]


def test_int8_graph_decode_matches_cpu_int8(tiny_ef):
    m = tiny_ef("mixtral", experts="q4", dense="q8", group=32)
    with Engine(m, device="cpu", act="int8") as cpu, Engine(m, device="cuda", act="int8") as gpu:
        assert gpu.model.backend.act == "int8"
        gaps = []
        c = recorded(cpu, PROMPT, 12, gaps)
        assert_same(*before_router_tie(c, recorded(gpu, PROMPT, 12), gaps), "int8", TIE_INT8, TOL_INT8)
        assert gpu.stepper.graph.act == "int8" and gpu.stepper.graph.prepD.act == "int8"
        gaps = []
        c = recorded(cpu, PROMPT + MORE, 8, gaps)
        assert_same(*before_router_tie(c, recorded(gpu, PROMPT + MORE, 8), gaps), "int8 prefix call",
                    TIE_INT8, TOL_INT8)


def test_eager_where_the_graph_does_not_apply(tiny_ef):
    """qk-norm (qwen3_moe), resident or offloaded, and route_bias decode with Model.forward."""
    with Engine(tiny_ef("qwen3_moe"), device="cuda") as eng:
        assert eng.decode_mode == "eager"
        eng.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        assert eng.stepper is None and eng.stats.decode_steps == 3
    with Engine(tiny_ef("qwen3_moe"), device="cuda", policy="ondemand") as eng:
        assert eng.decode_mode == "eager" and "qk-norm" in eng.graph_note
        eng.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        assert eng.stepper is None
    m = tiny_ef("mixtral", experts="q4", dense="q8", group=32)
    with Engine(m, device="cuda", gpu_mem=_budget(m, 3), policy="ondemand", route_bias=0.1) as gpu:
        assert gpu.decode_mode == "eager" and "route_bias" in gpu.graph_note
        bias, layers = gpu.model.route_hook, []
        assert bias is gpu.model.experts.bias is not None
        gpu.model.route_hook = lambda layer, *a: (layers.append(layer), bias(layer, *a))[1]
        gpu.generate(PROMPT, max_tokens=12, temperature=0, ignore_eos=True)
        assert gpu.stepper is None and len(layers) == 3 * (1 + 11)     # every step saw the bias


# ---- offloaded: the run-ahead graph --------------------------------------------------------------

def _budget(path, slots: int) -> int:
    """gpu_mem for the dense weights plus `slots` experts."""
    from efengine.format import EfFile
    from efengine.offload import dense_nbytes
    with EfFile(path) as ef:
        return dense_nbytes(ef) + slots * ef.blob_nbytes


@pytest.fixture(scope="module")
def offload_refs(tiny_ef):
    """(model, {"cpu" | "resident": {call: (tokens, logits)}}) for the first call and a prefix call."""
    m = tiny_ef("mixtral", experts="q4", dense="q8", group=32)
    refs = {}
    with Engine(m, device="cpu") as cpu, Engine(m, device="cuda") as gpu:
        for name, eng in (("cpu", cpu), ("resident", gpu)):
            refs[name] = {"first": recorded(eng, PROMPT, 12), "prefix": recorded(eng, PROMPT + MORE, 8)}
        assert gpu.decode_mode == "graph"
    return m, refs


COUNTS = ("steps", "hits", "late", "misses", "copies", "stall_s")


def counted(eng: Engine, prompt: str, n: int) -> tuple[tuple, dict, dict]:
    """recorded(), and the runtime's counters added by the prefill and by the decode steps."""
    rt = eng.model.experts
    snap = lambda: {k: getattr(rt.stats, k) for k in COUNTS}       # noqa: E731
    s0, mid = snap(), {}
    pre = eng._prefill

    def prefill(ids):
        out = pre(ids)
        mid.update(snap())
        return out
    eng._prefill = prefill
    try:
        rec = recorded(eng, prompt, n)      # wraps prefill() and removes both wrappers when done
    finally:
        eng.__dict__.pop("_prefill", None)
    s2 = snap()
    return rec, {k: mid[k] - s0[k] for k in COUNTS}, {k: s2[k] - mid[k] for k in COUNTS}


@pytest.mark.parametrize("slots", [3, 6])
def test_offload_graph_decode_is_lossless(offload_refs, slots):
    """Every policy with 3 or 6 of the 12 experts cached: decode through OffloadStepper gives the
    resident graph's tokens (and the CPU's), logits equal across policies; a prefix call rewinds;
    the runtime counts every step (the capture's warm-up step is one more), with misses, copies
    and gate stall where the cache is too small."""
    from efengine.gpu_step import OffloadStepper
    m, refs = offload_refs
    A, n_moe = 2, 3                    # tiny Mixtral: top-2 of 4 experts, 3 MoE layers
    got = {}
    calls = (("first", PROMPT, 12), ("prefix", PROMPT + MORE, 8))
    for policy in POLICIES:
        with Engine(m, device="cuda", gpu_mem=_budget(m, slots), policy=policy) as eng:
            assert eng.decode_mode == "graph-offload" and eng.graph_note == ""
            assert eng.model.experts.n_slots == slots
            eng._graph = ""                       # the same engine decoding eagerly first
            eager = {call: recorded(eng, prompt, n) for call, prompt, n in calls}
            eng._graph = "graph-offload"
            eng.reset()
            for call, prompt, n in calls:
                where = f"{policy} {slots} slots, {call} call"
                rec, pre, dec = counted(eng, prompt, n)
                got[policy, call] = rec
                assert_same(refs["cpu"][call], rec, where)
                assert rec[0] == refs["resident"][call][0] == eager[call][0], where
                for name, ref, tol in (("eager", eager[call], EAGER), ("resident", refs["resident"][call], SAME)):
                    err = quant.rel_rms(ref[1].astype(np.float64), rec[1].astype(np.float64))
                    assert err < tol, f"{where}: logits rel RMS {err:.2e} against the {name} path"
                assert pre["steps"] == 1, where
                warm = call == "first"            # the capture's eager warm-up step
                assert dec["steps"] == n - 1 + warm, where
                assert dec["hits"] + dec["late"] + dec["misses"] == (n - 1 + warm) * n_moe * A, where
                if slots == 3:
                    assert dec["misses"] > 0 and dec["copies"] >= dec["misses"] and dec["stall_s"] > 0, where
            assert eng.decode_mode == "graph-offload" and isinstance(eng.stepper, OffloadStepper)
            assert eng.stepper.steps == 11 + 7
            assert eng.stepper.graph.ahead == {"ondemand": 0, "pregate": 1, "expertflow": 2}[policy]
            assert eng.stats.cached_tokens > 0
    for call in ("first", "prefix"):
        base = got["ondemand", call][1].astype(np.float64)
        for policy in POLICIES[1:]:
            assert quant.rel_rms(base, got[policy, call][1].astype(np.float64)) < 1e-6, (policy, call)


def test_offload_graph_new_cache_and_interrupted_step(offload_refs):
    """A new cache object makes a new stepper; a step interrupted while the host follows the device
    (Ctrl-C) is drained: the device finishes at once and the next call gives the same tokens."""
    m, refs = offload_refs
    first = refs["resident"]["first"][0]
    with Engine(m, device="cuda", gpu_mem=_budget(m, 3), policy="expertflow") as eng:
        assert recorded(eng, PROMPT, 12)[0] == first
        stepper, rt = eng.stepper, eng.model.experts
        eng._cache, eng._cached = eng.model.new_cache(eng.n_ctx), []
        assert recorded(eng, PROMPT, 12)[0] == first and eng.stepper is not stepper
        demand, calls = rt.demand, []

        def interrupted(layer, ids, wait=True):
            calls.append(layer)
            if len(calls) == 2:             # the second MoE layer of the first decode step
                raise KeyboardInterrupt
            return demand(layer, ids, wait=wait)
        rt.demand = interrupted
        t0 = time.perf_counter()
        try:
            with pytest.raises(KeyboardInterrupt):
                eng.generate(PROMPT + MORE, max_tokens=6, temperature=0, ignore_eos=True)
        finally:
            del rt.demand
        # drained (the layers the device still reached were served): done at once, no gate timeout
        assert eng.stepper.graph.stream.done and time.perf_counter() - t0 < 5 and len(calls) >= 2
        assert recorded(eng, PROMPT + MORE, 8)[0] == refs["resident"]["prefix"][0]
        assert recorded(eng, PROMPT, 12)[0] == first


def test_resident_experts_that_do_not_fit_say_to_offload(tiny_ef, monkeypatch):
    """A model whose experts do not fit on the GPU: a ConfigError that names the file and says to
    give --gpu-mem, not CuPy's allocation traceback (and no engine half made)."""
    import cupy as cp

    from efengine.errors import ConfigError
    from efengine.ops import gpu_weights

    def full(*a, **k):
        raise cp.cuda.memory.OutOfMemoryError(1 << 40, 0, 0)
    monkeypatch.setattr(gpu_weights.ExpertPool, "resident", classmethod(lambda cls, *a, **k: full()))
    path = tiny_ef("mixtral", experts="q4", dense="q8", group=32)
    with pytest.raises(ConfigError, match="--gpu-mem") as err:
        Engine(path, device="cuda")
    assert path.name in str(err.value)
