"""The contract matrix: every registered cache spec through the same checks, on both tiny architectures.

Each line of ``LINES`` is one spec. Mechanics (positions, crop, beam reordering, padded batches, state
operations, the prefix store) are checked on ``spec`` and must hold *exactly*: for a lossy scheme ``spec``
is its most precise setting (8-bit codes), where quantization error cannot flip a token, so a mismatch
is a bug and not noise. Quality is checked on ``quality`` (a real setting) against ``DynamicCache``,
within the line's stated KL tolerance. Whatever a spec cannot do is listed in ``refuses`` and the
matrix asserts that it is refused by name with a clear error. Adding a spec adds its line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from kvhelpers import CONTEXT, hf_greedy, ids_of

from kvforge import KVState, build_cache, generate, run
from kvforge.layers import KVLayer, KVStateError
from kvforge.specs import CacheNotRestorableError, cache_nbytes, known_specs, parse_spec

N_NEW = 12


@dataclass
class Line:
    spec: str  # the setting the mechanics are checked on (exact)
    quality: str | None = None  # a real lossy setting, checked against DynamicCache within `kl`
    kl: float = 0.0  # nats, mean teacher-forced KL(dynamic || spec) over N_NEW tokens
    atol: float = 1e-4  # mechanics: largest log-prob difference (float32 chunking noise by default); above
    # 1e-4 the comparison is teacher-forced on the reference's tokens instead of greedy
    refuses: dict[str, str] = field(default_factory=dict)  # check -> text the refusal must contain
    archs: tuple[str, ...] = ("llama", "gemma")
    env: dict[str, str] = field(default_factory=dict)  # environment for the whole line


SMALL = "key_group=8,value_group=16,residual=16"
LINES = [
    Line("dynamic"),
    Line("preallocated:max_seq_len=256"),
    Line("half:dtype=float16", quality="half:dtype=bfloat16", kl=0.01, atol=2e-3),
    Line("noisy:std=0.0", quality="noisy:std=0.02", kl=0.05, refuses={"restore": "noisy"}),
    # 8-bit codes: feeding tokens in other chunks quantizes them at other times (~1e-3 in log-probs)
    Line("kvforge-quant:key_bits=8,value_bits=8," + SMALL, quality="kvforge-quant:" + SMALL, kl=0.02, atol=5e-3),
    # the same with the compiled CPU kernel off: kvforge's PyTorch attention on the codes
    Line("kvforge-quant:key_bits=8,value_bits=8," + SMALL, quality="kvforge-quant:" + SMALL, kl=0.02, atol=5e-3,
         env={"KVFORGE_CPU_KERNEL": "0"}),
    Line("kvforge-quant:key_bits=8,value_bits=8,rotate=both,fused=off," + SMALL,
         quality="kvforge-quant:key_bits=2,value_bits=2,rotate=both,fused=off," + SMALL, kl=0.3, atol=5e-3),
    # attention-sink tokens and an 8-bit residual window: stored out of sequence order, read back in it
    Line("kvforge-quant:key_bits=8,value_bits=8,sink=4,residual_bits=8," + SMALL,
         quality="kvforge-quant:sink=4,residual_bits=8," + SMALL, kl=0.02, atol=5e-3),
    Line("hf-quantized:nbits=4,q_group_size=16,residual_length=16", quality="hf-quantized:nbits=4,q_group_size=16,residual_length=16",
         kl=0.1, atol=0.05, archs=("llama",),
         refuses={"restore": "hf-quantized", "crop": "cannot be cropped", "beam": "cannot reorder"}),
    Line("tiny-turboquant:key_bits=4,value_bits=4", quality="tiny-turboquant:key_bits=4,value_bits=4", kl=0.1,
         archs=("llama",), refuses={"restore": "tiny-turboquant", "crop": "cannot be cropped", "beam": "cannot reorder"}),
]
IDS = [line.spec.split(",")[0] + ("" if i < 4 else f"#{i}") + ("-" + "-".join(f"{k}={v}" for k, v in line.env.items()))
       * bool(line.env) for i, line in enumerate(LINES)]


def test_every_registered_spec_has_a_line():
    named = {parse_spec(line.spec).name for line in LINES}
    assert set(known_specs()) <= named, f"specs without a contract line: {set(known_specs()) - named}"


@pytest.fixture(params=LINES, ids=IDS)
def line(request, monkeypatch):
    line = request.param
    for k, v in line.env.items():
        monkeypatch.setenv(k, v)
    ok, why = parse_spec(line.spec).available()
    if not ok:
        pytest.skip(f"{line.spec}: {why}")
    return line


@pytest.fixture
def arch(tiny, line):
    model, tok = tiny
    name = model.kvforge_name.removeprefix("tiny-")
    if name not in line.archs:
        with pytest.raises(ValueError, match="full attention|sliding-window"):  # refused by name at build time
            build_cache(line.spec, model)
        pytest.skip(f"{line.spec} refuses {name} (asserted)")
    return model, tok


def _ids(tok, text=CONTEXT):
    return ids_of(tok, text)


def _refused(line, check) -> str | None:
    return line.refuses.get(check)


# ---------------------------------------------------------------------------- generation
def test_generate_matches_transformers_generate(line, arch):
    """``kvforge.generate`` and ``model.generate`` with the same spec pick the same tokens; both equal the
    DynamicCache's for the exact setting."""
    model, tok = arch
    ids = _ids(tok)
    ours = generate(model, tok, ids, max_new_tokens=N_NEW, cache=build_cache(line.spec, model), stop_at_eos=False)
    theirs = hf_greedy(model, ids, N_NEW, cache=build_cache(line.spec, model))
    assert ours.token_ids == theirs[0].tolist()
    assert theirs[0].tolist() == hf_greedy(model, ids, N_NEW)[0].tolist()


