"""`efengine` CLI: generate, perplexity, errors, launchers, and chat through a pseudo-terminal."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine_models import build_tiny_ef  # noqa: E402

from efengine import cli  # noqa: E402
from efengine.chat_repl import read_message  # noqa: E402
from efengine.engine import Engine  # noqa: E402
from efengine.perplexity import windows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "bin" / "efengine"
TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! How are you today? I am fine, thank you. "
        "A tiny model says hello to the world, then it stops. ") * 3


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # 4096 positions: room for a reply long enough to interrupt
    return build_tiny_ef(tmp_path_factory.mktemp("cli"), "qwen2_moe", max_position=4096)


def run(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, pattern: str):
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("efengine: error:"), err
    assert "Traceback" not in err and re.search(pattern, lines[0]), err


# ---- generate -----------------------------------------------------------------------------------

def test_generate_streams_text_and_stats(model, capsys):
    rc, out, err = run(["generate", model, "-p", "Hello", "-n", "9", "--temp", "0", "--ignore-eos"], capsys)
    assert rc == 0
    with Engine(model, device="cpu") as eng:
        assert out == eng.generate("Hello", max_tokens=9, temperature=0, ignore_eos=True) + "\n"
    assert re.search(r"9 generated, [\d.]+ tok/s; stop: length", err)


def test_generate_json_stdin_and_chat(model, capsys, monkeypatch):
    args = ["generate", model, "-n", "5", "--temp", "0", "--ignore-eos", "--json"]
    rc, out, _ = run(args + ["-p", "-"], capsys, stdin="Hello", monkeypatch=monkeypatch)
    a = json.loads(out)
    assert rc == 0 and a["stats"]["generated_tokens"] == 5 and a["stats"]["prompt_tokens"] > 0
    rc, out, _ = run(args + ["--stdin"], capsys, stdin="Hello", monkeypatch=monkeypatch)
    assert json.loads(out)["text"] == a["text"]
    rc, out, _ = run(args + ["-p", "Hello", "--chat", "--system", "Be brief."], capsys)
    with Engine(model, device="cpu") as eng:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
        assert json.loads(out)["text"] == eng.chat(msgs, max_tokens=5, temperature=0, ignore_eos=True)


def test_generate_sampling_flags(model, capsys):
    base = ["generate", model, "-p", "Hi", "-n", "8", "--ignore-eos", "--json", "--temp", "1.2", "--top-k", "20",
            "--top-p", "0.9", "--min-p", "0.01", "--repeat-penalty", "1.3"]
    a = json.loads(run(base + ["--seed", "1"], capsys)[1])["text"]
    assert json.loads(run(base + ["--seed", "1"], capsys)[1])["text"] == a
    with Engine(model, device="cpu") as eng:
        assert a == eng.generate("Hi", max_tokens=8, ignore_eos=True, temperature=1.2, top_k=20, top_p=0.9,
                                 min_p=0.01, repetition_penalty=1.3, seed=1)
    full = json.loads(run(["generate", model, "-p", "Hi", "-n", "30", "--temp", "0", "--ignore-eos", "--json"],
                          capsys)[1])["text"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    cut = json.loads(run(["generate", model, "-p", "Hi", "-n", "30", "--temp", "0", "--ignore-eos", "--json",
                          "--stop", stop], capsys)[1])
    assert cut["text"] == full[:full.index(stop)] and cut["stats"]["stop_reason"] == "stop"


@pytest.mark.parametrize("argv, pattern", [
    (["generate", "{model}", "-p", "Hi", "--top-p", "2"], "top_p"),
    (["generate", "{model}", "-p", "Hi", "--temp", "-1"], "temperature"),
    (["generate", "{model}"], "give a prompt"),
    (["generate", "{model}", "-p", ""], "empty"),
    (["generate", "{model}", "-p", "Hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "{missing}", "-p", "Hi"], "cannot open"),
    (["generate", "{model}", "-p", "Hi", "--ctx", "999999"], "n_ctx"),
    (["generate", "{model}", "-p", "Hi", "--gpu-mem", "lots"], "memory size"),
    (["nonsense"], "invalid choice"),
    (["perplexity", "{model}", "{missing}"], "cannot read"),
])
def test_errors_are_one_line(model, capsys, argv, pattern):
    argv = [a.format(model=model, missing=Path(model).parent / "missing.ef") for a in argv]
    one_line_error(*run(argv, capsys)[::2], pattern)


def test_keyboard_interrupt_exits_130(model, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_generate", interrupted)
    rc, _, err = run(["generate", model, "-p", "Hi"], capsys)
    assert rc == 130 and "Traceback" not in err


def test_no_command_prints_help(capsys):
    rc, out, _ = run([], capsys)
    assert rc == 0 and "chat" in out and "perplexity" in out


@pytest.mark.parametrize("name", sorted(cli.DELEGATED))
def test_delegated_commands(model, capsys, name):
    if importlib.util.find_spec(f"efengine.{name}") is None:
        one_line_error(*run([name, "--help"], capsys)[::2], f"'efengine {name}' is not available")
    elif name == "info":                                     # its own tests cover the rest
        rc, out, _ = run(["info", model, "--json"], capsys)
        assert rc == 0 and json.loads(out)
    else:                                                    # arguments reach the module untouched
        try:
            rc = cli.main([name, "--help"])
        except SystemExit as e:
            rc = e.code
        assert rc in (0, None) and f"efengine {name}" in capsys.readouterr().out


def test_chat_without_model(capsys):
    if importlib.util.find_spec("efengine.demo") is not None:
        pytest.skip("this build has a demo model")
    one_line_error(*run(["chat"], capsys)[::2], "no model given")


# ---- perplexity ---------------------------------------------------------------------------------

def test_perplexity_matches_a_direct_computation(model, capsys, tmp_path):
    f = tmp_path / "text.txt"
    f.write_text(TEXT)
    rc, out, _ = run(["perplexity", model, f, "--ctx", "32", "--json"], capsys)
    r = json.loads(out)
    assert rc == 0 and r["ctx"] == 32
    with Engine(model, device="cpu", n_ctx=32) as eng:
        ids = eng.tokenize(TEXT)
        assert not eng.tokenizer.add_bos                     # so windows are plain slices
        nll = []
        for w in range(len(ids) // 32):
            chunk = ids[w * 32:(w + 1) * 32]
            logits = eng.logits(chunk).astype(np.float64)
            for j in range(16, 31):
                row = logits[j]
                nll.append(np.logaddexp.reduce(row) - row[chunk[j + 1]])
    nll = np.array(nll)
    assert r["windows"] == len(ids) // 32 and r["tokens_scored"] == len(nll) == 15 * r["windows"]
    assert math.isclose(r["ppl"], math.exp(nll.mean()), rel_tol=1e-9)
    assert math.isclose(r["ppl_err"], math.exp(nll.mean()) * nll.std() / math.sqrt(len(nll) - 1), rel_tol=1e-6)
    rc, out, err = run(["perplexity", model, f, "--ctx", "32"], capsys)
    assert rc == 0 and f"Final estimate: PPL = {r['ppl']:.4f} +/- " in out and "[1/" in err
    rc, out, _ = run(["perplexity", model, f, "--ctx", "32", "--stride", "8", "--json"], capsys)
    s = json.loads(out)
    assert s["windows"] > r["windows"] and s["stride"] == 8
    one_line_error(*run(["perplexity", model, f, "--ctx", "4096"], capsys)[::2], "needs at least 4096")
    one_line_error(*run(["perplexity", model, f, "--ctx", "32", "--stride", "17"], capsys)[::2], "stride")


@pytest.mark.parametrize("n, ctx, stride", [(100, 16, None), (100, 16, 8), (57, 16, 3), (16, 16, 1), (40, 10, 5)])
def test_windows_score_each_token_once(n, ctx, stride):
    plan = windows(n, ctx, stride)
    targets = [a + j + 1 for a, j0 in plan for j in range(j0, ctx - 1)]
    assert len(targets) == len(set(targets))                  # never twice
    assert all(a + ctx <= n for a, _ in plan)
    if stride is None:                                        # llama.cpp: second half of each window
        assert plan == [(w * ctx, ctx // 2) for w in range(n // ctx)]
    else:                                                     # no gaps after the first half window
        assert targets == list(range(ctx // 2 + 1, plan[-1][0] + ctx))


# ---- chat input ---------------------------------------------------------------------------------

def reader(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


def test_read_message_continuations_and_blocks():
    assert read_message(reader(["hello"])) == "hello"
    assert read_message(reader(["one \\", "two\\", "three"])) == "one \ntwo\nthree"
    assert read_message(reader(['"""', "a", "", "  b", '"""'])) == "a\n\n  b"
    assert read_message(reader(['"""first', "second", 'last"""'])) == "first\nsecond\nlast"
    assert read_message(reader(['"""inline"""'])) == "inline"
    with pytest.raises(EOFError):
        read_message(reader(['"""', "unfinished"]))


