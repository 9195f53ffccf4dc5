"""Token-conditioned translation on tiny random models: token-local features, the source window, selective
recomputation, fact passages and the translator file format."""

from __future__ import annotations

import json

import pytest
import torch
from kvhelpers import CONTEXT, one_thread, prefilled_cache
from test_translate import _char_tokenizer

from kvforge import KVState
from kvforge.artifacts import ArtifactError
from kvforge.state import KVStateError
from kvforge.translate import Translator, fit, unrotated
from kvforge.translate.features import source_window, token_features, token_local
from kvforge.translate.recompute import by_sentence, choose, recompute, sentence_ids

TEXTS = [CONTEXT[i:] + CONTEXT[:i] for i in range(0, 80, 10)]


def _state(model, tok, text=CONTEXT):
    ids = tok(text, return_tensors="pt").input_ids
    with one_thread():
        return KVState.from_cache(prefilled_cache(model, ids), model, ids)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_token_local_features_are_layer_0_exactly_and_read_no_context(arch, tiny_llama, tiny_gemma):
    """Layer 0's keys and values from the embedding alone equal the model's own layer-0 cache; changing the
    tokens before a token (beyond its neighbours) changes nothing of its features."""
    model, _ = tiny_llama if arch == "llama" else tiny_gemma
    tok = _char_tokenizer()
    ids = tok(CONTEXT, return_tensors="pt").input_ids[0]
    own = unrotated(_state(model, tok), model, [0])[0]
    emb, k0, v0 = token_local(model, ids)
    n = own[0].shape[2]  # a sliding layer 0 holds only its last tokens
    assert torch.allclose(k0[:, -n:], own[0][0], atol=1e-5) and torch.allclose(v0[:, -n:], own[1][0], atol=1e-5)
    other = ids.clone()
    other[1:10] = (other[1:10] + 7) % 90 + 2  # different earlier tokens
    f1 = token_features(emb, k0, v0, neighbours=1)
    f2 = token_features(*token_local(model, other), neighbours=1)
    assert torch.equal(f1[11:], f2[11:]) and not torch.equal(f1[1:11], f2[1:11])


def test_source_window_gathers_the_aligned_token_and_those_before_it():
    """Slot s of target token t holds source token index[t] - s; slots before the text, and specials, are 0;
    a sliding source layer holding only its last tokens is read at the right offset."""
    n, d = 10, 3
    full = torch.arange(n, dtype=torch.float)[None, None, :, None].expand(1, 1, n, d) + 1  # value = position + 1
    sliding = full[:, :, -6:]  # holds tokens 4..9
    index = torch.tensor([-1, 0, 2, 5, 9])
    got = source_window({0: (full, full)}, index, 3)[0][:, :, 0] - 1  # position per slot, -1 where empty
    assert got.tolist() == [[-1, -1, -1], [0, -1, -1], [2, 1, 0], [5, 4, 3], [9, 8, 7]]
    got_s = source_window({0: (full, full), 1: (sliding, sliding)}, torch.tensor([5, 9, 4]), 3)[1][:, :, 0] - 1
    assert got_s.tolist() == [[5, 4, -1], [9, 8, 7], [4, -1, -1]]  # tokens before 4 fell out of the window: empty
    with pytest.raises(KVStateError, match="holds only its last 6 tokens"):
        source_window({0: (full, full), 1: (sliding, sliding)}, index, 3)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_recomputing_every_token_is_the_targets_own_prefill(arch, tiny_llama, tiny_gemma):
    """With every token recomputed over a translated (here: garbage) cache, the result is the target's own
    prefill, sliding layers included (the context is longer than the tiny Gemma's window of 16)."""
    model, _ = tiny_llama if arch == "llama" else tiny_gemma
    tok = _char_tokenizer()
    own = _state(model, tok)
    n = own.num_tokens
    torch.manual_seed(0)
    garbage = KVState([type(la).dense(torch.randn(1, la.keys.shape[1], n, la.keys.shape[3]),
                                      torch.randn(1, la.keys.shape[1], n, la.keys.shape[3])) for la in own.layers],
                      own.token_ids, own.positions, list(own.layer_types), own.fingerprint,
                      sliding_window=own.sliding_window, num_model_layers=len(own.layers))
    with one_thread():
        out = recompute(model, garbage, choose(torch.zeros(n, dtype=torch.long), 1.0))
        part = recompute(model, garbage, torch.tensor([3, 20, n - 1]))
    for a, b in zip(out.layers, own.layers):
        m = b.length
        assert torch.allclose(a.keys[:, :, -m:], b.keys, atol=1e-5) and torch.allclose(a.values[:, :, -m:], b.values,
                                                                                        atol=1e-5)
    keep = [i for i in range(n) if i not in (3, 20, n - 1)]
    for a, g in zip(part.layers, garbage.layers):
        assert torch.equal(a.keys[:, :, keep], g.keys[:, :, keep]) and not torch.equal(a.keys[:, :, 20], g.keys[:, :, 20])
    assert torch.allclose(part.layers[0].keys[:, :, 3], own.layers[0].keys[:, :, 3 - (n - own.layers[0].length)]
                          if own.layers[0].length == n else part.layers[0].keys[:, :, 3], atol=1e-5)


