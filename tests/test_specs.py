"""Cache spec strings: parsing, errors, building, availability, and memory accounting."""

from __future__ import annotations

import pytest
import torch
from kvhelpers import CONTEXT, forward_into, ids_of, one_thread, prefilled_cache
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvforge import PreallocatedCache, UnknownCacheSpecError, build_cache, cache_nbytes, generate, parse_spec
from kvforge.specs import _REGISTRY, CacheKind, CacheSpec, CacheUnavailableError, known_specs

BUILTIN = ["dynamic", "hf-quantized", "noisy", "preallocated", "tiny-turboquant"]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


# ----------------------------------------------------------------------------- parsing
def test_known_specs_include_the_builtins():
    kinds = known_specs()
    assert set(BUILTIN) <= set(kinds)
    assert all(kinds[n].description for n in BUILTIN)


@pytest.mark.parametrize(
    "text, name, params",
    [
        ("dynamic", "dynamic", {}),
        ("  dynamic  ", "dynamic", {}),
        ("preallocated", "preallocated", {}),
        ("preallocated:max_seq_len=64", "preallocated", {"max_seq_len": 64}),
        ("noisy:std=0.5", "noisy", {"std": 0.5}),
        ("noisy:std=1,seed=3", "noisy", {"std": 1.0, "seed": 3}),
        ("noisy: std=0.25 , seed=4 ", "noisy", {"std": 0.25, "seed": 4}),
        ("hf-quantized:backend=hqq,nbits=2", "hf-quantized", {"backend": "hqq", "nbits": 2}),
        ("tiny-turboquant:preset=compact", "tiny-turboquant", {"preset": "compact"}),
    ],
)
def test_parse_known_specs(text, name, params):
    spec = parse_spec(text)
    assert spec == CacheSpec(name, params)
    assert spec.params == params
    for key, value in params.items():
        assert type(value) is type(spec.kind.defaults[key])  # coerced to the default's type
    assert parse_spec(str(spec)) == spec  # str() round-trips
    assert parse_spec(spec) is spec


def test_unknown_spec_name_lists_known_names():
    with pytest.raises(UnknownCacheSpecError) as e:
        parse_spec("no-such-cache:x=1")
    msg = str(e.value)
    assert "no-such-cache" in msg
    for name in BUILTIN:
        assert name in msg


def test_unknown_parameter_lists_parameters():
    with pytest.raises(UnknownCacheSpecError) as e:
        parse_spec("preallocated:size=3")
    assert "'size'" in str(e.value) and "max_seq_len" in str(e.value)
    with pytest.raises(UnknownCacheSpecError, match="parameters: none"):
        parse_spec("dynamic:x=1")


@pytest.mark.parametrize(
    "text, expected",
    [("preallocated:max_seq_len=big", "is not an int"), ("preallocated:max_seq_len=1.5", "is not an int"),
     ("noisy:std=abc", "is not a float")],
)
def test_wrong_type_parameter(text, expected):
    with pytest.raises(UnknownCacheSpecError, match=expected):
        parse_spec(text)


def test_parameter_without_value():
    with pytest.raises(UnknownCacheSpecError, match="key=value"):
        parse_spec("preallocated:max_seq_len")


def test_bool_and_untyped_parameters(monkeypatch):
    monkeypatch.setitem(
        _REGISTRY, "test-kind", CacheKind("test-kind", lambda model, **kw: kw, {"flag": False, "any": None}, "test")
    )
    assert parse_spec("test-kind:flag=yes").params == {"flag": True}
    assert parse_spec("test-kind:flag=0").params == {"flag": False}
    with pytest.raises(UnknownCacheSpecError, match="not a bool"):
        parse_spec("test-kind:flag=maybe")
    assert parse_spec("test-kind:any=3").params == {"any": 3}
    assert parse_spec("test-kind:any=0.5").params == {"any": 0.5}
    assert parse_spec("test-kind:any=none").params == {"any": None}
    assert parse_spec("test-kind:any=text").params == {"any": "text"}
    # build passes defaults overridden by the given parameters
    assert build_cache("test-kind:flag=1", model=None) == {"flag": True, "any": None}


# ----------------------------------------------------------------------------- building
def test_build_dynamic(tiny):
    model, _ = tiny
    cache = build_cache("dynamic", model)
    assert type(cache) is DynamicCache and len(cache.layers) == model.config.num_hidden_layers


def test_build_preallocated(tiny):
    model, tok = tiny
    cache = build_cache("preallocated:max_seq_len=128", model)
    assert isinstance(cache, PreallocatedCache) and cache.max_seq_len == 128
    assert all(layer.max_seq_len == 128 for layer in cache.layers)
    assert build_cache("preallocated", model).max_seq_len == 4096  # the default
    a = generate(model, tok, CONTEXT, max_new_tokens=8, cache=cache, stop_at_eos=False)
    b = generate(model, tok, CONTEXT, max_new_tokens=8, cache=build_cache("dynamic", model), stop_at_eos=False)
    assert a.token_ids == b.token_ids


def test_build_noisy_adds_noise_of_the_asked_size(tiny):
    model, tok = tiny
    ids = ids_of(tok, CONTEXT)
    clean = prefilled_cache(model, ids)
    noisy = build_cache("noisy:std=0.5", model)
    # the same layer kinds as a DynamicCache (sliding layers keep their window)
    assert [isinstance(x, DynamicSlidingWindowLayer) for x in noisy.layers] == [
        isinstance(x, DynamicSlidingWindowLayer) for x in clean.layers
    ]
    forward_into(model, noisy, ids)
    # layer 0 sees the same input, so its stored keys are exactly clean + noise of std 0.5 x RMS
    k_clean, k_noisy = clean.layers[0].keys, noisy.layers[0].keys
    rel = (k_noisy - k_clean).pow(2).mean().sqrt() / k_clean.pow(2).mean().sqrt()
    assert 0.4 < float(rel) < 0.6
    # reproducible by seed; a different seed gives different noise; std=0 is the clean cache
    again = build_cache("noisy:std=0.5", model)
    forward_into(model, again, ids)
    assert torch.equal(again.layers[0].keys, k_noisy)
    other = build_cache("noisy:std=0.5,seed=1", model)
    forward_into(model, other, ids)
    assert not torch.equal(other.layers[0].keys, k_noisy)
    zero = build_cache("noisy:std=0", model)
    forward_into(model, zero, ids)
    assert torch.equal(zero.layers[0].keys, k_clean)