def test_quality_within_tolerance(line, arch):
    if line.quality is None:
        pytest.skip("lossless: exactness is checked by the other tests")
    model, tok = arch
    ids = _ids(tok)
    base_cache = run.new_cache(model)
    base_tok, base_logp = run.decode(model, base_cache, run.prefill(model, ids, base_cache), N_NEW)
    cache = build_cache(line.quality, model)
    _, logp = run.decode(model, cache, run.prefill(model, ids, cache), N_NEW, forced=base_tok)
    kl = (base_logp.exp() * (base_logp - logp)).sum(-1).mean().item()
    assert kl <= line.kl, f"{line.quality}: mean KL {kl:.4f} > {line.kl}"


def test_beam_search_matches_dynamic(line, arch):
    model, tok = arch
    ids = _ids(tok)
    if _refused(line, "beam"):
        with pytest.raises(ValueError, match=_refused(line, "beam")):
            hf_greedy(model, ids, N_NEW, cache=build_cache(line.spec, model), num_beams=2)
        return
    assert torch.equal(hf_greedy(model, ids, N_NEW, cache=build_cache(line.spec, model), num_beams=2),
                       hf_greedy(model, ids, N_NEW, num_beams=2))


@torch.inference_mode()
def test_reorder_select_repeat_follow_the_batch(line, arch):
    """``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave`` move whole rows."""
    model, tok = arch
    a, b = _ids(tok, CONTEXT), _ids(tok, CONTEXT[::-1])
    ids = torch.cat([a, b])
    cache = build_cache(line.spec, model)
    run.prefill(model, ids, cache)
    if _refused(line, "beam"):
        with pytest.raises(ValueError, match=_refused(line, "beam")):
            cache.reorder_cache(torch.tensor([1, 1]))
        return
    cache.reorder_cache(torch.tensor([1, 1]))
    cache.batch_repeat_interleave(2)
    cache.batch_select_indices(torch.tensor([0, 3]))
    ref = run.new_cache(model)
    run.prefill(model, torch.cat([b, b]), ref)
    got = run.decode(model, cache, run.forward(model, a[:, -1:].repeat(2, 1), cache).logits[:, -1], 4)[0]
    want = run.decode(model, ref, run.forward(model, a[:, -1:].repeat(2, 1), ref).logits[:, -1], 4)[0]
    assert torch.equal(got, want)