def test_choose_picks_the_share_of_translated_tokens_by_score_or_from_the_end():
    index = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])  # a special first token, then 10 translated
    scores = torch.tensor([float("-inf"), 0, 9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert choose(index, 0.3, "trust", scores).tolist() == [2, 4, 6]
    assert choose(index, 0.2, "last").tolist() == [9, 10]
    assert choose(index, 0.0, "trust", scores).tolist() == []
    assert choose(index, 1.0).tolist() == list(range(11))  # every token, the special one included
    with pytest.raises(ValueError, match="unknown recompute selection"):
        choose(index, 0.1, "random")
    with pytest.raises(ValueError, match="0 to 1"):
        choose(index, 1.5)


def test_sentence_ids_split_at_sentence_ends_and_line_breaks_not_inside_numbers():
    """A sentence ends at ".", "!" or "?" before white space (line breaks right after belong to it) or at a line
    break; "1.5" is no end; the special <bos> is in none."""
    text = "Ab. Cd?\nEf 1.5 g!\n\nQuestion: x\nHi"
    got = sentence_ids(_char_tokenizer(), text).tolist()
    want = [-1] + [0] * 3 + [1] * 5 + [2] * 11 + [3] * 12 + [4] * 2
    assert got == want, got


def test_choose_by_sentence_takes_whole_sentences_least_trusted_first():
    """``by_sentence`` orders sentences by their mean score, tokens within by their own: the top tokens are the
    whole sentence with the highest mean, then the best of the next; specials rank lowest."""
    sentences = torch.tensor([-1, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    scores = torch.tensor([float("-inf"), 1, 1, 9, 4, 4, 4, 4, 0, 2])  # means: 3.67, 4, 1
    index = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8])
    s = by_sentence(scores, sentences)
    assert s[0] == float("-inf")
    assert choose(index, 5 / 9, "sentence", s).tolist() == [3, 4, 5, 6, 7]  # sentence 1, then sentence 0's best
    assert choose(index, 1 / 9, "trust", scores).tolist() == [3]  # token by token, the 9 wins
    assert choose(index, 3 / 9, "sentence", s, start=5).tolist() == [5, 6, 7]  # never before an own prefix
    with pytest.raises(ValueError, match="'sentence' needs scores"):
        choose(index, 0.5, "sentence")


def test_token_conditioned_translator_writes_exact_layer_0_scores_trust_and_round_trips(tiny_llama, tiny_gemma,
                                                                                         tmp_path):
    (src, _), (tgt, _) = tiny_llama, tiny_gemma
    tok = _char_tokenizer()
    with one_thread():
        tr = fit(src, tgt, tok, tok, TEXTS, k=2, window=3, window_rank=8, token_rank=16, show_progress=False)
        s_state = _state(src, tok)
        out = tr.translate(s_state, CONTEXT, src, tgt, tok, tok)
        inputs = tr.prepare(s_state, CONTEXT, src, tgt, tok, tok)
        scores = tr.trust_scores(inputs)
        full = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, recompute=1.0)
    own = _state(tgt, tok)
    k0 = unrotated(out, tgt, [0])[0][0]
    k_own = unrotated(own, tgt, [0])[0][0]
    m = k_own.shape[2]
    assert torch.allclose(k0[:, :, -m:], k_own, atol=1e-5)  # layer 0 is the target's own
    assert scores[0] == float("-inf") and torch.isfinite(scores[1:]).all()  # <bos> is exact
    assert full.meta["recomputed_tokens"] == own.num_tokens
    for a, b in zip(full.layers, own.layers):
        assert torch.allclose(a.keys[:, :, -b.length:], b.keys, atol=1e-4)
    assert tr.config.window == 3 and tr.config.token_rank == 16
    path = tmp_path / "t.safetensors"
    tr.save(path)
    back = Translator.load(path)
    assert all(torch.equal(p, q) for p, q in zip(back.state_dict().values(), tr.state_dict().values()))
    with pytest.raises(ValueError, match="0 to 1"):
        tr.translate(s_state, CONTEXT, src, tgt, tok, tok, recompute=2.0)
    with pytest.raises(ValueError, match="unknown recompute selection"):
        tr.translate(s_state, CONTEXT, src, tgt, tok, tok, recompute=0.1, select="random")
    with one_thread():  # select="sentence": the trust scores grouped by the target tokenizer's sentences
        by_sent = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, recompute=0.3, select="sentence")
        idx = choose(inputs.a.index, 0.3, "sentence", by_sentence(scores, sentence_ids(tok, CONTEXT)))
        want = recompute(tgt, out, idx)
    assert by_sent.meta["recomputed_tokens"] == len(idx) == round(0.3 * (own.num_tokens - 1))
    for a, b in zip(by_sent.layers, want.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_translator_file_of_an_older_format_is_refused_by_name(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_llama
    tok = _char_tokenizer()
    with one_thread():
        tr = fit(model, model, tok, tok, TEXTS[:2], strategy="uniform", token_rank=0, window=1, show_progress=False)
    from dataclasses import asdict

    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in tr.state_dict().items()}, str(path),
              metadata={"kvforge-translator": json.dumps({"format": 1, "config": asdict(tr.config)})})
    with pytest.raises(ArtifactError, match="format version 1"):
        Translator.load(path)


