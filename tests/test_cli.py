"""The command line, run as a user runs it: in a subprocess, with KVFORGE_QUIET=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kvhelpers import CONTEXT

from kvforge import BUNDLED, prefill
from kvforge.cli import build_parser, main

CORE_COMMANDS = ["models", "inspect", "prefill", "generate", "demo"]


def kvforge(*args, timeout=300, env=None):
    """Run ``python -m kvforge ARGS`` (quiet, one torch thread) and return the CompletedProcess."""
    full_env = {**os.environ, "KVFORGE_QUIET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kvforge", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env=full_env,
    )


def one_line_error(proc) -> str:
    """The error line of a failed command; exactly one, last, and no traceback.

    (transformers' own "Loading weights" bar may precede it once a model was loaded.)
    """
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("kvforge")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected a one-line error, got:\n{proc.stderr}"
    return errors[0]


# ----------------------------------------------------------------------------- no model needed
def test_models_lists_the_bundled_models():
    proc = kvforge("models")
    assert proc.returncode == 0, proc.stderr
    for name in BUNDLED:
        assert name in proc.stdout
        assert BUNDLED[name].package in proc.stdout


def test_unknown_model_is_a_one_line_error_listing_bundled_names():
    proc = kvforge("generate", "--model", "no-such-model", "--prompt", "x")
    line = one_line_error(proc)
    assert proc.returncode == 2
    assert proc.stderr.strip() == line  # nothing but the error
    assert line.startswith("kvforge generate: error:")
    assert "no-such-model" in line
    for name in BUNDLED:
        assert name in line


def test_top_level_help_lists_the_commands():
    proc = kvforge("--help")
    assert proc.returncode == 0
    for cmd in CORE_COMMANDS:
        assert cmd in proc.stdout


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "usage: kvforge" in capsys.readouterr().err


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


def test_every_core_command_is_registered():
    assert set(CORE_COMMANDS) <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_subcommand_help(command, capsys):
    # in-process: each subprocess costs a torch import, and --help only exercises argparse
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kvforge {command}")


def run_main(capsys, *args):
    """``kvforge ARGS`` in-process (cheaper than a subprocess): ``(exit code, stdout, stderr)``."""
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_inspect_a_saved_state_needs_no_model(tiny_gemma, tmp_path, capsys):
    model, tok = tiny_gemma
    state = prefill(model, tok, CONTEXT)
    path = state.save(tmp_path / "tiny.kv")
    # "tiny-gemma" names the state's model but cannot be loaded: inspecting a file loads no model
    code, out, err = run_main(capsys, "inspect", "--model", "tiny-gemma", "--cache", path, "--json",
                              "--plot", tmp_path / "norms.png")
    assert code == 0, err
    desc = json.loads(out)
    assert desc["fingerprint"] == state.fingerprint and desc["tokens"] == state.num_tokens
    assert [row["layer"] for row in desc["layers"]] == list(range(len(state)))
    assert [row["tokens"] for row in desc["layers"]] == [layer.length for layer in state.layers]
    assert (tmp_path / "norms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run_main(capsys, "inspect", "--model", "smollm2-135m", "--cache", path)
    assert code == 2 and "holds a KV state of tiny-gemma, not of --model smollm2-135m" in err

    code, out, _ = run_main(capsys, "inspect", "--model", "tiny-gemma", "--cache", path)
    assert code == 0
    table_rows = out.strip().splitlines()[2:]
    assert len(table_rows) == len(state)


def test_inspect_missing_or_corrupt_state_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_main(capsys, "inspect", "--model", "unused", "--cache", tmp_path / "missing.kv")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("kvforge inspect: error:") and "no such file" in err
    bad = tmp_path / "bad.kv"
    bad.write_bytes(b"\x00" * 64)
    code, _, err = run_main(capsys, "inspect", "--model", "unused", "--cache", bad)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.kv" in err


# ----------------------------------------------------------------------------- real models
@pytest.mark.integration
def test_generate_cached_and_uncached_agree(tmp_path):
    prompt = "The capital of France is"
    stats = {}
    for flag in ("cache", "no-cache"):
        out = tmp_path / f"{flag}.json"
        extra = ["--no-cache"] if flag == "no-cache" else []
        proc = kvforge("generate", "--model", "smollm2-135m", "--prompt", prompt, "--max-new-tokens", 6,
                       "--stats-json", out, *extra)
        assert proc.returncode == 0, proc.stderr
        stats[flag] = json.loads(out.read_text())
        assert proc.stdout.strip()  # the generated text
    a, b = stats["cache"], stats["no-cache"]
    assert a["token_ids"] == b["token_ids"] and a["new_tokens"] == len(a["token_ids"]) > 0
    assert a["cached_context_tokens"] == 0
    assert a["forwarded_tokens"] == a["prompt_tokens"] + a["new_tokens"] - 1
    n, k = b["prompt_tokens"], b["new_tokens"]
    assert b["forwarded_tokens"] == sum(n + i for i in range(k))  # re-reads everything each step


@pytest.mark.integration
def test_prefill_missing_text_is_a_one_line_error(tmp_path):
    line = one_line_error(
        kvforge("prefill", "--model", "smollm2-135m", "--text", tmp_path / "nope.txt", "-o", tmp_path / "x.kv")
    )
    assert "nope.txt" in line and "no such file" in line
    assert not (tmp_path / "x.kv").exists()


def test_translate_run_refuses_a_recompute_share_outside_0_to_1_before_loading_models(tmp_path, capsys):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("A passage.")
    code, _, err = run_main(capsys, "translate", "run", "--source", "no-such-model", "--target", "no-such-model",
                            "--translator", tmp_path / "missing.safetensors", "--context", ctx, "--prompt", "x",
                            "--recompute", "1.5")
    assert code == 2 and "--recompute is a share of the context's tokens, 0 to 1; got 1.5" in err
    code, _, err = run_main(capsys, "translate", "run", "--source", "no-such-model", "--target", "no-such-model",
                            "--translator", tmp_path / "missing.safetensors", "--context", ctx, "--prompt", "x",
                            "--own-prefix-chars", "11")
    assert code == 2 and "--own-prefix-chars must be within the context's 10 characters; got 11" in err
    code, _, err = run_main(capsys, "translate", "run", "--source", "no-such-model", "--target", "no-such-model",
                            "--translator", tmp_path / "missing.safetensors", "--context", ctx, "--prompt", "x",
                            "--select", "last")
    assert code == 2 and "--select last chooses the tokens that --recompute re-reads; give --recompute too" in err
    code, _, err = run_main(capsys, "translate", "run", "--source", "no-such-model", "--target", "smollm2-135m",
                            "--context", ctx, "--prompt", "x")  # no --translator: the pair's shipped one, if any
    assert code == 2 and "no shipped translator for no-such-model -> smollm2-135m" in err
    assert "gemma3-270m -> smollm2-135m" in err and "give --translator FILE" in err
