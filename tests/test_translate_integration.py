"""The shipped smollm2-135m -> gemma3-270m translator on held-out text."""

from __future__ import annotations

import math
import re

import pytest
import torch

from kvforge.texts import load_text, text_pieces
from kvforge.translate import TranslatorMismatchError, load, shipped
from kvforge.translate.evaluate import continuation_nll, prefill_state

pytestmark = pytest.mark.integration


def test_shipped_translator_beats_no_context(smollm, real_gemma):
    (src, s_tok), (tgt, t_tok) = smollm, real_gemma
    assert ("smollm2-135m", "gemma3-270m") in shipped()
    tr = load("smollm2-135m", "gemma3-270m", src, tgt)
    pieces = text_pieces(load_text("pydoc", "eval"), 5, 1000, offset=50_000)
    bos = t_tok("", return_tensors="pt").input_ids[0]
    nll = {"translated": 0.0, "none": 0.0, "own": 0.0}
    count = 0
    for ctx, nxt in zip(pieces[:-1], pieces[1:]):
        cont = t_tok(nxt, add_special_tokens=False, return_tensors="pt").input_ids[0][:64]
        t_ids = t_tok(ctx, return_tensors="pt").input_ids[0]
        translated = tr.translate(prefill_state(src, s_tok(ctx, return_tensors="pt").input_ids[0]), ctx, src, tgt,
                                  s_tok, t_tok)
        assert translated.num_tokens == len(t_ids)  # the target's own token count
        for name, state in (("translated", translated[: len(t_ids) - 1]), ("none", prefill_state(tgt, bos)),
                            ("own", prefill_state(tgt, t_ids[:-1]))):
            nll[name] += continuation_nll(tgt, state, t_ids[-1], cont)[0]
        count += len(cont)
    ppl = {k: math.exp(v / count) for k, v in nll.items()}
    assert ppl["own"] < ppl["translated"] < ppl["none"]
    assert (ppl["none"] - ppl["translated"]) / (ppl["none"] - ppl["own"]) > 0.3


def test_wrong_pair_and_same_model(smollm, real_gemma):
    (src, s_tok), (tgt, _) = smollm, real_gemma
    with pytest.raises(TranslatorMismatchError, match="fitted for"):
        load("smollm2-135m", "gemma3-270m", tgt, src)
    with pytest.raises(ValueError, match="no shipped replace translator"):
        load("smollm2-135m", "llama-7b")
    with pytest.raises(ValueError, match="unknown translator mode"):
        load("smollm2-135m", "gemma3-270m", mode="blend")
    same = load("smollm2-135m", "smollm2-135m", src, src)
    text = "The KV cache of a model holds its reading of the context."
    state = prefill_state(src, s_tok(text, return_tensors="pt").input_ids[0])
    out = same.translate(state, text, src, src, s_tok, s_tok)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(out.layers, state.layers))


def test_shipped_fuse_translator_beats_the_target_alone(smollm, real_gemma):
    """Fuse mode: the target reads the context itself and the gate mixes SmolLM2's translated cache in;
    the continuation's perplexity is lower than with the target's own cache alone."""
    (src, s_tok), (tgt, t_tok) = smollm, real_gemma
    assert ("smollm2-135m", "gemma3-270m") in shipped("fuse")
    fz = load("smollm2-135m", "gemma3-270m", src, tgt, mode="fuse")
    pieces = text_pieces(load_text("pydoc", "eval"), 4, 1000, offset=80_000)
    nll = {"fused": 0.0, "own": 0.0}
    for ctx, nxt in zip(pieces[:-1], pieces[1:]):
        cont = t_tok(nxt, add_special_tokens=False, return_tensors="pt").input_ids[0][:64]
        t_ids = t_tok(ctx, return_tensors="pt").input_ids[0]
        own = prefill_state(tgt, t_ids)
        with pytest.raises(ValueError, match="needs the target's own state"):
            fz.translate(prefill_state(src, s_tok(ctx, return_tensors="pt").input_ids[0]), ctx, src, tgt, s_tok, t_tok)
        fused = fz.translate(prefill_state(src, s_tok(ctx, return_tensors="pt").input_ids[0]), ctx, src, tgt, s_tok,
                             t_tok, own=own)
        for name, state in (("fused", fused), ("own", own)):
            nll[name] += continuation_nll(tgt, state[: len(t_ids) - 1], t_ids[-1], cont)[0]
    assert nll["fused"] < nll["own"]