def test_fact_passages_use_pools_apart_from_the_qa_evaluation_and_mark_answers():
    from kvforge.eval import qa
    from kvforge.translate import facts

    for ours, theirs in ((facts.FIRST, qa.FIRST), (facts.LAST, qa.LAST), (facts.PLACES, qa.PLACES),
                         (facts.THINGS, qa.THINGS),
                         (facts.WORDS + facts.SHADES + facts.WEEKDAYS + facts.MATERIALS, qa.WORDS + qa.COLORS + qa.MONTHS)):
        assert not {w.lower() for w in ours} & {w.lower() for w in theirs}
    assert not set(facts.FILLER) & set(qa.FILLER)
    items = facts.fact_passages(5, seed=3)
    assert items == facts.fact_passages(5, seed=3) and items != facts.fact_passages(5, seed=4)
    tok = _char_tokenizer(with_bos=False)
    for f in items:
        ids, mask = facts.answer_mask(tok, f.continuation, f.answers)
        marked = "".join(f.continuation[i] for i, m in enumerate(mask) if m)  # one token per character
        assert marked == "".join(f.continuation[b:e] for b, e in f.answers)
        for b, e in f.answers:
            assert f.continuation[b:e] in f.context.split("Passage: ")[-1]  # the answer is in the last passage
    assert qa.DEMO.split("Passage: ")[1] not in "".join(f.context for f in items)


def _prefix_state(model, tok, n, text=CONTEXT):
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    with one_thread():
        return KVState.from_cache(prefilled_cache(model, ids), model, ids)


def test_prefix_tokens_stops_before_a_token_that_crosses_the_boundary():
    from test_translate import _word_tokenizer

    from kvforge.translate.align import prefix_tokens

    tok = _char_tokenizer()
    assert prefix_tokens(tok, CONTEXT, 12) == 13  # <bos> and 12 characters
    assert prefix_tokens(tok, CONTEXT, 0) == 1
    words = _word_tokenizer()
    text = CONTEXT[:40]
    off = words(text, return_offsets_mapping=True)["offset_mapping"]
    cut = off[3][1] + 1  # one character into the space before the fifth token: that token does not fit
    n = prefix_tokens(words, text, cut)
    assert all(e <= cut for _, e in off[:n]) and off[n][1] > cut
    with pytest.raises(ValueError, match="a prefix of 41 characters of a 40-character text"):
        prefix_tokens(words, text, 41)


