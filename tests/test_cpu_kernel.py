"""The compiled CPU decode kernel (kvforge.quant.cpu_kernel) against the PyTorch reference path.

Every supported bit width, rotation, group size and head shape (SmolLM2's 3 KV heads of 64, Gemma 3's one
KV head of 256), odd lengths, masks, sliding-window starts, softcapping, batches of sequences of different
lengths, one and two threads; and the fallback with the kernel switched off.
"""

from __future__ import annotations

import pytest
import torch

from kvforge.quant import cpu_kernel
from kvforge.quant.attention import kvforge_attention, quantized_attention
from kvforge.quant.config import QuantConfig
from kvforge.quant.layer import QuantizedLayer

pytestmark = pytest.mark.skipif(not cpu_kernel.available(), reason="numba is not installed")
TOL = 1e-4  # largest error relative to the largest output value


def _view(cfg: QuantConfig, tokens: int, heads: int = 3, dim: int = 64, batch: int = 1, seed: int = 0, window=None):
    """A quantized layer fed ``tokens`` prompt tokens, then one decode token: the decode step's view."""
    g = torch.Generator().manual_seed(seed)
    layer = QuantizedLayer(cfg, fused=True, sliding_window=window)
    k = torch.randn(batch, heads, tokens, dim, generator=g) * 2 + 0.5
    v = torch.randn(batch, heads, tokens, dim, generator=g)
    layer.update(k, v)
    view, _ = layer.update(torch.randn(batch, heads, 1, dim, generator=g), torch.randn(batch, heads, 1, dim, generator=g))
    return view


def _query(batch: int, heads: int, dim: int, seed: int = 1):
    return torch.randn(batch, heads, 1, dim, generator=torch.Generator().manual_seed(seed))


def _close(out, ref):
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err <= TOL, f"relative error {err:.2e}"


# every width as keys and as values (each pair compiles its own kernel, ~20 s on 2 cores: the other tests reuse
# these shapes, 3 query heads per KV head of 64 with groups of 32, or SHAPES' Gemma-like one)
@pytest.mark.parametrize("bits", [(2, 2), (4, 4), (8, 8), (4, 3), (3, 2)], ids=lambda b: f"K{b[0]}V{b[1]}")
@pytest.mark.parametrize("rotate", ["none", "keys", "both"])
def test_every_width_and_rotation_matches_the_reference(bits, rotate):
    cfg = QuantConfig(*bits, key_group=32, value_group=32, residual_length=64, rotate=rotate)
    view = _view(cfg, 333)  # odd: the window holds a partial group
    q = _query(1, 9, 64)
    ref, _ = quantized_attention(q, view, None, 0.125)
    _close(cpu_kernel.decode(q, [view], 0.125), ref)


