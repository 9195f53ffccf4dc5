"""kvforge.translate mechanics on tiny random models: RoPE removal, alignment, layer maps, the fit."""

from __future__ import annotations

import pytest
import torch
from kvhelpers import CONTEXT, QUESTION, forward_into, one_thread, prefilled_cache
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kvforge import KVState, generate
from kvforge.translate import (
    Translator,
    TranslatorMismatchError,
    align,
    apply_rope,
    cos_sin,
    fit,
    identity,
    layer_map,
    remove_rope,
    unrotated,
)


def _char_tokenizer(with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A fast (offset-giving) tokenizer: one token per character, ids below the tiny models' vocab."""
    vocab = {"<bos>": 1, "<unk>": 0, **{chr(c): c - 29 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    if with_bos:
        from tokenizers.processors import TemplateProcessing

        tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<unk>")


def _word_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(CONTEXT.replace(";", " ; ").replace(".", " . ").split()))
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>")


def test_rope_removal_is_exact_and_keys_move_between_positions(tiny):
    """Layer 0 keys depend only on the token and its position, so un-rotating them at p and
    re-rotating at p + 7 must give exactly the keys the model computes at p + 7."""
    model, tok = tiny
    ids = tok(CONTEXT, return_tensors="pt").input_ids
    with one_thread():
        at0 = KVState.from_cache(prefilled_cache(model, ids), model, ids)
        cache = type(prefilled_cache(model, ids[:, :1]))(config=model.config)
        forward_into(model, cache, ids, start=7)
    k0 = at0.layers[0].keys
    k7 = cache.layers[0].keys
    kind = at0.layer_types[0]
    n = ids.shape[1]
    held = k0.shape[2]  # a sliding layer holds only its last tokens
    k7 = k7[:, :, -held:]
    cos0, sin0 = cos_sin(model, torch.arange(n)[-held:], kind)
    cos7, sin7 = cos_sin(model, torch.arange(7, 7 + n)[-held:], kind)
    plain = remove_rope(k0, cos0, sin0)
    assert torch.allclose(apply_rope(plain, cos0, sin0), k0, atol=1e-5)
    assert torch.allclose(apply_rope(plain, cos7, sin7), k7, atol=1e-4)


def test_gemma_layer_types_use_their_own_rotary_base(tiny_gemma):
    model, _ = tiny_gemma
    pos = torch.arange(50)
    c_sliding, _ = cos_sin(model, pos, "sliding_attention")
    c_full, _ = cos_sin(model, pos, "full_attention")
    assert not torch.allclose(c_sliding, c_full)


def test_alignment_maps_each_target_token_to_the_source_token_covering_its_last_character():
    text = "pack my box; with five dozen."
    a = align(text, _word_tokenizer(), _char_tokenizer())
    assert len(a.target_ids) == len(text) + 1 and a.index[0] == -1  # <bos> has no source
    # the characters of "pack" map to source token 0, those of " my" to the token "my" (1)
    assert a.index[1:5].tolist() == [0, 0, 0, 0] and a.index[5:8].tolist() == [0, 1, 1]
    back = align(text, _char_tokenizer(), _word_tokenizer())  # the other way round: the word's last char
    assert back.index[0].item() == 4 and len(back.target_ids) == len(_word_tokenizer()(text).input_ids)


def test_layer_maps():
    assert layer_map(30, 18, "terminal")[-1] == [29] and layer_map(30, 18, "terminal")[0] == [12]
    assert layer_map(30, 18, "uniform")[0] == [0] and layer_map(30, 18, "uniform")[-1] == [29]
    near = layer_map(30, 18, "nearest", k=3)
    assert all(len(x) == 3 for x in near) and near[-1] == [27, 28, 29]
    assert layer_map(3, 5, "all")[2] == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown layer strategy"):
        layer_map(3, 3, "random")


def test_identity_translator_reproduces_the_model(tiny_llama):
    model, _ = tiny_llama
    tok = _char_tokenizer()
    with one_thread():
        state = KVState.from_cache(prefilled_cache(model, tok(CONTEXT, return_tensors="pt").input_ids), model,
                                   tok(CONTEXT, return_tensors="pt").input_ids)
        tr = identity(model, "tiny-llama")
        out = tr.translate(state, CONTEXT, model, model, tok, tok)
        a = generate(model, tok, QUESTION, max_new_tokens=6, state=out, stop_at_eos=False)
        b = generate(model, tok, QUESTION, max_new_tokens=6, state=state, stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_fit_learns_a_model_into_itself_and_round_trips_to_disk(tiny_llama, tmp_path):
    """Fitting a model onto itself (same layer fed in): the ridge map is nearly the identity, so the
    translated cache continues like the model's own; the saved translator refuses another pair."""
    model, _ = tiny_llama
    tok = _char_tokenizer()
    texts = [CONTEXT[i:] + CONTEXT[:i] for i in range(0, 80, 8)]
    with one_thread():
        tr = fit(model, model, tok, tok, texts, strategy="uniform", ridge=1e-6, show_progress=False)
        ids = tok(CONTEXT, return_tensors="pt").input_ids
        own = KVState.from_cache(prefilled_cache(model, ids), model, ids)
        out = tr.translate(own, CONTEXT, model, model, tok, tok)
        for a, b in zip(unrotated(out, model).values(), unrotated(own, model).values()):
            n = min(a[0].shape[2], b[0].shape[2])  # a sliding layer of the model's own state holds fewer
            assert torch.allclose(a[0][:, :, -n:], b[0][:, :, -n:], atol=1e-2)
            assert torch.allclose(a[1][:, :, -n:], b[1][:, :, -n:], atol=1e-2)
        g1 = generate(model, tok, QUESTION, max_new_tokens=6, state=out, stop_at_eos=False)
        g2 = generate(model, tok, QUESTION, max_new_tokens=6, state=own, stop_at_eos=False)
    assert g1.token_ids == g2.token_ids
    path = tmp_path / "t.safetensors"
    tr.save(path)
    back = Translator.load(path)
    assert back.config.layers == tr.config.layers and back.config.tokens_fitted > 0
    assert all(torch.equal(p, q) for p, q in zip(back.state_dict().values(), tr.state_dict().values()))
    other, _ = TINY_OTHER(model)
    with pytest.raises(TranslatorMismatchError, match="fitted for"):
        back.translate(own, CONTEXT, model, other, tok, tok)


@pytest.mark.parametrize("direction", ["gemma->llama", "llama->gemma"])
def test_fit_bridges_heads_head_dims_and_sliding_layers(tiny_llama, tiny_gemma, direction):
    """GQA 2 heads x 16 <-> MQA 1 head x 32, 3 full layers <-> 3 sliding + 1 full: the translated state has
    the target's shapes and the target continues from it."""
    (src, _), (tgt, _) = (tiny_gemma, tiny_llama) if direction == "gemma->llama" else (tiny_llama, tiny_gemma)
    tok = _char_tokenizer()
    texts = [CONTEXT[i:] + CONTEXT[:i] for i in range(0, 80, 10)]
    with one_thread():
        tr = fit(src, tgt, tok, tok, texts, strategy="nearest", k=2, show_progress=False)
        ids = tok(CONTEXT, return_tensors="pt").input_ids
        s_state = KVState.from_cache(prefilled_cache(src, ids), src, ids)
        out = tr.translate(s_state, CONTEXT, src, tgt, tok, tok)
        res = generate(tgt, tok, QUESTION, max_new_tokens=4, state=out, stop_at_eos=False)
    cfg = tgt.config
    assert len(out.layers) == cfg.num_hidden_layers and out.num_tokens == ids.shape[1]
    assert out.layers[0].keys.shape[1:] == (cfg.num_key_value_heads, ids.shape[1], cfg.head_dim)
    assert len(res.token_ids) == 4 and res.forwarded_tokens == len(tok(QUESTION, add_special_tokens=False).input_ids) + 3
    if direction == "gemma->llama":  # only the source's full-attention layer feeds the map
        assert all(js == [3] for js in tr.config.layers)


def TINY_OTHER(model):  # noqa: N802 - a factory named like the fixture it stands in for
    import copy

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    return other, None


def _train_setup(src, tgt, mode="replace"):
    """A fitted translator whose maps are then perturbed, so that training has something to recover."""
    from kvforge.translate.train import with_mode

    tok = _char_tokenizer()
    texts = [CONTEXT[i:] + CONTEXT[:i] for i in range(0, 80, 10)]
    tr = fit(src, tgt, tok, tok, texts, strategy="nearest", k=2, show_progress=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for lin in tr.maps:
            lin.weight.add_(torch.randn_like(lin.weight) * lin.weight.std() * 3)
    return (with_mode(tr, mode) if mode != "replace" else tr), tok


def _tiny_train_config(**kw):
    from kvforge.translate.train import TrainConfig

    base = dict(steps=6, batch=1, lr=3e-3, train_examples=4, val_examples=2, context_chars=60, continuation_tokens=8,
                eval_every=3, checkpoint_every=3, top_k=16, fact_examples=2, fact_val_examples=1)
    return TrainConfig(**{**base, **kw})


def test_kl_training_lowers_validation_kl_and_resumes_exactly(tiny_llama, tiny_gemma, tmp_path):
    """Distillation with both models frozen lowers the validation KL to the target's own prefill; a run
    stopped at step 3 and resumed from its checkpoint ends with the same weights as an uninterrupted run."""
    from kvforge.translate.train import train

    (src, _), (tgt, _) = tiny_llama, tiny_gemma
    text = " ".join([CONTEXT] * 12)
    with one_thread():
        tr, tok = _train_setup(src, tgt)
        frozen = [p.clone() for p in tgt.parameters()]
        whole = train(tr, src, tgt, tok, tok, _tiny_train_config(), text, text[::-1], show_progress=False,
                      log=lambda *_: None)
        part, _ = _train_setup(src, tgt)
        train(part, src, tgt, tok, tok, _tiny_train_config(steps=3), text, text[::-1], checkpoint_dir=tmp_path,
              show_progress=False, log=lambda *_: None)
        resumed, _ = _train_setup(src, tgt)
        msgs = []
        train(resumed, src, tgt, tok, tok, _tiny_train_config(), text, text[::-1], checkpoint_dir=tmp_path,
              show_progress=False, log=msgs.append)
    kl = [h["kl"] for h in whole.history]
    assert [h["step"] for h in whole.history] == [0, 3, 6] and kl[-1] < kl[0]
    assert all(torch.equal(a, b) for a, b in zip(frozen, tgt.parameters()))  # the target stays frozen
    assert any("resumed" in m and "step 3" in m for m in msgs)
    for a, b in zip(whole.history, train_history(tmp_path)):
        assert a["step"] == b["step"] and abs(a["kl"] - b["kl"]) < 1e-4
    for (n, a), b in zip(tr.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), n
    assert Translator.load(tmp_path / "translator.safetensors").config.trained_steps == 6


def train_history(path):
    import json

    return json.loads((path / "history.json").read_text())["history"]


def test_fuse_gate_spans_own_and_translated_and_trains(tiny_llama, tiny_gemma):
    from kvforge.translate.train import train

    (src, _), (tgt, _) = tiny_llama, tiny_gemma
    with one_thread():
        tr, tok = _train_setup(src, tgt, "fuse")
        ids_s = tok(CONTEXT, return_tensors="pt").input_ids
        s_state = KVState.from_cache(prefilled_cache(src, ids_s), src, ids_s)
        own = KVState.from_cache(prefilled_cache(tgt, ids_s), tgt, ids_s)
        with pytest.raises(ValueError, match="needs the target's own state"):
            tr.translate(s_state, CONTEXT, src, tgt, tok, tok)
        replace = Translator(type(tr.config)(**{**tr.config.__dict__, "mode": "replace"}))
        replace.load_state_dict({k: v for k, v in tr.state_dict().items() if k != "gate"})
        translated = replace.translate(s_state, CONTEXT, src, tgt, tok, tok)
        with torch.no_grad():
            tr.gate.fill_(-50.0)
            low = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own=own)
            tr.gate.fill_(50.0)
            high = tr.translate(s_state, CONTEXT, src, tgt, tok, tok, own=own)
            tr.gate.fill_(-3.0)
        before = tr.gate.detach().clone()
        text = " ".join([CONTEXT] * 12)
        train(tr, src, tgt, tok, tok, _tiny_train_config(mode="fuse", steps=2, keep_best=False), text, text[::-1],
              show_progress=False, log=lambda *_: None)
    for lo, hi, o, t in zip(low.layers, high.layers, own.layers, translated.layers):
        assert torch.allclose(lo.keys, o.keys) and torch.allclose(lo.values, o.values)
        n = o.length  # a sliding layer of the own state holds only its last tokens
        assert torch.allclose(hi.keys, t.keys[:, :, -n:], atol=1e-5)
        assert torch.allclose(hi.values, t.values[:, :, -n:], atol=1e-5)
    assert not torch.equal(before, tr.gate.detach())
