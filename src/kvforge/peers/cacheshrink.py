"""cacheshrink (a peer MLA conversion library) run on kvforge's protocol, with run-time patches only.

cacheshrink converts a Hugging Face model's attention to multi-head latent attention. Used as published
it cannot run here: it imports ``datasets`` (a hub download) even when calibration texts are given, it
reads the cache under the pre-5.24 name ``past_key_values``, and it builds its rotary embedding with a
default base instead of the model's. These patches fix each at run time, checked against the model's own
rotary module, so ``benchmarks/mla_cacheshrink.py`` can compare it with :mod:`kvforge.mla` on one protocol.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
import warnings

import torch


def error_text(e: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters (what a failed peer step reports)."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def datasets_importable() -> str | None:
    """None when ``import datasets`` works (cacheshrink imports it even when calibration texts are given)."""
    try:
        import datasets  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any failure is what a user would see
        return error_text(e)
    return None


def patch_offline() -> None:
    """A stub ``datasets`` so cacheshrink's collector reaches the passed texts without the hub."""
    stub = types.ModuleType("datasets")

    def load_dataset(*_a, **_k):
        raise RuntimeError("offline: pass calibration_texts")

    stub.load_dataset = load_dataset
    sys.modules["datasets"] = stub


def patch_cache_arg(model) -> dict:
    """transformers 5.24 passes the cache to attention as ``cache=``; cacheshrink's adapter reads
    ``past_key_values`` (``cache`` lands in its ``**kwargs``), so it never stores or reads a past. Hand it over
    under the old name, per converted layer."""
    n = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        if not hasattr(attn, "mla"):
            continue
        inner = attn.forward

        def forward(*a, _inner=inner, cache=None, **kw):
            if cache is not None and kw.get("past_key_values") is None:
                kw["past_key_values"] = cache
            return _inner(*a, **kw)

        attn.forward = forward
        n += 1
    return {"layers": n}


def mla_modules(model) -> list:
    return [layer.self_attn.mla for layer in model.model.layers if hasattr(layer.self_attn, "mla")]


def patch_rope(model) -> dict:
    """Give every converted layer the model's real rotary base (``config.rope_parameters``), checked against
    the model's own rotary module; returns what was found and set."""
    from cacheshrink.attention import RotaryEmbedding

    params = getattr(model.config, "rope_parameters", None) or {}
    theta = float(params.get("rope_theta", getattr(model.config, "rope_theta", 10000.0)))
    own = model.model.rotary_emb
    found = {"cacheshrink_base": None, "model_base": theta, "rope_type": params.get("rope_type", "default")}
    for mla in mla_modules(model):
        found["cacheshrink_base"] = mla._rope_config["base"]
        mla._rope_config["base"] = theta
        mla.config.rope_theta = theta
        rot = RotaryEmbedding(**mla._rope_config)
        if not torch.allclose(rot.inv_freq, own.inv_freq.float().cpu(), rtol=1e-5, atol=0):
            raise RuntimeError("cacheshrink's rotary frequencies differ from the model's even with its base "
                               f"({found['rope_type']} rope); this patch does not cover that model")
        if float(getattr(own, "attention_scaling", 1.0)) != 1.0:
            raise RuntimeError("the model's rotary module scales cos/sin; cacheshrink's does not")
        mla.rotary_emb, mla._owns_rotary_emb = rot, True
    return found


_CALIB_MEMO: dict = {}


def install_collector(norm_input: bool) -> None:
    """Route cacheshrink's ``collect_calibration_data`` through a memo (same texts, same capture point: same
    activations at every ratio); with ``norm_input``, capture the attention modules' input (after
    ``input_layernorm``, what k_proj/v_proj receive) instead of the decoder layers' (the residual stream)."""
    import cacheshrink.converter as conv
    import cacheshrink.initialization as init

    original = init.collect_calibration_data

    class AttentionInputs:
        def __init__(self, handler):
            self.h = handler

        def get_layer_module(self, i):
            return self.h.get_attention_module(i)

    def collect(model, tokenizer, texts=None, handler=None, **kw):
        key = (id(texts), norm_input)
        if key not in _CALIB_MEMO:
            h = AttentionInputs(handler) if norm_input and handler is not None else handler
            _CALIB_MEMO[key] = original(model, tokenizer, texts=texts, handler=h, **kw)
        return {i: t.clone() for i, t in _CALIB_MEMO[key].items()}

    conv.collect_calibration_data = collect


def cacheshrink_convert(path: str, ratio: float, method: str, cal: list[str], norm_input: bool):
    import cacheshrink

    install_collector(norm_input)
    torch.manual_seed(0)  # its calibration SVD subsamples tokens with randperm
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model, _ = cacheshrink.convert_to_mla(path, compression_ratio=ratio, compression_method=method,
                                              device="cpu", dtype=torch.float32, use_calibration=True,
                                              calibration_texts=cal, max_calibration_length=512, verbose=False)
    return model.eval()
