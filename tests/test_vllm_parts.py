"""The vLLM connector's parts that need no vLLM: settings, version guard, the paged-layout probe, the model
skeleton's fingerprint, and the store's cheap membership test. (The connector in vLLM itself:
tests/test_vllm_connector.py.)"""

from __future__ import annotations

import pytest
import torch

from kvforge.integrations.vllm import TESTED_VLLM, ConnectorConfig, check_vllm_version
from kvforge.integrations.vllm.paged import PagedKV, PagedLayoutError, probe_layout
from kvforge.models import fingerprint, load_skeleton
from kvforge.run import new_cache, prefill
from kvforge.serve import PrefixStore
from kvforge.state import KVState


# ----------------------------------------------------------------------------------------- settings
def test_config_defaults_and_values():
    cfg = ConnectorConfig.from_extra({"store": "redis://127.0.0.1:6379", "cache": "kvforge-quant:preset=safe",
                                      "store_bytes": "1000000", "block": 32})
    assert cfg.store == "redis://127.0.0.1:6379" and cfg.store_bytes == 1_000_000 and cfg.min_tokens == 64
    assert ConnectorConfig.from_extra(None) == ConnectorConfig()


@pytest.mark.parametrize("extra, words", [
    ({"stor": "memory"}, ["unknown", "stor", "known: store"]),
    ({"block": "big"}, ["block='big'", "an int"]),
    ({"block": True}, ["block=True"]),
    ({"block": 0}, ["block=0", ">= 1"]),
    ({"cache": "kvforge-quant:preset=nope"}, ["cache='kvforge-quant:preset=nope'", "nope"]),
    ({"cache": "no-such-cache"}, ["cache=", "no-such-cache"]),
    ({"store": None}, ["store=None", "a str"]),
    ({"store": "127.0.0.1:6379"}, ["store='127.0.0.1:6379'", "redis://"]),
    ({"store": "redis:/127.0.0.1:6379"}, ["redis:/127.0.0.1"]),
    ({"store": "http://127.0.0.1:6379"}, ["http://"]),
])
def test_config_refuses_bad_settings_by_name(extra, words):
    with pytest.raises(ValueError) as e:
        ConnectorConfig.from_extra(extra)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("store", ["memory", "/tmp/kvforge-prefixes", "prefixes", "redis://127.0.0.1:6379/0",
                                   "rediss://user:pw@host:6380", "unix:///run/redis.sock"])
def test_config_takes_every_kind_of_store(store):
    assert ConnectorConfig.from_extra({"store": store}).store == store


def test_kvforge_serve_refuses_a_mistyped_redis_address_too(tiny_llama):
    model, _ = tiny_llama
    for location in ("127.0.0.1:6379", "redis:/127.0.0.1:6379", "http://127.0.0.1:6379"):
        with pytest.raises(ValueError, match="redis://"):
            PrefixStore(model, "dynamic", location)


def test_a_store_that_fails_is_a_miss_not_a_crash(caplog):
    from kvforge.integrations.vllm.config import guarded, store_label

    def down(*args, **kwargs):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6399. Connection refused.")

    with caplog.at_level("WARNING", logger="vllm.kvforge"):
        assert guarded("the store lookup", down, [1, 2, 3], salt=None) is None
    assert "treated as a miss" in caplog.text and "Connection refused" in caplog.text
    assert guarded("a check", lambda: False) is False
    assert store_label("redis://user:secret@host:6379/0") == "redis://***@host:6379/0"


def test_version_guard():
    assert check_vllm_version(TESTED_VLLM[0]) is None
    assert check_vllm_version(TESTED_VLLM[0] + "+cpu") is None
    for outside in ("0.31.9", TESTED_VLLM[1], "1.0.0", "0.40.0.dev3+gabc"):
        msg = check_vllm_version(outside)
        assert msg and outside in msg and TESTED_VLLM[0] in msg


# ----------------------------------------------------------------------------------------- paged layout
def _cpu_like_writer(block: int, heads: int, dim: int):
    """A write in the layout of vLLM's CPU backend: per block and head, keys transposed [dim, block] and then
    values [block, dim] (cache [num_blocks, heads, block, 2 * dim])."""

    def write(key, value, cache, slots):
        view = cache.view(cache.shape[0], heads, 2 * block, dim)
        keys = view[:, :, :block].reshape(cache.shape[0], heads, dim, block)  # a view: transposed blocks
        values = view[:, :, block:]
        for t, slot in enumerate(slots.tolist()):
            b, off = divmod(slot, block)
            keys[b, :, :, off] = key[t]
            values[b, :, off, :] = value[t]

    return write


def _flash_like_writer(block: int):
    """Another layout: [num_blocks, 2, block, heads, dim] flattened into the last dimension."""

    def write(key, value, cache, slots):
        view = cache.view(cache.shape[0], 2, block, *key.shape[1:])
        for t, slot in enumerate(slots.tolist()):
            b, off = divmod(slot, block)
            view[b, 0, off] = key[t]
            view[b, 1, off] = value[t]

    return write