def test_chat_from_a_pipe_and_a_full_context(model, capsys, monkeypatch):
    rc, out, err = run(["chat", model, "--ctx", "40", "-n", "1000", "--ignore-eos", "--temp", "0"], capsys,
                       stdin="hello\nagain\n/exit\n", monkeypatch=monkeypatch)
    assert rc == 0 and err.count("context of 40 tokens is full") == 1
    assert "error:" in err and "has" in err and "/reset starts over" in err   # the second turn no longer fits


# ---- launchers and the interactive chat (subprocesses) -------------------------------------------

def test_launcher_works_without_install(model, tmp_path):
    """bin/efengine under an interpreter that sees the dependencies but not an installed efengine."""
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "PATH": "/usr/bin:/bin"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import efengine"], env=env, capture_output=True, cwd=tmp_path)
    if probe.returncode == 0:
        pytest.skip("efengine is importable without site hooks here; nothing to map")
    p = subprocess.run([sys.executable, "-S", str(LAUNCHER), "generate", str(model), "-p", "Hi", "-n", "3",
                        "--json", "--ignore-eos"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["stats"]["generated_tokens"] == 3
    p = subprocess.run([sys.executable, "-S", str(ROOT / "bin" / "efconvert"), "--help"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0 and "efconvert" in p.stdout, p.stderr


STATS = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s; prompt (\d+) tokens \((\d+) cached\)")


def spawn_chat(model, *extra):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, [str(LAUNCHER), "chat", str(model), "--device", "cpu", "--temp", "0",
                                           "--ignore-eos", *extra], encoding="utf-8", timeout=60,
                          dimensions=(50, 200))
    child.expect("efengine chat:")
    child.expect_exact("> ")
    return child


def turn(child, text):
    child.sendline(text)
    child.expect(STATS)
    stats = tuple(int(x) for x in child.match.groups())
    child.expect_exact("> ")
    return stats


def test_chat_turns_reset_and_exit(model):
    child = spawn_chat(model, "-n", "6", "--system", "Be brief.")
    n1, p1, c1 = turn(child, "Hello there")
    assert n1 == 6 and c1 == 0
    n2, p2, c2 = turn(child, "And then?")
    assert n2 == 6 and p2 > p1 and c2 >= p1                 # the whole first turn came from the cache
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    n3, p3, c3 = turn(child, "Hello there")
    assert (n3, p3, c3) == (6, p1, 0)                        # same prompt as turn one, nothing cached
    child.sendline("first line \\")
    child.expect_exact("... ")
    turn(child, "second line")
    child.sendline("/exit")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_ctrl_c_stops_the_reply_and_ctrl_d_leaves(model):
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(model, "-n", "100000")
    for text, cached in (("Tell me everything", 0), ("Go on", 1)):
        child.sendline(text)
        child.expect(f"(?s){text}.{{60}}")                    # the reply is streaming
        child.sendintr()
        child.expect_exact("[reply stopped]")
        child.expect(STATS)
        assert 0 < int(child.match.group(1)) < 4000           # cut well before the context filled
        assert (int(child.match.group(3)) > 0) == bool(cached)   # the cut reply stays in the conversation
        child.expect_exact("> ")
        if not cached:
            child.sendintr()                                  # Ctrl-C at the prompt does not leave
            child.expect_exact("line discarded")
            child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
