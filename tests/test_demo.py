"""``kvforge demo``: the full step list on tiny models, the quick path on the bundled model, honest console text."""

from __future__ import annotations

import io

import pytest
from kvhelpers import run_cli

from kvforge.demo import QUICK, STEPS, Demo, pick_steps, run_steps
from kvforge.plots import plot_demo_summary

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30


def test_pick_steps():
    assert pick_steps(None, False) == list(STEPS)
    assert pick_steps(None, True) == list(QUICK) == ["prefill", "continue"]
    assert pick_steps("serve,quant", False) == ["prefill", "quant", "serve"]  # quant compares with the passage
    with pytest.raises(ValueError, match="unknown demo step.*steps: prefill"):
        pick_steps("prefill,fly", False)
    with pytest.raises(ValueError, match="either"):
        pick_steps("mla", True)


def test_every_step_runs_on_tiny_models(tiny_llama, tmp_path):
    from rich.console import Console

    from kvforge.translate import identity

    model, tok = tiny_llama
    demo = Demo(model, tok, "tiny-llama", tmp_path, tokens=96, max_new_tokens=6, text=TEXT,
                target=(model, tok, "tiny-llama"), translator=identity(model, "tiny-llama"),
                calibration=[TEXT[:400], TEXT[400:800]], conversion_dir=tmp_path / "conv")
    out = io.StringIO()
    results = run_steps(demo, list(STEPS), Console(file=out, width=400))
    assert [r.step for r in results] == list(STEPS)
    by = {r.step: r for r in results}
    assert by["continue"].data["same"]
    assert by["quant"].bytes_per_token < by["prefill"].fp16_bytes_per_token  # smaller than fp16
    assert by["mla"].bytes_per_token == pytest.approx(by["mla"].fp16_bytes_per_token / 2, rel=0.05)
    assert (tmp_path / "conv" / "kvforge_mla.json").is_file()  # cached for the next run
    again = run_steps(demo, ["mla"])[0]
    assert "cached conversion" in again.line and again.data["ppl_change"] == by["mla"].data["ppl_change"]
    text = out.getvalue()
    for s in STEPS:
        assert s in text
    assert "pip install 'kvforge[serve]'" in text  # console markup must not eat "[serve]"
    assert "fp16" in by["prefill"].line and "fp16" in by["quant"].line
    png = plot_demo_summary(results, tmp_path / "summary.png", "tiny-llama")
    assert png.stat().st_size > 1000


@pytest.mark.integration
def test_cli_demo_quick_on_the_bundled_model(tmp_path):
    r = run_cli("demo", "--quick", "--tokens", "256", "--max-new-tokens", "8", "--workdir", str(tmp_path))
    assert "prefill" in r.stdout and "continue" in r.stdout and "the same 8 greedy tokens" in r.stdout
    assert (tmp_path / "passage.kv").is_file() and (tmp_path / "demo-summary.png").is_file()
    bad = run_cli("demo", "--steps", "prefill,fly", check=False)
    assert bad.returncode == 2 and "unknown demo step" in bad.stderr
