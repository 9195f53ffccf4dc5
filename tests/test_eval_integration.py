"""The evaluation harness on the bundled SmolLM2: the reference perplexity and the CLI."""

from __future__ import annotations

import json

import pytest

from kvforge.eval import agreement, default_prompts, needle, perplexity, token_windows
from kvforge.texts import load_text

pytestmark = pytest.mark.integration


def test_reference_perplexity_protocol(smollm):
    """shared/FINDINGS.md: 4 x 1024-token windows of the whole pydoc text, 512 prefilled, 512 scored in
    chunks of 32 with a DynamicCache: PPL 12.201 (single pass agrees to 4 decimals)."""
    model, tok = smollm
    windows = token_windows(tok, load_text("pydoc", "all"), 4, 1024)
    dec = perplexity(model, tok, "dynamic", windows=windows, show_progress=False)
    assert dec.tokens == 2048
    assert dec.ppl == pytest.approx(12.201, abs=0.002)
    one = perplexity(model, tok, "dynamic", windows=windows, single_pass=True, show_progress=False)
    assert one.ppl == pytest.approx(dec.ppl, abs=1e-3)


def test_real_model_metrics_detect_a_corrupted_cache(smollm):
    model, tok = smollm
    text = load_text("pydoc", "eval")
    windows = token_windows(tok, text, 1, 384)
    base = perplexity(model, tok, "dynamic", windows=windows, context=256, score=128, show_progress=False)
    bad = perplexity(model, tok, "noisy:std=0.3", windows=windows, context=256, score=128, baseline=base,
                     show_progress=False)
    assert bad.rel_change > 0.2
    prompts = default_prompts(tok, 1, 128, text)
    a = agreement(model, tok, "noisy:std=0.3", prompts=prompts, new_tokens=16, show_progress=False)
    assert a.mean_kl > 0.05 and a.match_rate < 1.0
    ok = needle(model, tok, "dynamic", lengths=(256,), depths=(0.5,), trials=2, text=text, show_progress=False)
    broken = needle(model, tok, "noisy:std=1.0", lengths=(256,), depths=(0.5,), trials=2, text=text,
                    show_progress=False)
    assert ok.mean_accuracy == 1.0
    assert broken.mean_accuracy < ok.mean_accuracy


def test_cli_eval_and_bench(tmp_path, capsys, monkeypatch):
    """The CLI in-process (one model load per command, no interpreter start-up; `python -m kvforge` as a separate
    process is run by test_demo.py and test_quant_integration.py): eval's JSON, the multi-text mean and worst, errors named on one line."""
    from kvforge.cli import main

    monkeypatch.setenv("KVFORGE_QUIET", "1")

    def cli(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = cli("eval", "ppl", "--model", "smollm2-135m", "--cache", "preallocated:max_seq_len=256",
                       "--windows", "1", "--context", "128", "--score", "64", "--json")
    data = json.loads(out)
    assert code == 0 and data["tokens"] == 64 and abs(data["rel_change"]) < 1e-4
    code, out, _ = cli("eval", "ppl", "--model", "smollm2-135m", "--cache", "kvforge-quant:preset=safe", "--text",
                       "fortunes,jargon", "--windows", "1", "--context", "128", "--score", "64", "--json")
    data = json.loads(out)
    changes = {t: v["rel_change"] for t, v in data["texts"].items()}
    assert set(changes) == {"fortunes", "jargon"} and data["worst_rel_change"] == max(changes.values())
    assert data["mean_rel_change"] == pytest.approx(sum(changes.values()) / 2)
    code, _, err = cli("eval", "agree", "--model", "smollm2-135m", "--text", "fortunes,jargon")
    assert code != 0 and "takes one text" in err
    code, _, err = cli("eval", "ppl", "--model", "smollm2-135m", "--cache", "zip:level=9")
    assert code != 0 and "known:" in err and len(err.strip().splitlines()) == 1
    code, _, _ = cli("bench", "--model", "smollm2-135m", "--caches", "dynamic,noisy:std=0.3,hf-quantized:nbits=4",
                     "--metrics", "ppl", "--windows", "1", "--context", "128", "--score", "64", "--size-tokens", "0",
                     "--out", str(tmp_path))
    assert code == 0
    (folder,) = list(tmp_path.iterdir())
    assert (folder / "results.md").exists() and (folder / "quality_vs_bytes.png").exists()
    rows = {x["cache"]: x for x in json.loads((folder / "results.json").read_text())["results"]}
    assert rows["noisy:std=0.3"]["ppl"]["rel_change"] > 0
    assert "hf-quantized:nbits=4" in rows  # measured when optimum-quanto is installed, else skipped