def test_shipped_translator_carries_facts_and_recomputation_repairs_more(smollm, real_gemma):
    """Token-conditioned replace: Gemma answers invented facts from SmolLM2's translated cache without reading
    the passage; recomputing a quarter of the tokens answers more; another passage's translation does not."""
    from kvforge.eval.qa import qa_exact_match, qa_set
    from kvforge.generate import prefill

    (src, s_tok), (tgt, t_tok) = smollm, real_gemma
    tr = load("smollm2-135m", "gemma3-270m", src, tgt)
    assert tr.config.token_conditioned and tr.config.window > 1
    items = qa_set(16, seed=7)

    def translated(item, recompute=0.0, other=None):
        ctx = (other or item).context
        return tr.translate(prefill(src, s_tok, ctx), ctx, src, tgt, s_tok, t_tok, recompute=recompute)

    plain = qa_exact_match(tgt, t_tok, items, translated).correct
    repaired = qa_exact_match(tgt, t_tok, items, lambda it: translated(it, 0.25)).correct
    control = qa_exact_match(tgt, t_tok, items, lambda it: translated(it, other=items[(items.index(it) + 1) % 16]))
    assert plain >= 1 and repaired > plain and control.correct <= 1  # benchmark, 40 items: 6, 20 and 0


def test_recomputing_a_tenth_by_sentence_answers_more_with_or_without_an_own_prefix(smollm, real_gemma):
    """10% of the context re-read by sentence over SmolLM2's translated cache answers more than the translation
    alone, both over a fully translated context and behind Gemma's own cache of the instruction and worked
    example (a prefix-cache hit); the prefix alone, never the passage, answers nothing."""
    from kvforge.eval.qa import DEMO, qa_exact_match, qa_set
    from kvforge.generate import prefill
    from kvforge.translate.recompute import own_prefix_state

    (src, s_tok), (tgt, t_tok) = smollm, real_gemma
    tr = load("smollm2-135m", "gemma3-270m", src, tgt)
    items = qa_set(8, seed=11)  # 8 items keep CI under its limit

    def own_prefix(item):
        return own_prefix_state(tgt, t_tok, item.context, len(DEMO))

    def translated(item, recompute, prefix):
        return tr.translate(prefill(src, s_tok, item.context), item.context, src, tgt, s_tok, t_tok,
                            recompute=recompute, own_prefix=own_prefix(item) if prefix else None)

    got = {name: qa_exact_match(tgt, t_tok, items, lambda it, r=r, p=p: translated(it, r, p)).correct
           for name, r, p in (("plain", 0.0, False), ("alone", 0.1, False), ("with_prefix", 0.1, True))}
    got["prefix_only"] = qa_exact_match(tgt, t_tok, items, own_prefix).correct
    assert got["alone"] > got["plain"] and got["with_prefix"] > got["plain"] and got["prefix_only"] == 0, got
    # benchmark, 40 items: plain 8, alone 26, with the prefix 24


def test_translate_run_cli_reads_its_own_prefix_and_re_reads_a_share(tmp_path, capsys):
    """``kvforge translate run --own-prefix-chars N --recompute 0.1``: the target's own cache of the
    instruction block, the passage translated, 10% of the context's translated tokens re-read; the report line
    counts both, and the answer is generated from that state."""
    from kvforge.cli import main
    from kvforge.eval.qa import DEMO, qa_set
    from kvforge.translate.registry import weights_path

    item = qa_set(1, seed=3)[0]
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(item.context)
    code = main(["translate", "run", "--source", "smollm2-135m", "--target", "gemma3-270m", "--translator",
                 str(weights_path("smollm2-135m", "gemma3-270m")), "--context", str(ctx), "--prompt", item.prompt,
                 "--max-new-tokens", "8", "--recompute", "0.1", "--select", "sentence",
                 "--own-prefix-chars", str(len(DEMO))])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and out[0].strip()  # the answer, then the report
    m = re.search(r"re-read (\d+) of the (\d+)-token context; its first (\d+) tokens are the target's own prefix",
                  out[-1])
    assert m, out[-1]
    redone, total, own = map(int, m.groups())
    assert 55 <= own <= 70 and redone == round(0.1 * (total - 1))  # the share counts every translated token
    code = main(["translate", "run", "--source", "smollm2-135m", "--target", "gemma3-270m", "--translator",
                 str(weights_path("smollm2-135m", "gemma3-270m")), "--context", str(ctx), "--prompt", item.prompt,
                 "--max-new-tokens", "1"])
    report = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and "re-read 0 of the" in report and "own prefix" not in report  # no prefix unless asked