def test_left_padded_batch_equals_one_at_a_time(line, arch):
    model, tok = arch
    short, long = _ids(tok, CONTEXT[:40]), _ids(tok, CONTEXT)
    pad = long.shape[1] - short.shape[1]
    ids = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    out = model.generate(ids, attention_mask=mask, **run.cache_kw(build_cache(line.spec, model)), do_sample=False,
                         max_new_tokens=N_NEW, min_new_tokens=N_NEW, pad_token_id=0)[:, ids.shape[1]:]
    for row, single in enumerate((short, long)):
        assert out[row].tolist() == hf_greedy(model, single, N_NEW, cache=build_cache(line.spec, model))[0].tolist()


# ---------------------------------------------------------------------------- crop
@pytest.mark.parametrize("remove", [0, -1, -5])
def test_crop_then_refeed_continues_unchanged(line, arch, remove):
    """As assisted decoding does: prefill, record the past, decode 6 tokens, ``crop``. ``crop(0)`` removes
    nothing; ``crop(-n)`` removes the last n, and feeding them again continues as the uncropped cache does."""
    model, tok = arch
    ids = _ids(tok)
    n = ids.shape[1]
    ref = build_cache(line.spec, model)
    want, want_logp = run.decode(model, ref, run.prefill(model, ids, ref), N_NEW)
    cache = build_cache(line.spec, model)
    run.prefill(model, ids[:, : n - 6], cache)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()
    logits = run.prefill(model, ids[:, n - 6 :], cache, chunk_size=1)  # six decode steps
    if _refused(line, "crop") and remove:
        with pytest.raises(ValueError, match=_refused(line, "crop")):
            cache.crop(remove)
        return
    cache.crop(remove)
    assert cache.get_seq_length() == n + remove
    if remove:
        logits = run.prefill(model, ids[:, n + remove :], cache)
    got, logp = run.decode(model, cache, logits, N_NEW, forced=want if line.atol > 1e-4 else None)
    assert torch.equal(got, want) and (logp - want_logp).abs().max() <= line.atol


def test_assisted_decoding_equals_greedy(line, arch):
    """Greedy with ``assistant_model=`` equals plain greedy, or is refused with an error that names crop."""
    model, tok = arch
    ids = _ids(tok)
    want = hf_greedy(model, ids, N_NEW, cache=build_cache(line.spec, model))
    try:
        got = hf_greedy(model, ids, N_NEW, cache=build_cache(line.spec, model), assistant_model=model)
    except ValueError as e:
        assert _refused(line, "crop") and "crop" in str(e)
        return
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------- memory
def test_nbytes_counts_what_is_held(line, arch):
    model, tok = arch
    cache = build_cache(line.spec, model)
    run.prefill(model, _ids(tok), cache)
    per_layer = [_storages(layer) for layer in cache.layers]
    shared = {p for a, b in zip(per_layer, per_layer[1:]) for p in set(a) & set(b)}  # e.g. one rotation matrix
    for layer, storages in zip(cache.layers, per_layer):
        if isinstance(layer, KVLayer):  # its own count equals the bytes of the tensors only it holds
            assert layer.nbytes == sum(nb for p, nb in storages.items() if p not in shared)
    assert cache_nbytes(cache) == sum(nb for d in per_layer for p, nb in d.items() if p not in shared) + sum(
        per_layer[0].get(p, 0) for p in shared) > 0