def test_an_own_prefix_is_spliced_in_exactly_and_never_recomputed(tiny_llama, tiny_gemma):
    """The target's own cached opening replaces the translation of those tokens exactly; recomputation draws
    its share from the other tokens only; own prefix + every other token re-read is the own prefill."""
    (src, _), (tgt, _) = tiny_llama, tiny_gemma
    tok = _char_tokenizer()
    p = 13  # <bos> and 12 characters: within the tiny Gemma's sliding window of 16
    prefix = _prefix_state(tgt, tok, p)
    with one_thread():
        tr = fit(src, tgt, tok, tok, TEXTS[:4], k=2, window=3, window_rank=8, token_rank=16, show_progress=False)
        s_state = _state(src, tok)
        plain = tr.translate(s_state, CONTEXT, src, tgt, tok, tok)
        spliced = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own_prefix=prefix)
        part = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own_prefix=prefix, recompute=0.2)
        full = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own_prefix=prefix, recompute=1.0)
    own = _state(tgt, tok)
    n = own.num_tokens
    for a, b, c in zip(spliced.layers, prefix.layers, plain.layers):
        assert torch.equal(a.keys[:, :, :p], b.keys) and torch.equal(a.values[:, :, :p], b.values)
        assert torch.equal(a.keys[:, :, p:], c.keys[:, :, p:]) and torch.equal(a.values[:, :, p:], c.values[:, :, p:])
    assert spliced.meta["own_prefix_tokens"] == p
    assert part.meta["recomputed_tokens"] == round(0.2 * (n - 1))  # a share of every translated token
    for a, b, c in zip(part.layers, prefix.layers, spliced.layers):
        assert torch.equal(a.keys[:, :, :p], b.keys)  # the prefix is never re-read
        assert not torch.equal(a.keys[:, :, p:], c.keys[:, :, p:]) or a is part.layers[0]
    assert full.meta["recomputed_tokens"] == n - p
    for a, b in zip(full.layers, own.layers):
        assert torch.allclose(a.keys[:, :, -b.length:], b.keys, atol=1e-4)
        assert torch.allclose(a.values[:, :, -b.length:], b.values, atol=1e-4)


def test_an_own_prefix_that_is_not_the_texts_opening_is_refused(tiny_llama, tiny_gemma):
    (src, _), (tgt, _) = tiny_llama, tiny_gemma
    tok = _char_tokenizer()
    with one_thread():
        tr = fit(src, tgt, tok, tok, TEXTS[:2], k=2, window=3, window_rank=8, token_rank=16, show_progress=False)
        s_state = _state(src, tok)

        def go(prefix):
            return tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own_prefix=prefix)

        with pytest.raises(KVStateError, match="differ at token 5"):
            go(_prefix_state(tgt, tok, 13, CONTEXT[:4] + "#" + CONTEXT[5:]))
        with pytest.raises(KVStateError, match="state of another model"):
            go(_prefix_state(src, tok, 13))
        with pytest.raises(KVStateError, match="holds fewer"):
            go(_prefix_state(tgt, tok, 40))  # longer than the tiny Gemma's sliding window


