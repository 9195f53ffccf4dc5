"""Attention computed on the quantized codes (the CPU path of kvforge's quantized cache).

transformers calls ``cache.update(...)`` and hands whatever it returns to the model's attention function.
With the fused path on, a :class:`~kvforge.quant.layer.QuantizedLayer` returns a
:class:`~kvforge.quant.layer.QuantizedView` (codes, scales, zero points and the recent full-precision
tokens) and the ``"kvforge"`` attention function registered here consumes it:

* key scores on the codes: ``q . k = sum_d (q_d * scale_gd) * code_td + sum_d q_d * zero_gd``, the scale
  folded into the query per key group, the zero point a per-group bias;
* values on the codes: the attention weights are multiplied into the per-token value scales, then
  contracted with the codes of each channel group, plus the weights times the zero points;
* the past is read ``BLOCK_TOKENS`` tokens at a time, so the extra memory is one block of codes as
  floats, never the whole context in full precision.

Any other key/value (a plain tensor) goes to transformers' SDPA attention unchanged, so a model with
this attention installed gives bit-identical results with every other cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernel
from .packing import unpack
from .view import QuantizedRows, QuantizedView

NAME = "kvforge"
BLOCK_TOKENS = 4096


def quantized_attention(query: torch.Tensor, view, attention_mask, scaling: float, softcap: float | None = None,
                        block_tokens: int = BLOCK_TOKENS):
    """``query [B, Hq, L, D]`` against a QuantizedView -> ``(out [B, L, Hq, D], None)``."""
    layer = view.layer
    cfg = layer.config
    b, hq, length, d = query.shape
    h = view.recent_k.shape[1]
    rep = hq // h
    m = rep * length
    q = query.float().reshape(b, h, m, d) * scaling  # query head h*rep+r uses kv head h
    if layer.rot is not None:
        q = q @ layer.rot
    nq, g = view.quantized_tokens, cfg.key_group
    block = max(block_tokens // g, 1) * g

    parts = []
    for t0 in range(0, nq, block):
        t1 = min(t0 + block, nq)
        g0, g1 = t0 // g, t1 // g
        ng = g1 - g0
        codes = unpack(view.k_codes[:, :, t0:t1], cfg.key_bits, d).float().view(b, h, ng, g, d)
        scale = view.k_scale[:, :, g0:g1].float()
        qs = q[:, :, None] * scale[:, :, :, None, :]  # [B, H, ng, M, D]
        s = qs @ codes.transpose(-1, -2)  # [B, H, ng, M, G]
        s = s + (q @ view.k_zero[:, :, g0:g1].float().transpose(-1, -2)).transpose(-1, -2)[..., None]
        parts.append(s.permute(0, 1, 3, 2, 4).reshape(b, h, m, ng * g))
    parts.append(q @ view.recent_k.float().transpose(-1, -2))
    scores = torch.cat(parts, dim=-1)  # [B, H, M, KV]
    kv = scores.shape[-1]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    neg = torch.finfo(scores.dtype).min
    if attention_mask is not None:
        mask = view.kernel_order(attention_mask[..., -kv:])
        mask = mask[:, :, None].expand(mask.shape[0], 1, rep, length, kv).reshape(mask.shape[0], 1, m, kv)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, neg)
        else:
            scores = scores + mask.float()
    elif length > 1:  # causal, the queries are the last `length` positions
        i = torch.arange(length, device=scores.device)[:, None] + (kv - length)
        causal = (torch.arange(kv, device=scores.device)[None, :] <= i).repeat(rep, 1)
        scores = scores.masked_fill(~causal, neg)
    p = F.softmax(scores, dim=-1)

    out = p[..., nq:] @ view.recent_v.float()
    gv = cfg.value_group
    c = d // gv
    for t0 in range(0, nq, block):
        t1 = min(t0 + block, nq)
        pb = p[..., t0:t1]  # [B, H, M, T]
        codes = unpack(view.v_codes[:, :, t0:t1], cfg.value_bits, d).float().view(b, h, t1 - t0, c, gv)
        pw = pb[..., None] * view.v_scale[:, :, None, t0:t1].float()  # [B, H, M, T, C]
        o = torch.einsum("bhmtc,bhtcg->bhmcg", pw, codes)
        o = o + (pb @ view.v_zero[:, :, t0:t1].float())[..., None]
        out = out + o.reshape(b, h, m, d)
    if layer.rotates_values:
        out = out @ layer.rot.T
    out = out.view(b, h, rep, length, d).reshape(b, hq, length, d).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def kvforge_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention interface. On a quantized layer's view: a prompt chunk (more than one query
    token) attends through SDPA on full-precision tensors (its own keys as they are, the quantized past
    dequantized in the stored space), as does a step before any token was quantized; a decode step runs on
    the codes: the compiled CPU kernel
    (:mod:`kvforge.quant.cpu_kernel`), the Triton kernel on GPUs, else the PyTorch path above."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if isinstance(key, QuantizedView | QuantizedRows):
        if dropout and module.training:
            raise RuntimeError("kvforge's quantized attention is for inference; it does not apply dropout")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        softcap = kwargs.get("softcap")
        if isinstance(key, QuantizedRows):
            same = all(v.layer.config == key.views[0].layer.config for v in key.views)
            if same and cpu_kernel.why_not(key.views[0], query) is None:
                return cpu_kernel.decode(query, key.views, scaling, softcap, starts=key.starts), None
            key, value = key.dense()
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        if softcap is None and (query.shape[2] > 1 or key.quantized_tokens == 0):  # a prompt, or no codes yet
            return _prompt_attention(module, query, key, attention_mask, scaling, **kwargs)
        if cpu_kernel.why_not(key, query) is None:
            return cpu_kernel.decode(query, [key], scaling, softcap, attention_mask), None
        if softcap is None:
            from . import triton_decode

            if triton_decode.supports(key, query, attention_mask):
                return triton_decode.fused_decode(query, key, scaling), None
        return quantized_attention(query, key, attention_mask, scaling, softcap)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _prompt_attention(module, query, view: QuantizedView, attention_mask, scaling, **kwargs):
    """A prompt chunk through SDPA: the query rotated like the stored keys (scores unchanged), the past
    dequantized only if there is one, the output rotated back when values are rotated."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    layer = view.layer
    k, v = view.stored_dense()
    q = query if layer.rot is None else (query.float() @ layer.rot).to(query.dtype)
    out, _ = sdpa_attention_forward(module, q, k.to(query.dtype), v.to(query.dtype), attention_mask, scaling=scaling,
                                    **kwargs)
    if layer.rotates_values:
        out = (out.float() @ layer.rot.T).to(query.dtype)
    return out, None


_REGISTERED = False


def register() -> None:
    """Register the ``"kvforge"`` attention (and SDPA's mask for it) with transformers."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, kvforge_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _REGISTERED = True


def install(model) -> bool:
    """Switch ``model`` from SDPA to kvforge's attention (identical on plain tensors). Returns False, and
    changes nothing, when the model uses another attention implementation."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == NAME:
        return True
    if impl != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