def _storages(layer) -> dict[int, int]:
    """``data_ptr -> bytes`` of every tensor storage reachable from a layer's attributes."""
    out = {}
    for v in vars(layer).values():
        if isinstance(v, torch.Tensor) and v.numel():
            if type(v) is not torch.Tensor:  # a peer's tensor subclass (quanto): its inner tensors, once
                out[id(v)] = cache_nbytes(v)
            else:
                out[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return out


def test_sliding_layers_stay_bounded(line, arch):
    model, tok = arch
    window = getattr(model.config, "sliding_window", None)
    if window is None or "sliding_attention" not in getattr(model.config, "layer_types", []):
        pytest.skip("no sliding-window layers")
    cache = build_cache(line.spec, model)
    run.prefill(model, _ids(tok), cache)
    sliding = [i for i, t in enumerate(model.config.layer_types) if t == "sliding_attention"]
    sizes = []
    for text in (" one more line of text", " and yet another line"):  # decode steps, one token at a time
        run.prefill(model, ids_of(tok, text, special=False), cache, chunk_size=1)
        sizes.append(sum(cache_nbytes(cache.layers[i]) for i in sliding))
    assert sizes[1] <= sizes[0], f"sliding layers grew from {sizes[0]} to {sizes[1]} bytes"


# ---------------------------------------------------------------------------- states
def _state(model, ids, spec):
    cache = build_cache(spec, model)
    run.prefill(model, ids, cache)
    return cache, KVState.from_cache(cache, model, ids)


def test_save_load_continues_exactly(line, arch, tmp_path):
    model, tok = arch
    ids = _ids(tok)
    cache, state = _state(model, ids, line.spec)
    if _refused(line, "restore"):
        with pytest.raises(CacheNotRestorableError, match=_refused(line, "restore")):
            parse_spec(line.spec).check_restorable()
        with pytest.raises(KVStateError):
            state.to_cache(model, build_cache(line.spec, model))
        return
    state.save(tmp_path / "s.kv")
    loaded = KVState.load(tmp_path / "s.kv", model)
    q = ids_of(tok, " and then", special=False)
    want = run.greedy(model, q, N_NEW, cache)
    got = run.greedy(model, q, N_NEW, loaded.to_cache(model, build_cache(line.spec, model)))
    assert torch.equal(got, want)
    assert generate(model, tok, q, max_new_tokens=N_NEW, state=loaded, cache=build_cache(line.spec, model),
                    stop_at_eos=False).token_ids == want[0].tolist()


def test_state_operations_continue_at_the_right_positions(line, arch):
    """Slicing, layer selection and ``concat`` keep positions: a state cut from the middle continues at its own
    positions (not 0..n-1), exactly as running those tokens at those positions does."""
    model, tok = arch
    if _refused(line, "restore"):
        pytest.skip("restore is refused (asserted by test_save_load_continues_exactly)")
    ids = _ids(tok)
    n, m = ids.shape[1], 20
    _, state = _state(model, ids, "dynamic")
    if "sliding_attention" in state.layer_types:  # a later part of a sliding layer lacks the tokens it dropped
        with pytest.raises(KVStateError, match="missing tokens"):
            KVState.concat([state[:m], state[m:]])
        state = state.select_layers([i for i, t in enumerate(state.layer_types) if t == "full_attention"])
    joined = KVState.concat([state[:m], state[m:]])
    assert torch.equal(joined.positions, state.positions)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(joined.layers, state.layers))
    whole = KVState.concat([state.select_layers(slice(0, 2)), state.select_layers(slice(0, 2))], check_positions=False)
    assert whole.num_tokens == 2 * n and whole.layer_indices == state.layer_indices[:2]
    _, state = _state(model, ids, line.spec)
    tail = state[m:]  # positions m..n-1
    assert tail.next_position == n
    q = ids_of(tok, " next", special=False)
    got = generate(model, tok, q, max_new_tokens=N_NEW, state=tail, cache=build_cache(line.spec, model),
                   stop_at_eos=False).token_ids
    ref = tail.to_cache(model, build_cache(line.spec, model))
    want = run.decode(model, ref, run.prefill(model, q, ref, start=n), N_NEW, start=n + q.shape[1])[0]
    assert got == want[0].tolist()


def test_prefix_store_restores_or_refuses(line, arch):
    from kvforge.serve.store import PrefixStore

    model, tok = arch
    if _refused(line, "restore"):
        with pytest.raises(CacheNotRestorableError, match=_refused(line, "restore")):
            PrefixStore(model, line.spec, block=8, min_tokens=8)
        return
    store = PrefixStore(model, line.spec, block=8, min_tokens=8)
    ids = _ids(tok)
    n = ids.shape[1] // 8 * 8
    cache, state = _state(model, ids[:, :n], line.spec)
    store.put(state)
    hit = store.lookup(ids[0].tolist() + [5, 6])
    assert hit is not None and hit.tokens == n
    restored = hit.state.to_cache(model, build_cache(line.spec, model))
    rest = ids[:, n:] if ids.shape[1] > n else torch.tensor([[5]])
    assert torch.equal(run.greedy(model, rest, N_NEW, restored), run.greedy(model, rest, N_NEW, cache))