def test_own_prefix_training_keeps_the_few_shot_opening_exact_and_trains_the_passage(tiny_llama, tiny_gemma):
    """With ``own_prefix``, a fact passage's few-shot opening (up to "Passage: ") is the target's own state in
    the student's past, exactly, as ``translate(own_prefix=...)`` serves it; the passage after it is the
    translation, and only it carries gradient to the maps."""
    from test_translate import _train_setup

    from kvforge.translate.data import fact_examples
    from kvforge.translate.train import prepare, student_state

    (src, _), (tgt, _) = tiny_gemma, tiny_llama  # a target without sliding layers holds the whole opening
    tok = _char_tokenizer()
    plain = fact_examples(8, 5, tok, 4.0)
    shared = fact_examples(8, 5, tok, 4.0, own_prefix=1.0)
    assert [e.context for e in plain] == [e.context for e in shared] and all(e.own_prefix_chars == 0 for e in plain)
    heads = [e for e in shared if e.own_prefix_chars]
    assert heads and len(heads) < len(shared)  # passages without a few-shot opening keep none
    for e in heads:
        assert e.context[: e.own_prefix_chars].endswith("\n\nPassage: ") and "Passage: " not in e.context[e.own_prefix_chars:]
    with one_thread():
        tr, tok = _train_setup(src, tgt)
        p = prepare(tr, heads[0], src, tgt, tok, tok, 16, 1.0)
        q = prepare(tr, next(x for x in plain if x.context == heads[0].context), src, tgt, tok, tok, 16, 1.0)
        assert p.prefix == len(tok(heads[0].context[: heads[0].own_prefix_chars]).input_ids) and q.prefix == 0
        spliced, translated = student_state(tr, p, tgt), student_state(tr, q, tgt)
        spliced.layers[-1].keys.sum().backward()
    n = p.prefix
    for s, t, o in zip(spliced.layers, translated.layers, p.own.layers):
        assert torch.equal(s.keys[:, :, :n], o.keys[:, :, :n]) and torch.equal(s.values[:, :, :n], o.values[:, :, :n])
        assert torch.equal(s.keys[:, :, n:], t.keys[:, :, n:])
    assert not torch.allclose(translated.layers[-1].keys[:, :, :n], p.own.layers[-1].keys[:, :, :n])  # (layer 0 is exact)
    assert any(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in tr.maps)


def test_the_default_training_settings_fit_the_texts_they_read():
    """`kvforge translate train` with no options reads the pydoc calibration and eval parts: the default
    numbers of examples must fit in them (128 general pieces stopped fitting when the calibration part lost
    its repeated paragraphs)."""
    from kvforge.texts import load_text
    from kvforge.translate.data import examples
    from kvforge.translate.train import TrainConfig

    cfg, tok = TrainConfig(), _char_tokenizer(with_bos=False)
    train = examples(load_text("pydoc", "calibration"), cfg.train_examples, cfg.context_chars, 4, tok,
                     stride=cfg.context_chars // 2)
    val = examples(load_text("pydoc", "eval"), cfg.val_examples, cfg.context_chars, 4, tok)
    assert len(train) == cfg.train_examples and len(val) == cfg.val_examples


def test_training_through_recomputation_matches_the_recompute_used_at_inference(tiny_llama, tiny_gemma):
    """With ``recompute``, the student's past is the translation with the chosen share re-read by the target
    (``select="sentence"``, after the own prefix), equal to :func:`recompute` at inference, and the loss's
    gradient reaches the maps through the re-read tokens."""
    from test_translate import _train_setup

    from kvforge.translate.data import fact_examples
    from kvforge.translate.recompute import splice_prefix
    from kvforge.translate.train import prepare, student_state

    (src, _), (tgt, _) = tiny_gemma, tiny_llama
    ex = next(e for e in fact_examples(8, 5, _char_tokenizer(), 4.0, own_prefix=1.0) if e.own_prefix_chars)
    with one_thread():
        tr, tok = _train_setup(src, tgt)
        p = prepare(tr, ex, src, tgt, tok, tok, 16, 1.0, recompute=0.2)
        n = p.own.num_tokens
        assert len(p.redo) == round(0.2 * n) and p.redo.min() >= p.prefix and p.redo.max() < n
        got = student_state(tr, p, tgt)
        with torch.no_grad():
            base = tr.build_state(tr.project(p.inputs.to(torch.float32)), p.inputs.a, tgt)[:n]
            want = recompute(tgt, splice_prefix(base, p.own[: p.prefix]), p.redo)
        got.layers[-1].values[:, :, p.redo].sum().backward()
    for g, w in zip(got.layers, want.layers):
        assert torch.allclose(g.keys, w.keys, atol=1e-5) and torch.allclose(g.values, w.values, atol=1e-5)
    assert any(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in tr.maps[1:])


@pytest.mark.parametrize("kw, match", [({"own_prefix": 2.0}, "own_prefix is a share"),
                                       ({"recompute": 1.0}, "recompute is a share"),
                                       ({"recompute": -0.1}, "recompute is a share"),
                                       ({"mode": "fuse", "recompute": 0.1}, "replace-mode translation"),
                                       ({"mode": "fuse", "own_prefix": 0.5}, "replace-mode translation")])
def test_training_through_re_reads_refuses_shares_out_of_range_and_fuse_mode(kw, match):
    from kvforge.translate.train import TrainConfig

    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