# ----------------------------------------------------------------------------- availability
def test_tiny_turboquant_is_available_and_builds(tiny_llama):
    model, tok = tiny_llama
    spec = parse_spec("tiny-turboquant")
    assert spec.available() == (True, "")
    cache = build_cache(spec, model)
    from tiny_turboquant import TinyKVCache

    assert isinstance(cache, TinyKVCache)
    res = generate(model, tok, CONTEXT, max_new_tokens=8, cache=cache, stop_at_eos=False)
    assert len(res.token_ids) == 8 and res.stats["cache"].startswith("TinyKVCache")
    assert cache.get_seq_length() == len(CONTEXT) + 1 + 8 - 1
    assert cache_nbytes(cache) > 0
    assert isinstance(build_cache("tiny-turboquant:key_bits=4,value_bits=4", model), TinyKVCache)


def test_hf_quantized_is_unavailable_without_optimum_quanto(tiny_llama, monkeypatch):
    import importlib.util

    import kvforge.specs

    model, _ = tiny_llama
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):  # as if optimum-quanto were not installed
        return None if name.startswith("optimum") else real_find_spec(name, *args)

    monkeypatch.setattr(kvforge.specs.importlib.util, "find_spec", find_spec)
    spec = parse_spec("hf-quantized:nbits=2")  # known, so it still parses
    ok, why = spec.available()
    assert not ok
    assert "optimum.quanto" in why and "pip install optimum-quanto" in why
    with pytest.raises(CacheUnavailableError, match="unavailable") as e:
        build_cache(spec, model)
    assert "hf-quantized" in str(e.value)


def test_hf_quantized_builds_when_optimum_quanto_is_installed(tiny_llama):
    pytest.importorskip("optimum.quanto")
    model, tok = tiny_llama
    assert parse_spec("hf-quantized").available() == (True, "")
    # the tiny model's head_dim is 16, so quantize in groups of 16
    cache = build_cache("hf-quantized:q_group_size=16,residual_length=16", model)
    from transformers import QuantizedCache

    assert isinstance(cache, QuantizedCache)
    res = generate(model, tok, CONTEXT, max_new_tokens=8, cache=cache, stop_at_eos=False)
    assert len(res.token_ids) == 8 and cache.get_seq_length() == len(CONTEXT) + 1 + 8 - 1


def test_missing_parent_package_counts_as_unavailable(monkeypatch):
    # find_spec("a.b") raises (rather than returning None) when package "a" itself is missing
    kind = CacheKind("ghost", lambda model: None, {}, "test", requires=("no_such_pkg_kvforge.sub", "torch"))
    assert kind.missing() == ["no_such_pkg_kvforge.sub"]
    monkeypatch.setitem(_REGISTRY, "ghost", kind)
    with pytest.raises(CacheUnavailableError, match="no_such_pkg_kvforge"):
        build_cache("ghost", model=None)


# ----------------------------------------------------------------------------- memory accounting
def test_cache_nbytes_of_a_dynamic_cache(tiny):
    model, tok = tiny
    cache = prefilled_cache(model, ids_of(tok, CONTEXT))
    held = sum(x.numel() * x.element_size() for layer in cache.layers for x in (layer.keys, layer.values))
    storages = {}
    for layer in cache.layers:
        for x in (layer.keys, layer.values):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    if not any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        assert cache_nbytes(cache) == held
    else:
        # a sliding layer's window is a view that pins the whole prefill's storage: that is what it holds
        assert sum(storages.values()) > held
        assert sum(storages.values()) <= cache_nbytes(cache) <= sum(storages.values()) + 64 * len(cache.layers)


def test_cache_nbytes_of_a_preallocated_cache_is_its_capacity(tiny):
    model, tok = tiny
    cache = PreallocatedCache(model, 256)
    forward_into(model, cache, ids_of(tok, CONTEXT))
    assert cache_nbytes(cache) == cache.nbytes
    cfg = model.config.get_text_config(decoder=True)
    assert cache.nbytes == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 256 * cfg.head_dim * 4


def test_split_specs_keeps_parameters_with_their_spec():
    from kvforge.specs import split_specs

    assert split_specs("dynamic,tiny-turboquant:key_bits=4,value_bits=2,noisy:std=0.1") == [
        "dynamic", "tiny-turboquant:key_bits=4,value_bits=2", "noisy:std=0.1"]
    assert split_specs("dynamic; noisy:std=0.1") == ["dynamic", "noisy:std=0.1"]
    with pytest.raises(UnknownCacheSpecError, match="starts with a parameter"):
        split_specs("nbits=4,dynamic")


def test_tiny_turboquant_cache_exports_to_a_dense_state(tiny_llama):
    from kvforge import KVState

    model, tok = tiny_llama
    cache = build_cache("tiny-turboquant", model)
    ids = tok(CONTEXT, return_tensors="pt").input_ids
    forward_into(model, cache, ids)
    state = KVState.from_cache(cache, model, ids)
    assert state.num_tokens == ids.shape[1] and state.layers[0].kind == "dense"