@pytest.mark.parametrize("layout", ["cpu", "flash"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probe_then_read_and_write_round_trip(layout, dtype):
    block, heads, dim, blocks = 8, 3, 16, 6
    shape = (blocks, heads, block, 2 * dim) if layout == "cpu" else (blocks, 2 * block * heads * dim)
    write = _cpu_like_writer(block, heads, dim) if layout == "cpu" else _flash_like_writer(block)
    paged = PagedKV(probe_layout(write, shape, dtype, block, heads, dim))
    cache = torch.zeros(shape, dtype=dtype)
    torch.manual_seed(0)
    k, v = torch.randn(20, heads, dim).to(dtype), torch.randn(20, heads, dim).to(dtype)
    block_ids = [4, 1, 3]  # tokens 0..7 in block 4, 8..15 in block 1, 16..19 in block 3
    write(k, v, cache, torch.tensor([block_ids[t // block] * block + t % block for t in range(20)]))
    rk, rv = paged.read(cache, block_ids, 0, 20)
    assert torch.equal(rk, k.transpose(0, 1)) and torch.equal(rv, v.transpose(0, 1))
    part_k, part_v = paged.read(cache, block_ids, 5, 17)
    assert torch.equal(part_k, k[5:17].transpose(0, 1))
    other = torch.zeros_like(cache)  # write tokens 5..16 only: the rest stays untouched
    paged.write(other, block_ids, 5, part_k, part_v)
    got_k, _ = paged.read(other, block_ids, 0, 20)
    assert torch.equal(got_k[:, 5:17], part_k) and not got_k[:, :5].any() and not got_k[:, 17:].any()


def test_probe_refuses_what_it_cannot_read_back():
    block, heads, dim = 4, 1, 8
    with pytest.raises(PagedLayoutError, match="kv_cache_dtype"):
        probe_layout(_cpu_like_writer(block, heads, dim), (2, heads, block, 2 * dim), torch.float8_e4m3fn, block,
                     heads, dim)

    def lossy(key, value, cache, slots):  # stores keys only: values never land
        cache.view(-1)[: key.numel()] = key.reshape(-1)

    with pytest.raises(PagedLayoutError, match="wrote"):
        probe_layout(lossy, (2, heads, block, 2 * dim), torch.float32, block, heads, dim)

    def scaled(key, value, cache, slots):
        _cpu_like_writer(block, heads, dim)(key * 300, value, cache, slots)

    with pytest.raises(PagedLayoutError, match="changed the values"):
        probe_layout(scaled, (2, heads, block, 2 * dim), torch.bfloat16, block, heads, dim)
    paged = PagedKV(probe_layout(_cpu_like_writer(block, heads, dim), (2, heads, block, 2 * dim), torch.float32,
                                 block, heads, dim))
    with pytest.raises(ValueError, match="blocks"):
        paged.read(torch.zeros(2, heads, block, 2 * dim), [0], 0, 6)


# ----------------------------------------------------------------------------------------- model and store
def test_skeleton_has_the_loaded_models_fingerprint(tmp_path, tiny_llama):
    model, _ = tiny_llama
    model.save_pretrained(tmp_path)
    for dtype in (torch.float32, torch.bfloat16):
        skeleton = load_skeleton(tmp_path, dtype)
        assert next(skeleton.parameters()).device.type == "meta"
        assert fingerprint(skeleton) == fingerprint(model.to(dtype))
    model.float()
    with pytest.raises(Exception, match="config.json"):
        load_skeleton(tmp_path / "nothing-here")


def test_state_encoded_from_raw_keys_equals_the_caches_own(tmp_path, tiny_llama):
    """What the worker does on save: raw keys/values into a fresh cache of the spec, then export. It equals
    kvforge's own export after a prefill, so vLLM's and kvforge serve's entries are the same data: exactly in
    layer 0, whose keys and values need no attention; up to the forward pass's rounding after it (a quantized
    cache attends to its codes during the prefill, so its later layers see slightly different inputs)."""
    model, _ = tiny_llama
    model.save_pretrained(tmp_path)
    skeleton = load_skeleton(tmp_path)
    ids = torch.randint(0, 256, (1, 96))
    dense = new_cache(model, "dynamic")
    prefill(model, ids, dense)
    for spec in ("dynamic", "kvforge-quant:preset=safe", "kvforge-quant:preset=2bit"):
        own = new_cache(model, spec)
        prefill(model, ids, own)
        ref = KVState.from_cache(own, model, ids)
        cache = new_cache(skeleton, spec)
        for i, layer in enumerate(dense.layers):
            cache.update(layer.keys, layer.values, i)
        got = KVState.from_cache(cache, skeleton, ids)
        assert got.fingerprint == ref.fingerprint
        assert [a.kind for a in got.layers] == [b.kind for b in ref.layers]
        for name in ref.layers[0].tensors:
            assert torch.equal(got.layers[0].tensors[name], ref.layers[0].tensors[name]), (spec, name)
        for a, b in zip(got.layers, ref.layers):
            for name in ("keys", "values"):
                x, y = a.to_dense().tensors[name], b.to_dense().tensors[name]
                assert (x - y).abs().mean() < 0.02 * y.abs().mean(), (spec, name)


def test_store_holds_is_exact_per_tokens_and_salt(tiny_llama):
    model, _ = tiny_llama
    ids = torch.randint(0, 256, (1, 64))
    cache = new_cache(model, "dynamic")
    prefill(model, ids, cache)
    store = PrefixStore(model, "dynamic", block=32, min_tokens=32)
    store.put(KVState.from_cache(cache, model, ids), salt="a")
    tokens = ids[0].tolist()
    assert store.holds(tokens, "a")
    assert not store.holds(tokens, None) and not store.holds(tokens, "b") and not store.holds(tokens[:32], "a")
