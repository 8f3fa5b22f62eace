"""`efengine chat`: the interactive loop.

Input: one line is one message; a line ending with a backslash continues on the next line; a
line that starts with three double quotes opens a block that ends at a line ending with them.
Commands: /reset (forget the conversation), /exit or Ctrl-D (leave), /help.
Ctrl-C while a reply streams stops that reply (its text so far stays in the conversation, so
roles keep alternating); Ctrl-C at the prompt discards the line being typed.
"""
from __future__ import annotations

import sys

from .errors import EfError

BLOCK = '"""'
HELP = ('/reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply. End a line with \\ '
        'to continue it; """ opens and closes a multi-line block.')


def read_message(read=input) -> str:
    """One user message from `read(prompt)` calls (EOFError when input ends)."""
    line = read("> ")
    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK):]
        if first.rstrip().endswith(BLOCK):
            return first.rstrip()[:-len(BLOCK)]
        lines = [first] if first else []
        while True:
            line = read("... ")
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[:-len(BLOCK)]
                if last:
                    lines.append(last)
                return "\n".join(lines)
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read("... ")
    lines.append(line)
    return "\n".join(lines)


def model_path(path):
    """The given path, else the built-in demo model when this build has one."""
    if path:
        return path
    import importlib
    try:
        demo = importlib.import_module("efengine.demo")
    except ModuleNotFoundError as e:
        if e.name != "efengine.demo":
            raise
        raise EfError("no model given: run `efengine chat MODEL.ef` with a .ef file "
                      "(make one from a Hugging Face checkpoint with `efconvert`)") from None
    return demo.default_model_path()


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_chat(args) -> int:
    from .cli import open_engine, sampling_kwargs

    kw = sampling_kwargs(args)
    with open_engine(model_path(args.model), args) as eng:
        eng.tokenizer   # a model without a tokenizer fails here, before the first prompt
        base = [{"role": "system", "content": args.system}] if args.system else []
        messages = list(base)
        _say(f"efengine chat: {eng.path.name} (context {eng.n_ctx} tokens). {HELP}")
        while True:
            try:
                text = read_message()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                _say("(line discarded; /exit or Ctrl-D leaves)")
                continue
            cmd = text.strip()
            if cmd in ("/exit", "/quit"):
                return 0
            if cmd == "/reset":
                messages = list(base)
                eng.reset()
                _say("(conversation cleared)")
                continue
            if cmd == "/help":
                _say(HELP)
                continue
            if not cmd:
                continue
            messages.append({"role": "user", "content": text})
            reply = _reply(eng, messages, kw)
            if reply is None:
                messages.pop()      # the turn failed before any text: forget it
            else:
                messages.append({"role": "assistant", "content": reply})


def _reply(eng, messages, kw) -> str | None:
    """Stream one reply; its text (possibly cut short by Ctrl-C) or None when it failed."""
    pieces, stream = [], None
    try:
        stream = eng.chat_stream(messages, **kw)
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        if stream is not None:
            stream.close()
        print()
        _say("[reply stopped]")
    except EfError as e:
        print()
        _say(f"error: {e}" + (" (/reset starts over)" if "context" in str(e) else ""))
        return None
    else:
        print()
    s = eng.stats
    _say(f"[{s.generated_tokens} tokens, {s.decode_tps:.1f} tok/s; prompt {s.prompt_tokens} tokens "
         f"({s.cached_tokens} cached), {s.prefill_tps:.1f} tok/s]")
    if s.stop_reason == "context":
        _say(f"(the context of {eng.n_ctx} tokens is full: /reset starts over, or restart with a larger --ctx)")
    return "".join(pieces)
