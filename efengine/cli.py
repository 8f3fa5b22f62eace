"""`efengine` command line: chat, generate, perplexity, info, bench; each thin over Engine.

Errors print one line to stderr and exit 1; Ctrl-C exits 130 (in chat it only stops the reply).
`info` and `bench` live in their own modules (efengine.info, efengine.bench): main(argv) -> int.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import EfError

DELEGATED = {"info": "model summary, tensors, experts; --verify checks checksums",
             "bench": "measure speed and stalls (see efengine bench --help)"}


class UsageError(EfError):
    """A bad command line (argparse's complaint), reported like any other error."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default auto)")
    g.add_argument("--gpu-mem", metavar="SIZE", help="GPU memory for cached experts, e.g. 8G (offload runtime)")
    g.add_argument("--host-mem", metavar="SIZE", help="host RAM for a (pinned) tier of experts, e.g. 24G; "
                   "default: all experts when RAM allows; 0: copy from the mapped file (offload runtime)")
    g.add_argument("--policy", help="expert prefetch policy: ondemand | pregate | expertflow")
    g.add_argument("--ctx", type=int, metavar="N", help="context length in tokens (default min(model, 4096))")
    g.add_argument("--act", choices=("f16", "int8"), default=None,
                   help="activation format of quantized matrices in decode steps: int8 = int8 activations with "
                        "dp4a on the GPU (faster decode, slightly different logits); on the CPU the same "
                        "function as the GPU's int8 path (default f16)")
    g.add_argument("--route-bias", type=float, default=0.0, metavar="M",
                   help="LOSSY: route to a cached expert whose router probability is within M of a chosen "
                        "uncached one (fewer expert loads, slightly different output; default 0 = off)")


def _sampling_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config, else temperature 0.8)")
    g.add_argument("-n", "--max-tokens", type=int, default=None, help="most tokens to generate (default 256)")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min-p x the top probability (0 = off)")
    g.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float,
                   help="HF repetition penalty (1 = off)")
    g.add_argument("--seed", type=int, help="random seed (same seed, same output)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text tokens")


def sampling_kwargs(args) -> dict:
    keys = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")
    kw = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "ignore_eos", False):
        kw["ignore_eos"] = True
    return kw


def build_parser() -> Parser:
    p = Parser(prog="efengine", description="Run Mixture-of-Experts language models stored as .ef files.")
    p.add_argument("--version", action="version", version=f"efengine {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    c = sub.add_parser("chat", help="interactive chat (streams replies; /reset, /exit)")
    c.add_argument("model", nargs="?", help=".ef model file")
    c.add_argument("--system", help="system prompt")
    _model_options(c)
    _sampling_options(c)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("model", help=".ef model file")
    g.add_argument("-p", "--prompt", help="prompt text; '-' reads standard input")
    g.add_argument("--stdin", action="store_true", help="read the prompt from standard input")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    g.add_argument("--system", help="system prompt (with --chat)")
    g.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    g.add_argument("-q", "--quiet", action="store_true", help="no stats line on stderr")
    _model_options(g)
    _sampling_options(g)

    q = sub.add_parser("perplexity", help="perplexity of a text file (llama-perplexity style)")
    q.add_argument("model", help=".ef model file")
    q.add_argument("file", help="UTF-8 text file ('-' = standard input)")
    q.add_argument("--stride", type=int, help="window step <= ctx/2 (default: non-overlapping windows)")
    q.add_argument("--max-windows", type=int, help="score only the first N windows")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    _model_options(q)
    q.set_defaults(ctx=512)

    for name, text in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return p


def open_engine(path, args, n_ctx=None):
    from .engine import Engine
    bias = getattr(args, "route_bias", 0.0)
    if bias:
        print(f"warning: --route-bias {bias:g} is LOSSY: routing prefers cached experts, so output differs "
              "from the exact model (see docs/route_bias.md)", file=sys.stderr)
    kw = {"route_bias": bias} if bias else {}
    if getattr(args, "host_mem", None) is not None:
        kw["host_mem"] = args.host_mem
    if getattr(args, "act", None) is not None:
        kw["act"] = args.act
    return Engine(path, device=args.device, gpu_mem=args.gpu_mem, policy=args.policy,
                  n_ctx=n_ctx if n_ctx is not None else args.ctx, **kw)


def _read_prompt(args) -> str:
    if args.stdin or args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is None:
        raise UsageError("give a prompt with -p TEXT, or -p - / --stdin to read it from standard input")
    return args.prompt


def cmd_generate(args) -> int:
    prompt = _read_prompt(args)
    kw = sampling_kwargs(args)
    with open_engine(args.model, args) as eng:
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
            pieces = eng.chat_stream(msgs, **kw)
        else:
            pieces = eng.stream(prompt, **kw)
        if args.json:
            text = "".join(pieces)
            print(json.dumps({"text": text, "stats": eng.stats.to_dict()}, ensure_ascii=False))
            return 0
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if not args.quiet:
            print(f"[{eng.stats}]", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    from .perplexity import perplexity
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise EfError(f"{args.file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise EfError(f"{args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None

    def progress(i, n, ppl, err):
        if not args.json:
            print(f"[{i + 1}/{n}] {ppl:.4f}", file=sys.stderr, flush=True)

    with open_engine(args.model, args) as eng:
        r = perplexity(eng, text, ctx=args.ctx, stride=args.stride, max_windows=args.max_windows, on_window=progress)
    if args.json:
        print(json.dumps(dict(r, file=args.file)))
    else:
        print(f"{r['tokens_scored']} tokens scored in {r['windows']} windows of {r['ctx']}")
        print(f"Final estimate: PPL = {r['ppl']:.4f} +/- {r['ppl_err']:.5f}")
    return 0


def cmd_chat(args) -> int:
    from .chat_repl import run_chat
    return run_chat(args)


def _delegate(name: str, argv: list) -> int:
    import importlib
    try:
        mod = importlib.import_module(f"efengine.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"efengine.{name}":
            raise
        raise EfError(f"'efengine {name}' is not available in this build (module efengine.{name} is missing)") from None
    return mod.main(argv) or 0


def _run(argv: list) -> int:
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    return {"chat": cmd_chat, "generate": cmd_generate, "perplexity": cmd_perplexity}[args.command](args)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return _run(argv)
    except EfError as e:
        print(f"efengine: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nefengine: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`); say nothing more
        try:
            sys.stdout = open("/dev/null", "w")
        except OSError:
            pass
        return 1


if __name__ == "__main__":
    sys.exit(main())
