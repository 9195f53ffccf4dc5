"""Quantized cache layers and the cache built from them (transformers v5 layer API)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..layers import KVLayer, KVStateError, LayerState, register_layer
from .config import QuantConfig, residual_tokens_after
from .kivi import dequantize_keys, dequantize_values, quantize_keys, quantize_values, rotation
from .packing import packed_size
from .view import QuantizedView

KIND = "kvforge-quant"
_STORE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
# the residual window and the sink tokens: float tensors (residual_bits=16, empty scale/zero) or 8-bit codes
_RES = ("res_k", "res_k_scale", "res_k_zero", "res_v", "res_v_scale", "res_v_zero")
_SINK = tuple(n.replace("res_", "sink_") for n in _RES)
_ALL = (*_STORE, *_RES, *_SINK)
_TOKEN_GROUP = 64  # channels per scale and zero point of the 8-bit residual window (8.5 bits per number)


@register_layer
class QuantizedLayer(KVLayer, DynamicLayer):
    """A KIVI-layout quantized layer with a full-precision window of recent tokens (KIVI, Liu et al. 2024),
    optionally stored in 8 bits (``residual_bits=8``), and optionally the sequence's first ``sink`` tokens
    kept out of the codes at the window's precision (``sink_k/sink_v``; attention sinks, StreamingLLM).

    Storage: ``k_codes/v_codes`` (bit-packed uint8), ``k_scale/k_zero`` per channel and key group,
    ``v_scale/v_zero`` per token and value group, and ``res_k/res_v``: the residual window, the most
    recent tokens in full precision. As in KIVI and transformers' ``QuantizedCache``, the window holds *at
    most* ``residual_length`` tokens: once more have been seen, the oldest whole key groups are quantized,
    so it holds between ``residual_length - key_group + 1`` and ``residual_length`` (with
    ``residual_length=0``: the ``< key_group`` tokens of an unfinished group; see
    :meth:`residual_tokens_after`). A forward pass sees the tokens quantized *before* it plus the earlier
    residual and its own tokens in full precision; its tokens are quantized afterwards, a key group at a
    time, so the prompt's own prefill attention is never degraded.
    """

    kind = KIND
    is_sliding = False
    batch_tensors = _ALL

    def __init__(self, config: QuantConfig, fused: bool = False, sliding_window: int | None = None):
        super().__init__()
        self.config = config
        self.fused = fused
        self.sliding_window = sliding_window
        self.total = 0
        self._clear()

    # -- storage ---------------------------------------------------------------------------
    def _clear(self):
        for n in _ALL:
            setattr(self, n, None)
        self.keys = self.values = None  # transformers' attribute names; unused here
        self.is_initialized = False

    def lazy_initialization(self, key_states, value_states) -> None:
        """Keys and values may differ in width (latent caches: kvforge.mla); a value side of width 0 is
        carried along empty."""
        b, h, _, d = key_states.shape
        dv = value_states.shape[-1]
        if 0 < dv < self.config.value_group:  # a value group wider than the values is all of them
            self.config = self.config.replace(value_group=dv)
        self.config.check_head_dim(d, dv)
        self.device, self.dtype, self.head_dim, self.value_dim = key_states.device, key_states.dtype, d, dv
        cfg = self.config
        self.store_dtype = key_states.dtype if cfg.residual_dtype == "model" else getattr(torch, cfg.residual_dtype)
        self.rot = _rotation(d, self.device) if cfg.rotate != "none" else None
        self.v_rot = _rotation(dv, self.device) if self.rotates_values and dv else None
        kp = packed_size(d, cfg.key_bits)
        vp = packed_size(dv, cfg.value_bits)
        e = dict(device=self.device)
        self.k_codes = torch.empty(b, h, 0, kp, dtype=torch.uint8, **e)
        self.v_codes = torch.empty(b, h, 0, vp, dtype=torch.uint8, **e)
        self.k_scale = torch.empty(b, h, 0, d, dtype=torch.float16, **e)
        self.k_zero = torch.empty_like(self.k_scale)
        self.v_scale = torch.empty(b, h, 0, dv // cfg.value_group, dtype=torch.float16, **e)
        self.v_zero = torch.empty_like(self.v_scale)
        self.is_initialized = True
        for part in ("res", "sink"):
            self._set(part, key_states[:, :, :0], value_states[:, :, :0])

    # -- the residual window and the sink tokens ------------------------------------------------
    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``[B, H, N, W]`` as stored: ``residual_dtype`` (scale and zero empty) or 8-bit codes per
        token with a float16 scale and zero point per ``_TOKEN_GROUP`` channels."""
        w = x.shape[-1]
        if self.config.residual_bits == 16 or w == 0:
            empty = x.new_empty(*x.shape[:3], 0, dtype=torch.float16)
            return x.to(self.store_dtype), empty, empty.clone()
        return quantize_values(x, 8, _token_group(w))

    def _decode(self, part: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``part`` ("res" or "sink") in ``dtype``, in the stored (rotated) space."""
        out = []
        for side, w in (("k", self.head_dim), ("v", self.value_dim)):
            t, scale, zero = (getattr(self, f"{part}_{side}{x}") for x in ("", "_scale", "_zero"))
            if self.config.residual_bits == 16 or w == 0:
                out.append(t.to(dtype))
            else:
                out.append(dequantize_values(t, scale, zero, 8, _token_group(w), w, dtype))
        return out[0], out[1]

    def _set(self, part: str, k: torch.Tensor, v: torch.Tensor, append: bool = False) -> None:
        for side, x in (("k", k), ("v", v)):
            for suffix, t in zip(("", "_scale", "_zero"), self._encode(x), strict=True):
                name = f"{part}_{side}{suffix}"
                setattr(self, name, torch.cat([getattr(self, name), t], 2) if append else t)

    def _keep(self, part: str, tokens: slice) -> None:
        """Keep only ``tokens`` (a slice along the token axis) of ``part``."""
        for name in _RES if part == "res" else _SINK:
            setattr(self, name, getattr(self, name)[:, :, tokens].clone())

    @property
    def sink_tokens(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def residual_tokens(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[2]

    @property
    def rotates_values(self) -> bool:
        return self.config.rotate == "both"

    def _rot(self, x: torch.Tensor, inverse: bool = False, values: bool = False) -> torch.Tensor:
        r = self.v_rot if values else self.rot
        if r is None:  # an empty value side
            return x
        return (x.float() @ (r.T if inverse else r)).to(x.dtype)

    @property
    def quantized_tokens(self) -> int:
        return 0 if self.k_codes is None else self.k_codes.shape[2]

    @property
    def stored_tokens(self) -> int:
        return self.sink_tokens + self.quantized_tokens + self.residual_tokens

    # -- the transformers layer API --------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cfg = self.config
        if self.rot is not None:
            key_states = self._rot(key_states)
            if self.rotates_values:
                value_states = self._rot(value_states, values=True)
        past = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
        sinks = self.sink_tokens
        sk, sv = self._decode("sink", key_states.dtype)
        rk32, rv32 = self._decode("res", torch.float32)  # read once: for attention and for what leaves the window
        rk, rv = rk32.to(key_states.dtype), rv32.to(value_states.dtype)
        recent_k = torch.cat([sk, rk, key_states], dim=2)
        recent_v = torch.cat([sv, rv, value_states], dim=2)
        self.total += key_states.shape[2]
        into_sink = 0
        if self.sliding_window is None and sinks < cfg.sink and self.quantized_tokens == 0 and rk.shape[2] == 0:
            into_sink = min(cfg.sink - sinks, key_states.shape[2])  # the first tokens of the sequence
            self._set("sink", key_states[:, :, :into_sink], value_states[:, :, :into_sink], append=True)
        k_new, v_new = key_states[:, :, into_sink:], value_states[:, :, into_sink:]
        old = rk.shape[2]
        n = old + k_new.shape[2]
        take = n - self.residual_tokens_after(n, cfg.residual_length, cfg.key_group)
        fresh = max(0, take - old)  # new tokens that go straight to the codes
        if take:  # the oldest whole key groups leave the window, quantized in float32 from what it holds
            kn, vn = k_new[:, :, :fresh], v_new[:, :, :fresh]
            if cfg.residual_bits == 16:  # new tokens as the window would have stored them
                kn, vn = kn.to(self.store_dtype), vn.to(self.store_dtype)
            self._append_quantized(torch.cat([rk32, kn.float()], 2)[:, :, :take],
                                   torch.cat([rv32, vn.float()], 2)[:, :, :take])
            self._keep("res", slice(min(take, old), None))
        self._set("res", k_new[:, :, fresh:], v_new[:, :, fresh:], append=True)
        if self.sliding_window is not None and not self.record_past:
            self._trim_window()
        view = QuantizedView(self, *past, recent_k, recent_v, sink=sinks)
        if self.fused:
            return view, view
        return view.dense()

    residual_tokens_after = staticmethod(residual_tokens_after)

    def _append_quantized(self, k: torch.Tensor, v: torch.Tensor) -> None:
        cfg = self.config
        kc, ks, kz = quantize_keys(k, cfg.key_bits, cfg.key_group)
        vc, vs, vz = quantize_values(v, cfg.value_bits, cfg.value_group, clip=cfg.clip and cfg.value_bits <= 2)
        self.k_codes = torch.cat([self.k_codes, kc], 2)
        self.k_scale = torch.cat([self.k_scale, ks], 2)
        self.k_zero = torch.cat([self.k_zero, kz], 2)
        self.v_codes = torch.cat([self.v_codes, vc], 2)
        self.v_scale = torch.cat([self.v_scale, vs], 2)
        self.v_zero = torch.cat([self.v_zero, vz], 2)

    def _trim_window(self) -> None:
        """Sliding layers keep what the next step can see (``sliding_window - 1`` tokens), rounded up to whole
        key groups in the quantized part; the attention mask (``get_mask_sizes``) accounts for the extra."""
        keep = self.sliding_window - 1
        g = self.config.key_group
        extra = self.stored_tokens - keep
        drop_groups = min(max(extra, 0) // g, self.quantized_tokens // g)
        if drop_groups:
            self._drop_first_groups(drop_groups)
        if self.quantized_tokens == 0 and self.residual_tokens > keep:
            self._keep("res", slice(-keep, None))

    def _drop_first_groups(self, n_groups: int) -> None:
        t = n_groups * self.config.key_group
        self.k_codes, self.v_codes = self.k_codes[:, :, t:].clone(), self.v_codes[:, :, t:].clone()
        self.k_scale, self.k_zero = self.k_scale[:, :, n_groups:].clone(), self.k_zero[:, :, n_groups:].clone()
        self.v_scale, self.v_zero = self.v_scale[:, :, t:].clone(), self.v_zero[:, :, t:].clone()

    def _dense(self, kc, ks, kz, vc, vs, vz, rk, rv, sink: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys/values in the model's space (rotations undone), compute dtype of ``rk``, in token
        order: the first ``sink`` rows of ``rk``/``rv`` are the sink tokens, which come before the codes."""
        cfg, d, dv = self.config, self.head_dim, self.value_dim
        k = torch.cat([rk[:, :, :sink], dequantize_keys(kc, ks, kz, cfg.key_bits, cfg.key_group, d, rk.dtype),
                       rk[:, :, sink:]], 2)
        v = torch.cat([rv[:, :, :sink], dequantize_values(vc, vs, vz, cfg.value_bits, cfg.value_group, dv, rv.dtype),
                       rv[:, :, sink:]], 2)
        if self.rot is not None:
            k = self._rot(k, inverse=True)
            if self.rotates_values:
                v = self._rot(v, inverse=True, values=True)
        return k, v

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, dequantized, in the model's dtype and space."""
        if not self.is_initialized:
            raise KVStateError("this quantized layer holds no tokens yet: run a forward pass first")
        sk, sv = self._decode("sink", self.dtype)
        rk, rv = self._decode("res", self.dtype)
        return self._dense(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
                           torch.cat([sk, rk], 2), torch.cat([sv, rv], 2), sink=sk.shape[2])

    def get_seq_length(self) -> int:
        return self.total

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        stored = self.stored_tokens
        return stored + query_length, self.total - stored

    def get_max_length(self) -> int:
        return self.sliding_window if self.sliding_window is not None else -1

    def reset(self) -> None:
        self._clear()
        self.total = 0

    def _restrict(self) -> None:
        if self.sliding_window is not None:
            self._trim_window()

    def _remove_last(self, remove: int) -> None:
        """Remove the last ``remove`` tokens (``crop``: see :func:`kvforge.layers.crop_amount`). A partly
        removed key group is dequantized back into the residual window."""
        if remove > self.stored_tokens:
            raise ValueError(f"cannot crop {remove} tokens: this layer holds only {self.stored_tokens}")
        if self.sliding_window is not None:
            need = min(self.total - remove, self.sliding_window - 1)
            if self.stored_tokens - remove < need:
                raise ValueError(
                    f"cannot crop {remove} tokens from a sliding-window layer that already dropped the tokens the window "
                    "would need again; call cache.activate_past_recording() before decoding steps that may be rolled "
                    "back (transformers' generate does this for assisted decoding)")
        self.total -= remove
        nres = self.residual_tokens
        if remove <= nres:
            self._keep("res", slice(0, nres - remove))
            return
        keep_q = self.quantized_tokens - (remove - nres)
        if keep_q < 0:  # into the sink tokens: nothing quantized or in the window is left
            self._drop_first_groups(self.quantized_tokens // self.config.key_group)
            self._keep("res", slice(0, 0))
            self._keep("sink", slice(0, self.sink_tokens + keep_q))
            return
        g = self.config.key_group
        full = keep_q // g
        b, h = self.k_codes.shape[:2]
        empty_k = torch.empty(b, h, 0, self.head_dim, dtype=self.dtype, device=self.device)
        empty_v = torch.empty(b, h, 0, self.value_dim, dtype=self.dtype, device=self.device)
        k, v = self._dense(*self._stored_slices(full * g, keep_q), empty_k, empty_v)
        if self.rot is not None:  # back to the stored (rotated) space
            k = self._rot(k)
            if self.rotates_values:
                v = self._rot(v, values=True)
        t = full * g
        self.k_codes, self.v_codes = self.k_codes[:, :, :t], self.v_codes[:, :, :t]
        self.k_scale, self.k_zero = self.k_scale[:, :, :full], self.k_zero[:, :, :full]
        self.v_scale, self.v_zero = self.v_scale[:, :, :t], self.v_zero[:, :, :t]
        self._set("res", k[:, :, : keep_q - t], v[:, :, : keep_q - t])

    def _stored_slices(self, start: int, stop: int):
        """Quantized tensors for whole key groups covering tokens ``[start, stop)``, ``start`` group-aligned."""
        g = self.config.key_group
        g0, g1 = start // g, -(-stop // g)
        t0, t1 = g0 * g, g1 * g
        return (self.k_codes[:, :, t0:t1], self.k_scale[:, :, g0:g1], self.k_zero[:, :, g0:g1],
                self.v_codes[:, :, t0:t1], self.v_scale[:, :, t0:t1], self.v_zero[:, :, t0:t1])

    def offload(self):
        self._apply_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._apply_batch(lambda t: t.to(self.device, non_blocking=True))

    # -- bytes and export --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in _ALL)

    def export_state(self) -> LayerState:
        """The stored codes, scales and window as a ``LayerState`` of kind ``kvforge-quant`` (bit-exact)."""
        if not self.is_initialized:
            raise KVStateError("this quantized layer holds no tokens yet: run a forward pass first")
        tensors = {n: getattr(self, n).detach().clone() for n in _ALL}
        meta = {"config": self.config.to_dict(), "head_dim": self.head_dim, "value_dim": self.value_dim,
                "dtype": str(self.dtype).removeprefix("torch.")}
        return LayerState(KIND, tensors, self.stored_tokens, meta)

    @staticmethod
    def decode_state(state: LayerState) -> LayerState:
        """A saved ``kvforge-quant`` layer as dense keys and values (for slicing, translation, other caches)."""
        layer = QuantizedLayer(QuantConfig(**state.meta["config"]))
        layer.load_state(state, state.length)
        return LayerState.dense(*layer.dequantized())

    def load_state(self, state: LayerState, total_tokens: int) -> None:
        """Fill this (empty) layer from a saved quantized state (bit-exact) or from dense keys/values
        (quantized now with this layer's settings)."""
        if self.stored_tokens:
            raise KVStateError("the cache to import into must be empty")
        dv = state.tensors["res_v"].shape[-1] if state.kind == KIND else 0
        own = self.config.replace(value_group=dv) if 0 < dv < self.config.value_group else self.config
        if state.kind == KIND and QuantConfig(**state.meta["config"]) == own:
            t = state.tensors
            b, h, _, d = t["res_k"].shape
            e = dict(dtype=getattr(torch, state.meta["dtype"]), device=t["res_k"].device)
            self.lazy_initialization(torch.empty(b, h, 0, d, **e), torch.empty(b, h, 0, dv, **e))
            missing = [n for n in (*_STORE, "res_k", "res_v") if n not in t]
            if missing:
                raise KVStateError(f"the saved quantized layer lacks {', '.join(missing)}")
            for n in _ALL:  # states saved before 8-bit windows and sinks lack their (empty) tensors
                if n in t:
                    setattr(self, n, t[n].to(self.device))
            self.total = total_tokens
            return
        d = state.to_dense()
        k, v = d.tensors["keys"], d.tensors["values"]
        if self.sliding_window is not None:
            k, v = k[:, :, -(self.sliding_window - 1):], v[:, :, -(self.sliding_window - 1):]
        elif d.length != total_tokens:
            raise KVStateError(f"a full-attention layer needs all {total_tokens} tokens, the state holds {d.length}")
        self.update(k, v)
        self.total = total_tokens


def _token_group(width: int) -> int:
    return _TOKEN_GROUP if width % _TOKEN_GROUP == 0 else width


_ROTATIONS: dict = {}


def _rotation(dim: int, device) -> torch.Tensor:
    """One shared rotation matrix per (head_dim, device), not one per layer."""
    key = (dim, str(device))
    if key not in _ROTATIONS:
        _ROTATIONS[key] = rotation(dim).to(device)
    return _ROTATIONS[key]
