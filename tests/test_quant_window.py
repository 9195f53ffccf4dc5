"""The 8-bit residual window and the attention-sink tokens of kvforge's quantized layer (QuantConfig
``residual_bits`` and ``sink``): what they store, that every attention path reads them in sequence order
(masks included), crop into them, export and reload, and that states saved before them still load."""

from __future__ import annotations

import pytest
import torch

from kvforge.layers import LayerState
from kvforge.quant import cpu_kernel
from kvforge.quant.attention import quantized_attention
from kvforge.quant.config import QuantConfig
from kvforge.quant.layer import QuantizedLayer

CFG = QuantConfig(4, 4, key_group=16, value_group=32, residual_length=32, rotate="none")


def _kv(tokens: int, seed: int = 0, heads: int = 3, dim: int = 64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, tokens, dim, generator=g)
    k[:, :, 0] *= 20  # an attention sink: a first key far larger than the rest
    return k, torch.randn(1, heads, tokens, dim, generator=g)


def _fed(cfg: QuantConfig, tokens: int, chunks=(1,), fused: bool = False, window=None) -> QuantizedLayer:
    layer = QuantizedLayer(cfg, fused=fused, sliding_window=window)
    k, v = _kv(tokens)
    pos, i = 0, 0
    while pos < tokens:
        n = chunks[i % len(chunks)]
        layer.update(k[:, :, pos : pos + n], v[:, :, pos : pos + n])
        pos, i = pos + n, i + 1
    return layer


@pytest.mark.parametrize("chunks", [(1,), (200,), (3, 50, 1)], ids=["decode", "prefill", "mixed"])
def test_sink_tokens_stay_exact_and_out_of_the_codes(chunks):
    layer = _fed(CFG.replace(sink=4), 200, chunks)
    k, v = _kv(200)
    assert layer.sink_tokens == 4 and layer.stored_tokens == 200 == layer.get_seq_length()
    assert (layer.quantized_tokens + layer.residual_tokens) == 196 and layer.quantized_tokens % 16 == 0
    kd, vd = layer.dequantized()
    assert torch.equal(kd[:, :, :4], k[:, :, :4].half().float()) and torch.equal(vd[:, :, :4], v[:, :, :4].half().float())
    # the sink no longer stretches the first key group's ranges: the tokens after it are quantized finely
    plain = _fed(CFG, 200, chunks)
    err_sink = (kd[:, :, 4:20] - k[:, :, 4:20]).abs().max()
    err_plain = (plain.dequantized()[0][:, :, 4:20] - k[:, :, 4:20]).abs().max()
    assert err_sink < err_plain / 5


def test_eight_bit_window_is_close_and_half_the_bytes():
    k, v = _kv(40)
    full = _fed(CFG, 40, (40,))
    eight = _fed(CFG.replace(residual_bits=8), 40, (40,))
    assert eight.res_k.dtype == torch.uint8 and eight.residual_tokens == full.residual_tokens == 24
    win16 = sum(t.numel() * t.element_size() for t in (full.res_k, full.res_v))
    win8 = sum(getattr(eight, n).numel() * getattr(eight, n).element_size()
               for n in ("res_k", "res_k_scale", "res_k_zero", "res_v", "res_v_scale", "res_v_zero"))
    assert win8 <= 0.57 * win16 and eight.nbytes < full.nbytes
    kd, vd = eight.dequantized()
    for got, want in ((kd[:, :, 16:], k[:, :, 16:]), (vd[:, :, 16:], v[:, :, 16:])):
        span = want.amax(-1, keepdim=True) - want.amin(-1, keepdim=True)
        assert ((got - want).abs() <= span / 255 * 0.51 + 1e-3).all()  # half an 8-bit step per 32 channels


