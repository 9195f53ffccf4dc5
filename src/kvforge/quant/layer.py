"""Quantized cache layers and the cache built from them (transformers v5 layer API)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..layers import KVLayer, KVStateError, LayerState, register_layer
from .config import QuantConfig
from .kivi import dequantize_keys, dequantize_values, quantize_keys, quantize_values, rotation
from .packing import packed_size
from .view import QuantizedView

KIND = "kvforge-quant"
_STORE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")


@register_layer
class QuantizedLayer(KVLayer, DynamicLayer):
    """A KIVI-layout quantized layer with a full-precision window of recent tokens (KIVI, Liu et al. 2024).

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
    batch_tensors = (*_STORE, "res_k", "res_v")

    def __init__(self, config: QuantConfig, fused: bool = False, sliding_window: int | None = None):
        super().__init__()
        self.config = config
        self.fused = fused
        self.sliding_window = sliding_window
        self.total = 0
        self._clear()

    # -- storage ---------------------------------------------------------------------------
    def _clear(self):
        self.k_codes = self.k_scale = self.k_zero = None
        self.v_codes = self.v_scale = self.v_zero = None
        self.res_k = self.res_v = None
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
        self.res_k = torch.empty(b, h, 0, d, dtype=self.store_dtype, **e)
        self.res_v = torch.empty(b, h, 0, dv, dtype=self.store_dtype, **e)
        self.is_initialized = True

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
        return 0 if self.res_k is None else self.quantized_tokens + self.res_k.shape[2]

    # -- the transformers layer API --------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rot is not None:
            key_states = self._rot(key_states)
            if self.rotates_values:
                value_states = self._rot(value_states, values=True)
        past = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
        recent_k = torch.cat([self.res_k.to(key_states.dtype), key_states], dim=2)
        recent_v = torch.cat([self.res_v.to(value_states.dtype), value_states], dim=2)
        self.total += key_states.shape[2]
        self.res_k = torch.cat([self.res_k, key_states.to(self.store_dtype)], dim=2)
        self.res_v = torch.cat([self.res_v, value_states.to(self.store_dtype)], dim=2)
        self._flush()
        if self.sliding_window is not None and not self.record_past:
            self._trim_window()
        view = QuantizedView(self, *past, recent_k, recent_v)
        if self.fused:
            return view, view
        return view.dense()

    @staticmethod
    def residual_tokens_after(n: int, residual_length: int, key_group: int) -> int:
        """Tokens the full-precision window holds after ``n`` tokens were written one forward pass at a time
        (full-attention layer): ``n`` while ``n <= residual_length``, then the oldest whole key groups are
        quantized until at most ``residual_length`` remain."""
        if n <= residual_length:
            return n
        take = min(-(-(n - residual_length) // key_group), n // key_group) * key_group
        return n - take

    def _flush(self) -> None:
        """Quantize the oldest whole key groups so that at most ``residual_length`` tokens stay full precision."""
        n = self.res_k.shape[2]
        take = n - self.residual_tokens_after(n, self.config.residual_length, self.config.key_group)
        if take == 0:
            return
        self._append_quantized(self.res_k[:, :, :take], self.res_v[:, :, :take])
        self.res_k = self.res_k[:, :, take:].clone()
        self.res_v = self.res_v[:, :, take:].clone()

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
        if self.quantized_tokens == 0 and self.res_k.shape[2] > keep:
            self.res_k = self.res_k[:, :, -keep:].clone()
            self.res_v = self.res_v[:, :, -keep:].clone()

    def _drop_first_groups(self, n_groups: int) -> None:
        t = n_groups * self.config.key_group
        self.k_codes, self.v_codes = self.k_codes[:, :, t:].clone(), self.v_codes[:, :, t:].clone()
        self.k_scale, self.k_zero = self.k_scale[:, :, n_groups:].clone(), self.k_zero[:, :, n_groups:].clone()
        self.v_scale, self.v_zero = self.v_scale[:, :, t:].clone(), self.v_zero[:, :, t:].clone()

    def _dense(self, kc, ks, kz, vc, vs, vz, rk, rv) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized keys/values in the model's space (rotations undone), compute dtype of ``rk``."""
        cfg, d, dv = self.config, self.head_dim, self.value_dim
        k = torch.cat([dequantize_keys(kc, ks, kz, cfg.key_bits, cfg.key_group, d, rk.dtype), rk], 2)
        v = torch.cat([dequantize_values(vc, vs, vz, cfg.value_bits, cfg.value_group, dv, rv.dtype), rv], 2)
        if self.rot is not None:
            k = self._rot(k, inverse=True)
            if self.rotates_values:
                v = self._rot(v, inverse=True, values=True)
        return k, v

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored tokens, dequantized, in the model's dtype and space."""
        if not self.is_initialized:
            raise KVStateError("this quantized layer holds no tokens yet: run a forward pass first")
        return self._dense(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
                           self.res_k.to(self.dtype), self.res_v.to(self.dtype))

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
        nres = self.res_k.shape[2]
        if remove <= nres:
            self.res_k, self.res_v = self.res_k[:, :, : nres - remove], self.res_v[:, :, : nres - remove]
            return
        keep_q = self.quantized_tokens - (remove - nres)
        g = self.config.key_group
        full = keep_q // g
        k, v = self._dense(*self._stored_slices(full * g, keep_q), self.res_k[:, :, :0].to(self.dtype),
                           self.res_v[:, :, :0].to(self.dtype))
        if self.rot is not None:  # back to the stored (rotated) space
            k = self._rot(k)
            if self.rotates_values:
                v = self._rot(v, values=True)
        t = full * g
        self.k_codes, self.v_codes = self.k_codes[:, :, :t], self.v_codes[:, :, :t]
        self.k_scale, self.k_zero = self.k_scale[:, :, :full], self.k_zero[:, :, :full]
        self.v_scale, self.v_zero = self.v_scale[:, :, :t], self.v_zero[:, :, :t]
        self.res_k = k[:, :, : keep_q - t].to(self.store_dtype)
        self.res_v = v[:, :, : keep_q - t].to(self.store_dtype)

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
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in (*_STORE, "res_k", "res_v"))

    def export_state(self) -> LayerState:
        """The stored codes, scales and window as a ``LayerState`` of kind ``kvforge-quant`` (bit-exact)."""
        if not self.is_initialized:
            raise KVStateError("this quantized layer holds no tokens yet: run a forward pass first")
        tensors = {n: getattr(self, n).detach().clone() for n in (*_STORE, "res_k", "res_v")}
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
            self.lazy_initialization(torch.empty(b, h, 0, d, **e), torch.empty(b, h, 0, t["res_v"].shape[-1], **e))
            for n in (*_STORE, "res_k", "res_v"):
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


_ROTATIONS: dict = {}


def _rotation(dim: int, device) -> torch.Tensor:
    """One shared rotation matrix per (head_dim, device), not one per layer."""
    key = (dim, str(device))
    if key not in _ROTATIONS:
        _ROTATIONS[key] = rotation(dim).to(device)
    return _ROTATIONS[key]