# (KV heads, query heads per KV head, head width, key group, value group); each shape compiles its own kernel
SHAPES = [(3, 3, 64, 16, 16), (1, 4, 256, 64, 64), (2, 1, 32, 32, 32), (4, 2, 128, 32, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}xR{}xD{}-G{}-GV{}".format(*s))
def test_head_shapes_and_groups(shape):
    heads, rep, dim, g, gv = shape
    cfg = QuantConfig(4, 2, key_group=g, value_group=gv, residual_length=2 * g)
    for tokens in (g - 1, 5 * g + 7, 1500):  # nothing quantized yet; a few groups; many pieces across threads
        view = _view(cfg, tokens, heads, dim)
        q = _query(1, heads * rep, dim)
        ref, _ = quantized_attention(q, view, None, dim**-0.5)
        _close(cpu_kernel.decode(q, [view], dim**-0.5), ref)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_masks(kind):
    cfg = QuantConfig(4, 4, key_group=32, value_group=32, residual_length=32)
    view = _view(cfg, 400, batch=2)
    kv = view.shape[2]
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(2, 1, 1, kv, generator=g) > 0.3
    allowed[1, ..., :100] = False  # left padding of the second sequence
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    q = _query(2, 9, 64)
    ref, _ = quantized_attention(q, view, mask, 0.125)
    _close(cpu_kernel.decode(q, [view], 0.125, attention_mask=mask), ref)


def test_softcap():
    cfg = QuantConfig(4, 4, key_group=32, value_group=32, residual_length=64)
    view = _view(cfg, 300)
    q = _query(1, 9, 64) * 4
    ref, _ = quantized_attention(q, view, None, 0.125, softcap=5.0)
    _close(cpu_kernel.decode(q, [view], 0.125, softcap=5.0), ref)


def test_batch_of_different_lengths_and_window_starts():
    """The server's batched step: each sequence's own layer, its own length; a start skips what a sliding
    window no longer sees (whole groups the layer still holds)."""
    cfg = QuantConfig(4, 3, key_group=32, value_group=32, residual_length=64, rotate="both")
    views = [_view(cfg, n, seed=n) for n in (40, 700, 2100)]
    starts = [0, 37, 1000]
    q = _query(3, 9, 64)
    out = cpu_kernel.decode(q, views, 0.125, starts=starts)
    for i, (view, start) in enumerate(zip(views, starts)):
        mask = torch.ones(1, 1, 1, view.shape[2], dtype=torch.bool)
        mask[..., :start] = False
        ref, _ = quantized_attention(q[i : i + 1], view, mask, 0.125)
        _close(out[i : i + 1], ref)


def test_sliding_layer_decode_matches_reference():
    """A sliding-window layer keeps whole key groups beyond the window; the model's mask hides them."""
    cfg = QuantConfig(4, 2, key_group=64, value_group=64, residual_length=64)  # SHAPES' Gemma-like kernel
    view = _view(cfg, 900, heads=1, dim=256, window=256)
    kv = view.shape[2]
    mask = torch.zeros(1, 1, 1, kv, dtype=torch.bool)
    mask[..., -255:] = True
    q = _query(1, 4, 256)
    ref, _ = quantized_attention(q, view, mask, 256**-0.5)
    _close(cpu_kernel.decode(q, [view], 256**-0.5, attention_mask=mask), ref)


def test_one_and_two_threads_agree():
    cfg = QuantConfig(2, 2, key_group=32, value_group=32, residual_length=64, rotate="both")
    view = _view(cfg, 3000)
    q = _query(1, 9, 64)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(cpu_kernel.decode(q, [view], 0.125))
    finally:
        torch.set_num_threads(before)
    _close(outs[0], outs[1])


def test_attention_interface_uses_the_kernel_and_falls_back_when_off(monkeypatch):
    """kvforge's attention runs the kernel on a decode step; with KVFORGE_CPU_KERNEL=0 it names why not and
    runs the PyTorch path (bit-identical to calling it directly)."""
    cfg = QuantConfig(4, 4, key_group=32, value_group=32, residual_length=64)
    view = _view(cfg, 500)
    q = _query(1, 9, 64)
    module = torch.nn.Module()
    assert cpu_kernel.why_not(view, q) is None
    out, _ = kvforge_attention(module, q, view, view, None, scaling=0.125)
    _close(out, cpu_kernel.decode(q, [view], 0.125))
    monkeypatch.setenv("KVFORGE_CPU_KERNEL", "0")
    assert cpu_kernel.why_not(view, q) == "KVFORGE_CPU_KERNEL=0"
    out, _ = kvforge_attention(module, q, view, view, None, scaling=0.125)
    ref, _ = quantized_attention(q, view, None, 0.125)
    assert torch.equal(out, ref)


def test_refusals_are_named():
    cfg = QuantConfig(4, 4, key_group=32, value_group=32, residual_length=64)
    view = _view(cfg, 100)
    assert "query tokens" in cpu_kernel.why_not(view, torch.randn(1, 9, 3, 64))
    other = _view(QuantConfig(2, 2, key_group=32, value_group=32, residual_length=64), 100)
    with pytest.raises(ValueError, match="share their quantization settings"):
        cpu_kernel.decode(torch.randn(2, 9, 1, 64), [view, other], 0.125)


def test_server_batched_step_reads_each_requests_codes(tiny, monkeypatch):
    """The server's batched decode step over requests of different lengths: one kernel call per layer with
    every request's own quantized layer (no padded dense copy), logits as each request decoded alone."""
    from kvforge import build_cache, run
    from kvforge.serve.batch import BatchedCache

    model, _ = tiny
    spec = "kvforge-quant:key_bits=4,value_bits=4,key_group=8,value_group=16,residual=8"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (1, n), generator=g) for n in (21, 50, 90)]
    nxt = torch.randint(3, 200, (3, 1), generator=g)
    calls = []
    real = cpu_kernel.decode
    monkeypatch.setattr(cpu_kernel, "decode", lambda q, views, *a, **k: calls.append(len(views)) or real(q, views, *a, **k))
    with torch.inference_mode():
        alone, caches = [], []
        for p in prompts:
            for target in (alone, caches):
                cache = build_cache(spec, model)
                run.prefill(model, p, cache)
                target.append(cache)
        ref = torch.cat([run.forward(model, t[None], c, start=p.shape[1], logits_to_keep=1).logits[:, -1]
                         for p, t, c in zip(prompts, nxt, alone)])
        calls.clear()
        seen = [p.shape[1] for p in prompts]
        view = BatchedCache(model, caches, seen)
        out = model(input_ids=nxt, **run.cache_kw(view), use_cache=True, position_ids=run.row_positions(seen, [1] * 3),
                    attention_mask=view.attention_mask(torch.float32), logits_to_keep=1).logits[:, -1]
    assert calls and set(calls) == {3}, f"the batched step did not run the kernel on all rows: {calls}"
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