def test_config_checks_name_the_setting():
    with pytest.raises(ValueError, match="residual_bits=4"):
        QuantConfig(residual_bits=4)
    with pytest.raises(ValueError, match="sink=-1"):
        QuantConfig(sink=-1)
    for bad in (2.5, True, "abc"):  # a wrong type is named here, not a crash deep inside a forward pass
        with pytest.raises(ValueError, match=f"sink={bad!r} must be an int"):
            QuantConfig(sink=bad)
    with pytest.raises(ValueError, match="key_group=32.0 must be an int"):
        QuantConfig(key_group=32.0)
    with pytest.raises(ValueError, match="tokens >= 0"):
        QuantConfig().held_bytes(-5, 3, 64)


@pytest.mark.parametrize("cfg", [CFG.replace(sink=4), CFG.replace(residual_bits=8),
                                 CFG.replace(sink=3, residual_bits=8, rotate="both")], ids=["sink", "8bit", "both"])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_on_the_codes_reads_sinks_in_sequence_order(cfg, masked):
    layer = _fed(cfg, 150, (150,), fused=True)
    g = torch.Generator().manual_seed(5)
    view, _ = layer.update(torch.randn(1, 3, 1, 64, generator=g), torch.randn(1, 3, 1, 64, generator=g))
    assert view.quantized_tokens > 0 and view.sink == cfg.sink
    q = torch.randn(1, 9, 1, 64, generator=g)
    mask = None
    if masked:  # the sink tokens and a stretch of codes masked out: a misordered mask would show
        allowed = torch.ones(1, 1, 1, view.shape[2], dtype=torch.bool)
        allowed[..., 1:3] = False
        allowed[..., 40:60] = False
        mask = allowed
    kd, vd = view.dense()  # sequence order, model space
    scores = torch.einsum("bhrd,bhtd->bhrt", q.view(1, 3, 3, 64), kd) * 0.125
    if mask is not None:
        scores = scores.masked_fill(~mask[0, 0, 0], float("-inf"))
    ref = torch.einsum("bhrt,bhtd->bhrd", scores.softmax(-1), vd).reshape(1, 1, 9, 64)
    out, _ = quantized_attention(q, view, mask, 0.125)
    assert torch.allclose(out, ref, atol=1e-4)
    if cpu_kernel.available():
        assert torch.allclose(cpu_kernel.decode(q, [view], 0.125, attention_mask=mask), ref, atol=1e-4)


@pytest.mark.parametrize("remove", [1, 20, 150, 197, 200])
def test_crop_reaches_into_the_window_the_codes_and_the_sink(remove):
    cfg = CFG.replace(sink=4, residual_bits=8)
    layer = _fed(cfg, 200, (7,))
    before, _ = layer.dequantized()
    layer.crop(-remove)
    assert layer.get_seq_length() == layer.stored_tokens == 200 - remove
    if 200 - remove:
        after, _ = layer.dequantized()
        assert torch.allclose(after, before[:, :, : 200 - remove], atol=0.05)
    k, v = _kv(200)
    layer.update(k[:, :, 200 - remove :], v[:, :, 200 - remove :])  # and decoding goes on from there
    assert layer.stored_tokens == 200 and layer.sink_tokens == 4


def test_export_reload_is_bit_exact_and_old_states_still_load():
    layer = _fed(CFG.replace(sink=4, residual_bits=8), 90, (90,))
    state = layer.export_state()
    again = QuantizedLayer(CFG.replace(sink=4, residual_bits=8))
    again.load_state(state, 90)
    assert all(torch.equal(getattr(again, n), t) for n, t in state.tensors.items())
    plain = _fed(CFG, 90, (90,))
    old = plain.export_state()  # a state saved before windows and sinks had their own tensors
    old = LayerState(old.kind, {n: t for n, t in old.tensors.items() if n in (
        "k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "res_k", "res_v")}, old.length, old.meta)
    old.meta["config"] = {k: v for k, v in old.meta["config"].items() if k not in ("residual_bits", "sink")}
    loaded = QuantizedLayer(CFG)
    loaded.load_state(old, 90)
    assert torch.equal(loaded.dequantized()[0], plain.dequantized()[0])


def test_sliding_layers_keep_no_sink():
    layer = _fed(CFG.replace(sink=4), 100, (1,), window=40)
    assert layer.sink_tokens == 0 and layer.stored_tokens <= 39 + 16
