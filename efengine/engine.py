"""Engine: the public Python API. Open a .ef, then generate, stream, chat or score text.

    with Engine("model.ef") as eng:
        print(eng.generate("The capital of France is", max_tokens=20, temperature=0))
        for piece in eng.chat_stream([{"role": "user", "content": "Hi!"}]):
            print(piece, end="", flush=True)
        print(eng.stats)                     # tokens and tokens/s of the last call

The KV cache is kept between calls: a prompt that starts with the tokens already in the cache
(the next turn of a chat) only computes its new tokens. `reset()` forgets it.
Context: `n_ctx` positions (default min(model's max positions, 4096)). A prompt longer than
that is an EfError naming both numbers (never silently truncated); generation that fills the
context stops with stop_reason "context".
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .chat import ChatTemplate
from .errors import ConfigError, EfError
from .gpu_step import GraphStepper, OffloadStepper, graph_config, offload_graph_note, resident_experts
from .sampling import Sampler, SamplingParams, StopStrings
from .tokenizer import Tokenizer

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CTX = 4096
PREFILL_CHUNK = 512      # prompt tokens per forward: bounds activation memory on long prompts
# T tokens, V vocab


@dataclass
class GenerationStats:
    """What the last generate/stream/chat call did. Rates are tokens per second of compute."""
    prompt_tokens: int = 0
    cached_tokens: int = 0        # prompt tokens whose K/V were reused from the previous call
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0         # forward passes of generated tokens plus sampling
    decode_steps: int = 0         # forward passes of one token
    stop_reason: str = ""         # eos | stop | length | context | interrupted

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefill_tps=round(self.prefill_tps, 3), decode_tps=round(self.decode_tps, 3))
        return d

    def __str__(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens ({self.cached_tokens} cached), {self.prefill_tps:.1f} tok/s; "
                f"{self.generated_tokens} generated, {self.decode_tps:.1f} tok/s; stop: {self.stop_reason}")


def resolve_device(device: str) -> str:
    """"auto" | "cpu" | "cuda" -> backend name "numpy" | "cupy"."""
    from .ops import cupy_available
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "numpy"
    if device == "cuda":
        if not cupy_available():
            raise EfError("device 'cuda' was requested but no CUDA GPU is usable here (CuPy is missing or sees "
                          "no device); install efengine[cuda12] on a machine with an NVIDIA GPU, or use device 'cpu'")
        return "cupy"
    return "cupy" if cupy_available() else "numpy"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(v) -> int | None:
    """Bytes from 123, "512M", "8G", "8GiB", "1.5 GB" (binary units). None stays None."""
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0:
        return int(v)
    m = _SIZE.match(str(v)) if isinstance(v, str) else None
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"invalid memory size {v!r}: use bytes or a number with K/M/G/T (e.g. 8G, 512MiB)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


def sampling_defaults(raw: bytes | None) -> dict:
    """Sampling defaults from a model's generation_config.json: do_sample false means greedy (as
    in HF); with do_sample true the file's temperature / top_k / top_p / min_p apply;
    repetition_penalty applies either way. Anything absent keeps SamplingParams' defaults
    (temperature 0.8, no top-k/top-p/min-p): unlike HF, a file without do_sample samples."""
    import json
    try:
        g = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError):
        g = {}
    if not isinstance(g, dict):
        return {}
    out = {}
    if isinstance(g.get("repetition_penalty"), (int, float)):
        out["repetition_penalty"] = float(g["repetition_penalty"])
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    elif g.get("do_sample") is True:
        for k in ("temperature", "top_p", "min_p"):
            if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool):
                out[k] = float(g[k])
        if isinstance(g.get("top_k"), int):
            out["top_k"] = g["top_k"]
    try:
        SamplingParams(**out)
    except ConfigError:
        return {}       # a file with odd values must not make every call fail
    return out


class Engine:
    """Engine(model_path, device="auto"|"cpu"|"cuda", gpu_mem=None, policy=None, n_ctx=None, host_mem=None,
    act=None).

    gpu_mem (bytes or "8G") and policy ("ondemand" | "pregate" | "expertflow") configure the
    expert offload runtime; left None, every expert is resident, and on the GPU (configs that
    DecodeGraph takes: GQA without qk-norm) each generated token is one CUDA graph replay
    (gpu_step.GraphStepper); offloaded on the GPU (MoE configs of the same kind, route_bias off)
    each token is one run-ahead graph launch that the host follows layer by layer to issue the
    misses' copies (gpu_step.OffloadStepper; a step that fails is redone by Model.forward, with
    a warning, and decode stays eager). `decode_mode` says "graph", "graph-offload" or "eager"
    (`graph_note`: why eager where a graph path was possible). host_mem (bytes, "24G", 0)
    sizes the offload runtime's host tier of experts (pinned on CUDA): None = all of them when
    available RAM allows, 0 = none (experts are staged from the mapped file); one that does not
    fit warns. route_bias (LOSSY, default 0 = off) lets the offload runtime route to cached
    experts within that router-probability margin. act ("f16" | "int8"; None = the backend's
    default, f16): how quantized matrices take activations in small steps; "int8" = int8 codes
    with dp4a on the GPU (faster decode), the same function on the CPU (its numpy twin)."""

    def __init__(self, model_path, device: str = "auto", gpu_mem=None, policy: str | None = None, *,
                 n_ctx: int | None = None, prefill_chunk: int = PREFILL_CHUNK, route_bias: float = 0.0,
                 host_mem=None, act: str | None = None):
        from .format import EfFile
        from .model import Model
        from .ops import get_backend
        from .ops.act_int8 import check_act

        self.path = Path(model_path)
        self.device = device
        self.act = None if act is None else check_act(act)
        backend = resolve_device(device)
        self.gpu_mem = parse_size(gpu_mem)
        self.host_mem = 0 if isinstance(host_mem, (int, str)) and str(host_mem).strip() == "0" else parse_size(host_mem)
        self.policy = policy
        self.route_bias = route_bias
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise ConfigError(f"invalid prefill_chunk={prefill_chunk!r}: must be an integer >= 1")
        self.prefill_chunk = prefill_chunk
        self.ef = EfFile(self.path)
        try:
            self.config = self.ef.config
            self.n_ctx = self._context(n_ctx)
            experts = self._expert_provider(backend)
            # the GPU decode through a graph (gpu_step.py): "graph" resident, "graph-offload", "" eager
            self._pool, self._graph, self.graph_note = None, "", ""
            if experts is None and backend == "cupy" and graph_config(self.config):
                experts, self._pool = resident_experts(self.ef, backend)
                self._graph = "graph"
            elif experts is not None and backend == "cupy":
                self.graph_note = offload_graph_note(self.config, self.route_bias)
                self._graph = "" if self.graph_note else "graph-offload"
            self.model = Model(self.ef, backend=get_backend(backend, act=self.act), experts=experts)
            if hasattr(experts, "attach"):      # the offload runtime reads hidden states to pre-gate
                experts.attach(self.model)
            self._load_tokenizer()
            self.sampling_defaults = sampling_defaults(self.ef.file("generation_config.json"))
        except BaseException:
            self.ef.close()
            raise
        self._cache = None
        self._cached: list[int] = []       # token ids whose K/V sit in the cache, in order
        self._reused = 0
        self._active = None                # the stream in progress, if any
        # made on the first decode step of a graph path (graph_note: why it fell back to eager, if it did)
        self.stepper: GraphStepper | OffloadStepper | None = None
        self.last_tokens: list[int] = []   # ids generated by the last call (stop tokens excluded)
        self.stats = GenerationStats()
        self.closed = False

    # ---- setup ----------------------------------------------------------------------------------
    def _context(self, n_ctx) -> int:
        limit = int(self.config.max_position)
        if n_ctx is None:
            return min(limit, DEFAULT_CTX)
        if not isinstance(n_ctx, (int, np.integer)) or isinstance(n_ctx, bool) or not 1 <= n_ctx <= limit:
            raise ConfigError(f"invalid n_ctx={n_ctx!r}: must be an integer from 1 to the model's {limit} positions")
        return int(n_ctx)

    def _expert_provider(self, backend: str):
        if self.gpu_mem is None and self.policy is None:
            if self.route_bias:
                raise ConfigError("route_bias needs the expert offload runtime: give gpu_mem and/or policy")
            return None          # every expert resident
        try:
            from .offload import build_provider
        except ImportError:
            raise ConfigError("gpu_mem / policy need the expert offload runtime, which this build does not "
                              "include yet; leave them unset to keep every expert resident") from None
        kw = {"route_bias": self.route_bias} if self.route_bias else {}
        if self.host_mem is not None:
            kw["host_mem"] = self.host_mem
        return build_provider(self.ef, backend, gpu_mem=self.gpu_mem, policy=self.policy, **kw)

    def _load_tokenizer(self) -> None:
        """A model without a tokenizer still scores token ids (logits); text calls then fail clearly."""
        self._tok_error = self._template_error = None
        self._sample_limit = None
        try:
            self._tokenizer = Tokenizer.from_ef(self.ef)
        except EfError as e:
            self._tokenizer, self._tok_error = None, e
            self.template = None
            return
        t = self._tokenizer
        try:
            self.template = ChatTemplate(t.chat_template, bos_token=t.bos_token, eos_token=t.eos_token,
                                         where=str(self.path))
        except EfError as e:      # a broken template fails chat calls only, not generate
            self.template, self._template_error = None, e
        # Embedding rows past the tokenizer's vocabulary (padding) have no text: never sample them.
        self._sample_limit = t.vocab_size if t.vocab_size < self.config.vocab_size else None

    @property
    def tokenizer(self) -> Tokenizer:
        self._check_open()
        if self._tokenizer is None:
            raise self._tok_error
        return self._tokenizer

    # ---- text <-> ids ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def render_chat(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> str:
        """The prompt text a chat call feeds the model."""
        self.tokenizer   # raises when there is no tokenizer
        if self.template is None:
            raise self._template_error
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, prompt, **sampling) -> str:
        """Completion of `prompt` (text, or a list of token ids). Keyword arguments: max_tokens,
        temperature, top_k, top_p, min_p, repetition_penalty, seed, stop (see SamplingParams)."""
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt, **sampling) -> Iterator[str]:
        """Like generate, yielding text pieces as they are decided (whole characters only)."""
        params = self._params(sampling)
        return self._run(self._prompt_ids(prompt), params)

    def chat(self, messages, *, template_kwargs: dict | None = None, **sampling) -> str:
        """The assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        return "".join(self.chat_stream(messages, template_kwargs=template_kwargs, **sampling))

    def chat_stream(self, messages, *, template_kwargs: dict | None = None, **sampling) -> Iterator[str]:
        params = self._params(sampling)
        text = self.render_chat(messages, **(template_kwargs or {}))
        # HF tokenizes a rendered template without adding special tokens (the template writes
        # them); the ChatML fallback has none, so the model's own BOS rule applies to it.
        ids = self._check_ids(self.tokenizer.encode(text, add_special=self.template.is_fallback))
        return self._run(ids, params, self.template.stop_strings)

    def _params(self, sampling: dict) -> SamplingParams:
        unknown = set(sampling) - set(SamplingParams.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(SamplingParams.__dataclass_fields__)}")
        return SamplingParams(**{**self.sampling_defaults, **sampling})

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise EfError("the prompt is empty; give some text to continue")
            ids = self._check_ids(self.tokenizer.encode(prompt))
        else:
            ids = self._check_ids(prompt)
        if not ids:
            raise EfError("the prompt has no tokens")
        return ids

    def _check_ids(self, ids) -> list[int]:
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError):
            arr = np.asarray([], dtype=object)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise EfError("token ids must be a flat list of integers")
        V = self.config.vocab_size
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise EfError(f"token id {bad} is outside the vocabulary 0..{V - 1}")
        return [int(i) for i in arr]

    def _check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise EfError(f"the prompt has {n} tokens but the context holds {self.n_ctx}; shorten it or raise "
                          f"n_ctx / --ctx (this model allows up to {self.config.max_position})")

    def _run(self, ids: list[int], params: SamplingParams, extra_stops=()) -> Iterator[str]:
        """Checks run now (so errors surface at the call); the returned iterator generates."""
        self._check_open()
        self._check_fits(len(ids))
        stops = params.stop + tuple(s for s in extra_stops if s not in params.stop)
        tok = self.tokenizer
        self._stop_active()
        self._active = self._generate(ids, params, StopStrings(stops), tok)
        return self._active

    def _stop_active(self) -> None:
        """One generation at a time shares the cache: a new call ends an unfinished stream."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _generate(self, ids, params, stops: StopStrings, tok: Tokenizer) -> Iterator[str]:
        st = self.stats = GenerationStats(prompt_tokens=len(ids))
        sampler, dec, history = Sampler(params), tok.stream(), list(ids)
        self.last_tokens = generated = []
        st.stop_reason = "interrupted"
        t0 = time.perf_counter()
        logits = self._prefill(ids)
        st.cached_tokens = self._reused
        st.prefill_s = time.perf_counter() - t0
        while True:
            t0 = time.perf_counter()
            if self._sample_limit is not None:
                logits[self._sample_limit:] = -np.inf
            nxt = sampler.next_token(logits, history)
            st.decode_s += time.perf_counter() - t0
            if nxt in tok.stop_ids and not params.ignore_eos:
                st.stop_reason = "eos"
                break
            history.append(nxt)
            generated.append(nxt)
            st.generated_tokens += 1
            text, hit = stops.push(dec.push(nxt))
            if text:
                yield text
            if hit:
                st.stop_reason = "stop"
                return
            if st.generated_tokens >= params.max_tokens:
                st.stop_reason = "length"
                break
            if len(self._cached) >= self.n_ctx:
                st.stop_reason = "context"
                break
            t0 = time.perf_counter()
            logits = self._decode(nxt)
            st.decode_s += time.perf_counter() - t0
            st.decode_steps += 1
        text, hit = stops.push(dec.flush())
        tail = text if hit else text + stops.flush()
        if hit:
            st.stop_reason = "stop"
        if tail:
            yield tail

    # ---- the model and its cache ------------------------------------------------------------------
    def _forward(self, ids: list[int], last_only: bool) -> np.ndarray:
        if self._cache is None:
            self._cache = self.model.new_cache(self.n_ctx)
        out = self.model.forward(np.asarray(ids, dtype=np.int64), self._cache, last_only=last_only)
        self._cached.extend(ids)      # only after the forward finished: an interrupt leaves both in step
        return out

    def _decode(self, tok: int) -> np.ndarray:
        """Logits [V] after one generated token: a graph replay where the engine can, else a forward."""
        if self._graph and self._cache is not None:
            if self.stepper is None or self.stepper.cache is not self._cache:
                try:                # a new cache object: the graph holds the old one's addresses
                    self.stepper = self._make_stepper()
                except ConfigError as e:
                    self._graph, self.graph_note = "", f"eager decode: {e}"
            if self._graph:
                try:
                    out = self.stepper.step(tok)
                except EfError as e:
                    if self._graph != "graph-offload":
                        raise
                    self._offload_graph_failed(e)
                    return self._forward([tok], last_only=True)[0]
                self._cached.append(tok)      # after the step, as _forward does
                return out
        return self._forward([tok], last_only=True)[0]

    def _make_stepper(self):
        if self._graph == "graph":
            return GraphStepper(self.model, self._pool, self._cache)
        return OffloadStepper(self.model, self.model.experts, self._cache)

    def _offload_graph_failed(self, e: EfError) -> None:
        """A run-ahead step failed (a gate timed out waiting for an expert no copy was coming for:
        gpu_step.OffloadStepper). The device has finished and the position did not advance, so
        Model.forward redoes the token (lossless); decode stays eager from now on, and says so."""
        import warnings
        self._graph, self.stepper = "", None
        self.graph_note = f"eager decode: a graph-offload step failed ({e})"
        warnings.warn(f"{self.path.name}: {self.graph_note}; decoding eagerly from here on", stacklevel=4)

    @property
    def decode_mode(self) -> str:
        """"graph": generated tokens are CUDA graph replays, every expert resident (once the first
        one made the graph); "graph-offload": run-ahead graph launches with the offload runtime
        following them; "eager": Model.forward per token (CPU, configs the graphs reject,
        route_bias; `graph_note` says why where a graph path was possible)."""
        return self._graph or "eager"

    def _rewind(self, n: int) -> None:
        """Keep the first n cached positions."""
        if n < len(self._cached):
            self._cache.truncate(n)
            del self._cached[n:]

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Logits [V] after the prompt, computing only what the cache does not already hold."""
        common = 0
        for a, b in zip(self._cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)    # the last prompt token is always run: its logits are needed
        self._rewind(common)
        self._reused = common
        logits = None
        for s in range(common, len(ids), self.prefill_chunk):
            logits = self._forward(ids[s:s + self.prefill_chunk], last_only=True)
        return logits[-1]

    def logits(self, token_ids) -> np.ndarray:
        """Next-token logits float32 [T, V] at every position of token_ids (from position 0)."""
        self._check_open()
        ids = self._check_ids(token_ids)
        if not ids:
            raise EfError("logits needs at least one token id")
        self._check_fits(len(ids))
        self._stop_active()
        self._rewind(0)
        return np.concatenate([self._forward(ids[s:s + self.prefill_chunk], last_only=False)
                               for s in range(0, len(ids), self.prefill_chunk)], axis=0)

    def reset(self) -> None:
        """Forget the KV cache (the next call recomputes its whole prompt)."""
        self._stop_active()
        if self._cache is not None:
            self._rewind(0)
        self._cached.clear()
        self.stats = GenerationStats()

    # ---- lifetime -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            raise EfError(f"engine for {self.path} is closed")

    def close(self) -> None:
        if not getattr(self, "closed", True):
            self._stop_active()
            self.closed = True
            self._cache = self.stepper = self._pool = None
            close = getattr(getattr(self.model, "experts", None), "close", None)
            if close is not None:               # stops the offload runtime's copy thread
                close()
            self.model = None
            self.ef.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({str(self.path)!r}, device={self.device!r}, n_ctx={self.n_ctx})"
