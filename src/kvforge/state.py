"""``KVState``: a model's KV cache as plain data.

A state holds, per model layer, the tensors that cache stores (dense keys and values, or a compressed
encoding such as packed quantization codes), plus what is needed to use them again: the token ids, their
absolute positions, each layer's attention type, and the fingerprint of the model that made them.

Invariant: layer ``i`` holds the *last* ``layers[i].length`` tokens of ``token_ids``. Full-attention
layers hold all of them; sliding-window layers may hold only the most recent ``sliding_window - 1``
(what transformers' ``DynamicSlidingWindowLayer`` keeps).

It is exported from any transformers cache after a forward pass (``KVState.from_cache``), imported into
a cache that ``model.generate()`` continues from (``state.to_cache``), saved to one safetensors file
with JSON metadata and a checksum (``save``/``load``, or ``to_bytes``/``from_bytes`` for a store), sliced, concatenated and described.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .artifacts import ArtifactError, make_header, read_tensors, save_tensors, tensors_to_bytes
from .describe import Description, format_bytes  # noqa: F401  (format_bytes: re-exported)
from .layers import KVStateError, LayerState, export_layer, import_layer
from .models import fingerprint as model_fingerprint
from .models import layer_types as model_layer_types
from .models import text_config

FORMAT_VERSION = 1
FORMAT_NAME = "kvforge.kvstate"


class ModelMismatchError(KVStateError):
    """The state was made by a different model than the one it is being used with."""


class KVFileError(KVStateError, ArtifactError):
    """A state file that is not a kvforge file, is truncated or corrupted, or has an unsupported version."""


@dataclass
class KVState:
    layers: list[LayerState]
    token_ids: torch.Tensor  # [batch, tokens] int64
    positions: torch.Tensor  # [tokens] int64, absolute positions
    layer_types: list[str]  # attention type of each held layer
    fingerprint: str
    model_name: str = ""
    sliding_window: int | None = None
    layer_indices: list[int] | None = None  # which model layers these are (None: all, in order)
    attention_mask: torch.Tensor | None = None  # [batch, tokens], 0 at padding
    num_model_layers: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.token_ids.dim() == 1:
            self.token_ids = self.token_ids.unsqueeze(0)
        if self.layer_indices is None:
            self.layer_indices = list(range(len(self.layers)))
        if self.num_model_layers is None:
            self.num_model_layers = len(self.layers)
        n = self.num_tokens
        if self.positions.shape != (n,):
            raise KVStateError(f"positions must have shape ({n},), got {tuple(self.positions.shape)}")
        if len(self.layer_types) != len(self.layers) or len(self.layer_indices) != len(self.layers):
            raise KVStateError("layer_types and layer_indices must have one entry per layer")
        for i, layer in zip(self.layer_indices, self.layers):
            if layer.length > n:
                raise KVStateError(f"layer {i} holds {layer.length} tokens but the state has only {n}")

    # ----------------------------------------------------------------- basic facts
    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[1]

    @property
    def next_position(self) -> int:
        """The absolute position of the token that continues this state (``positions[-1] + 1``)."""
        return int(self.positions[-1]) + 1 if self.num_tokens else 0

    @property
    def batch_size(self) -> int:
        return self.token_ids.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype keys and values have when dense."""
        return self.layers[0].keys.dtype if self.layers else torch.float32

    @property
    def keys(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.layers]

    @property
    def values(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes of the cached layer tensors (what a cache holding this state occupies)."""
        return sum(layer.nbytes for layer in self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        kinds = sorted({layer.kind for layer in self.layers})
        return (
            f"KVState(model={self.model_name or self.fingerprint!r}, layers={len(self.layers)}, "
            f"tokens={self.num_tokens}, batch={self.batch_size}, kind={'/'.join(kinds)}, nbytes={self.nbytes:,})"
        )

    # ----------------------------------------------------------------- export
    @classmethod
    def from_cache(
        cls,
        cache,
        model,
        token_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> KVState:
        """Export a transformers ``Cache`` after a forward pass over ``token_ids`` (``[batch, tokens]``).

        Layers that know how to export themselves (``export_state()``, e.g. kvforge's quantized layers)
        keep their encoding; every other layer is exported dense.
        """
        token_ids = token_ids if token_ids.dim() == 2 else token_ids.unsqueeze(0)
        cfg = text_config(model)
        types = model_layer_types(model)
        if len(cache.layers) != len(types):
            raise KVStateError(f"cache has {len(cache.layers)} layers, model has {len(types)}")
        seen = cache.get_seq_length()
        if seen != token_ids.shape[1]:
            raise KVStateError(
                f"cache has seen {seen} tokens but {token_ids.shape[1]} token ids were given: "
                "pass the ids of every token that went through the cache"
            )
        layers = [export_layer(layer) for layer in cache.layers]
        if positions is None:
            positions = torch.arange(token_ids.shape[1], dtype=torch.long)
        return cls(
            layers=layers,
            token_ids=token_ids.detach().cpu().long(),
            positions=positions.detach().cpu().long(),
            layer_types=types,
            fingerprint=model_fingerprint(model),
            model_name=getattr(model, "kvforge_name", "") or getattr(cfg, "_name_or_path", ""),
            sliding_window=getattr(cfg, "sliding_window", None),
            attention_mask=None if attention_mask is None else attention_mask.detach().cpu().long(),
            num_model_layers=len(types),
        )

    # ----------------------------------------------------------------- import
    def check_model(self, model) -> None:
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            name = getattr(model, "kvforge_name", "") or "the given model"
            raise ModelMismatchError(
                f"this KV state was made by model {self.model_name or '?'} (fingerprint {self.fingerprint}); "
                f"it cannot be used with {name} (fingerprint {fp})"
            )

    def to_cache(self, model, cache=None, check: bool = True):
        """Build (or fill) a cache holding this state, ready for ``model.generate(cache=...)``.

        ``cache`` defaults to ``DynamicCache(config=model.config)``; any cache whose layers implement
        ``update`` (or kvforge's ``load_state``) can be filled. Continue with input ids that start with
        ``self.token_ids``: transformers skips the tokens already in the cache.
        """
        from transformers import DynamicCache

        if check:
            self.check_model(model)
        if self.layer_indices != list(range(self.num_model_layers)):
            raise KVStateError(
                f"this state holds layers {_short(self.layer_indices)} of {self.num_model_layers}; "
                "only a state with every layer can be imported into a model's cache"
            )
        self.check_complete()
        if cache is None:
            cache = DynamicCache(config=model.config)
        if not cache.layers:
            raise KVStateError(f"cannot import a KV state into a {type(cache).__name__}: it has no layers to fill (it "
                               "makes them on its first update); import into 'dynamic' or 'kvforge-quant' instead")
        if len(cache.layers) != len(self.layers):
            raise KVStateError(f"cache has {len(cache.layers)} layers, state has {len(self.layers)}")
        device = next(model.parameters()).device
        for layer_cache, layer_state in zip(cache.layers, self.layers):
            import_layer(layer_cache, layer_state, self.num_tokens, device)
        return cache

    def check_complete(self) -> None:
        """Raise unless every layer holds all the tokens its attention needs to continue."""
        n = self.num_tokens
        for i, kind, layer in zip(self.layer_indices, self.layer_types, self.layers):
            need = n
            if kind == "sliding_attention" and self.sliding_window:
                need = min(n, self.sliding_window - 1)
            if layer.length < need:
                raise KVStateError(
                    f"layer {i} ({kind}) holds {layer.length} of the {need} tokens it needs to continue; "
                    "was this state sliced by tokens?"
                )

    # ----------------------------------------------------------------- slicing
    def select_layers(self, layers) -> KVState:
        """A state with a subset of layers (``slice``, list of indices into this state, or an int)."""
        idx = list(range(len(self.layers)))
        chosen = [idx[layers]] if isinstance(layers, int) else (idx[layers] if isinstance(layers, slice) else list(layers))
        for i in chosen:
            if not -len(idx) <= i < len(idx):
                raise KVStateError(f"layer index {i} out of range for a state with {len(idx)} layers")
        return replace(
            self,
            layers=[self.layers[i] for i in chosen],
            layer_types=[self.layer_types[i] for i in chosen],
            layer_indices=[self.layer_indices[i] for i in chosen],
        )

    def select_tokens(self, start: int | None = None, stop: int | None = None) -> KVState:
        """A state with tokens ``[start, stop)`` (Python slice semantics, step 1). Encoded layers become dense."""
        n = self.num_tokens
        start, stop, _ = slice(start, stop).indices(n)
        if stop <= start:
            raise KVStateError(f"empty token range [{start}, {stop}) of a state with {n} tokens")
        layers = []
        for layer in self.layers:
            d = layer.to_dense()
            first = n - d.length  # absolute index of the layer's first token
            lo, hi = max(start, first), max(stop, first)
            k = d.tensors["keys"][:, :, lo - first : hi - first]
            v = d.tensors["values"][:, :, lo - first : hi - first]
            layers.append(LayerState.dense(k, v))
        mask = None if self.attention_mask is None else self.attention_mask[:, start:stop]
        return replace(
            self,
            layers=layers,
            token_ids=self.token_ids[:, start:stop],
            positions=self.positions[start:stop],
            attention_mask=mask,
        )

    def __getitem__(self, item) -> KVState:
        """``state[a:b]`` slices tokens; ``state.select_layers(...)`` slices layers."""
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise KVStateError("token slices must have step 1")
            return self.select_tokens(item.start, item.stop)
        raise TypeError("index a KVState with a token slice, e.g. state[:128]; use select_layers for layers")

    @staticmethod
    def concat(states: list[KVState], check_positions: bool = True) -> KVState:
        """Concatenate states of one model along tokens (e.g. a prefix state and its continuation)."""
        if not states:
            raise KVStateError("nothing to concatenate")
        first = states[0]
        for s in states[1:]:
            if s.fingerprint != first.fingerprint:
                raise ModelMismatchError(f"cannot concatenate states of models {first.fingerprint} and {s.fingerprint}")
            if s.layer_indices != first.layer_indices:
                raise KVStateError("cannot concatenate states holding different layers")
            if s.batch_size != first.batch_size:
                raise KVStateError(f"batch sizes differ: {first.batch_size} vs {s.batch_size}")
        if check_positions:
            for a, b in zip(states, states[1:]):
                if b.positions[0].item() != a.positions[-1].item() + 1:
                    raise KVStateError(
                        f"positions do not continue: {a.positions[-1].item()} then {b.positions[0].item()} "
                        "(pass check_positions=False to concatenate anyway)"
                    )
        layers = []
        for li in range(len(first.layers)):
            parts = [s.layers[li].to_dense() for s in states]
            # a layer that dropped tokens (sliding window) only continues if every later part is complete
            for s, p in zip(states[1:], parts[1:]):
                if p.length != s.num_tokens:
                    raise KVStateError(f"layer {first.layer_indices[li]} of a later state is missing tokens")
            k = torch.cat([p.tensors["keys"] for p in parts], dim=2)
            v = torch.cat([p.tensors["values"] for p in parts], dim=2)
            layers.append(LayerState.dense(k, v))
        masks = [s.attention_mask for s in states]
        mask = None
        if any(m is not None for m in masks):
            mask = torch.cat(
                [m if m is not None else torch.ones_like(s.token_ids) for m, s in zip(masks, states)], dim=1
            )
        return replace(
            first,
            layers=layers,
            token_ids=torch.cat([s.token_ids for s in states], dim=1),
            positions=torch.cat([s.positions for s in states]),
            attention_mask=mask,
        )

    def to(self, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> KVState:
        """Cast dense layers' keys and values (encoded layers are kept as they are)."""
        layers = []
        for layer in self.layers:
            if layer.kind == "dense":
                layer = LayerState.dense(*(layer.tensors[n].to(device=device, dtype=dtype) for n in ("keys", "values")))
            layers.append(layer)
        return replace(self, layers=layers)

    # ----------------------------------------------------------------- describe
    def describe(self) -> Description:
        rows = []
        for i, kind, layer in zip(self.layer_indices, self.layer_types, self.layers):
            d = layer.to_dense()
            k, v = d.tensors["keys"].float(), d.tensors["values"].float()
            rows.append(
                {
                    "layer": i,
                    "type": kind,
                    "encoding": layer.kind,
                    "shape": list(k.shape),
                    "tokens": layer.length,
                    "bytes": layer.nbytes,
                    "fp16_bytes": 2 * (k.numel() + v.numel()),  # the same tokens as a float16 cache
                    # mean L2 norm of one token's key (value) per KV head: [kv_heads]
                    "key_norm": k.norm(dim=-1).mean(dim=(0, 2)).tolist() if k.numel() else [],
                    "value_norm": v.norm(dim=-1).mean(dim=(0, 2)).tolist() if v.numel() else [],
                }
            )
        return Description(self, rows)

    # ----------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file: the tensors, and a JSON header with a SHA-256 of their bytes
        (:mod:`kvforge.artifacts`)."""
        return save_tensors(path, *self._serialize())

    def to_bytes(self) -> bytes:
        """The bytes :meth:`save` would write (for stores that are not files, e.g. Redis)."""
        return tensors_to_bytes(*self._serialize())

    def _serialize(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors: dict[str, torch.Tensor] = {
            "token_ids": self.token_ids.contiguous(),
            "positions": self.positions.contiguous(),
        }
        if self.attention_mask is not None:
            tensors["attention_mask"] = self.attention_mask.contiguous()
        layer_meta = []
        for i, layer in enumerate(self.layers):
            for name, t in layer.tensors.items():
                tensors[f"layers.{i}.{name}"] = t.detach().cpu().contiguous()
            layer_meta.append({"kind": layer.kind, "length": layer.length, "meta": layer.meta, "tensors": list(layer.tensors)})
        header = make_header(
            FORMAT_NAME, FORMAT_VERSION, tensors, fingerprint=self.fingerprint, model_name=self.model_name,
            layer_types=self.layer_types, layer_indices=self.layer_indices, num_model_layers=self.num_model_layers,
            sliding_window=self.sliding_window, layers=layer_meta, meta=self.meta,
        )
        return tensors, header

    @classmethod
    def load(cls, path: str | Path, model=None, verify: bool = True) -> KVState:
        """Read a file written by :meth:`save`; with ``model``, also check it was made by that model.

        Raises :class:`KVFileError` for a missing, foreign, truncated, corrupted or newer file and
        :class:`ModelMismatchError` for another model's state."""
        return cls._deserialize(*read_tensors(path, FORMAT_NAME, FORMAT_VERSION, verify=verify, error=KVFileError), model)

    @classmethod
    def from_bytes(cls, data: bytes, model=None, verify: bool = True, where: str = "KV state bytes") -> KVState:
        """Read bytes written by :meth:`to_bytes` (the same checks as :meth:`load`)."""
        return cls._deserialize(*read_tensors(data, FORMAT_NAME, FORMAT_VERSION, verify=verify, where=where,
                                              error=KVFileError), model)

    @classmethod
    def _deserialize(cls, header: dict, tensors: dict[str, torch.Tensor], model) -> KVState:
        layers = []
        for i, lm in enumerate(header["layers"]):
            ts = {name: tensors[f"layers.{i}.{name}"] for name in lm["tensors"]}
            layers.append(LayerState(lm["kind"], ts, lm["length"], lm.get("meta", {})))
        state = cls(
            layers=layers,
            token_ids=tensors["token_ids"],
            positions=tensors["positions"],
            layer_types=header["layer_types"],
            fingerprint=header["fingerprint"],
            model_name=header.get("model_name", ""),
            sliding_window=header.get("sliding_window"),
            layer_indices=header.get("layer_indices"),
            attention_mask=tensors.get("attention_mask"),
            num_model_layers=header.get("num_model_layers"),
            meta=header.get("meta", {}),
        )
        if model is not None:
            state.check_model(model)
        return state


def _short(idx: list[int]) -> str:
    return str(idx) if len(idx) <= 6 else f"[{idx[0]}, {idx[1]}, ..., {idx[-1]}] ({len(idx)} layers)"
