"""Translator modes: one small class per mode over :class:`TranslationMode`, registered by name.

A mode owns what differs between them: whether it needs the target's own state of the text, how the
translated state becomes the result, the extra parameters it adds to a translator (and trains), its training
defaults, the validation metric that picks the best weights, and its shipped files' name suffix. The name
is the public, serialized form (``TranslatorConfig.mode``, translator files, ``--mode``); look a mode up
with :func:`get_mode`.
"""

from __future__ import annotations

import torch

from ..state import KVState, KVStateError, LayerState

GATE_INIT = -3.0


class TranslationMode:
    """The base: a mode's name, its training defaults and how it turns the translation into the result."""

    name: str = ""
    needs_own = False  # translate() needs the target's own state of the text (own=...)
    extra_parameter_names: tuple[str, ...] = ()  # parameters the mode adds to a translator (trained at gate_lr)
    steps = 400  # training defaults
    lr = 1e-4
    ce_weight = 0.0
    metric = "kl"  # validation metric that picks the best weights ("kl" or "ppl")
    kv_regression = True  # TrainConfig.kv_weight applies

    @property
    def suffix(self) -> str:
        """What follows ``{source}__{target}`` in a shipped translator's file name."""
        return f"__{self.name}"

    def extra_parameters(self, layers: int, heads: int) -> dict[str, torch.nn.Parameter]:
        """The parameters this mode adds to a translator of ``layers`` target layers of ``heads`` kv heads."""
        return {}

    def combine(self, tr, own: KVState | None, translated: KVState) -> KVState:
        """The result from the translated state (and the target's own state, when the mode needs it)."""
        return translated

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Replace(TranslationMode):
    """The translation is the target's whole past (trained by KL to the target's own prefill)."""

    name = "replace"

    @property
    def suffix(self) -> str:
        return ""


class Fuse(TranslationMode):
    """Cache-to-Cache: the translation is mixed into the target's own state by a learned per-layer, per-head
    gate (trained by next-token loss)."""

    name = "fuse"
    needs_own = True
    extra_parameter_names = ("gate",)
    steps = 150
    lr = 3e-5
    ce_weight = 1.0
    metric = "ppl"
    kv_regression = False

    def extra_parameters(self, layers: int, heads: int) -> dict[str, torch.nn.Parameter]:
        # per target layer, keys/values, head: the gate's logit; starts near "target alone"
        return {"gate": torch.nn.Parameter(torch.full((layers, 2, heads), GATE_INIT))}

    def combine(self, tr, own: KVState | None, translated: KVState) -> KVState:
        return gated_fuse(tr.gate, own, translated, tr.config.source)


TRANSLATION_MODES: dict[str, TranslationMode] = {m.name: m for m in (Replace(), Fuse())}
MODES = tuple(TRANSLATION_MODES)


def get_mode(mode: str | TranslationMode) -> TranslationMode:
    """The mode registered as ``mode`` (a mode object passes through)."""
    if isinstance(mode, TranslationMode):
        return mode
    if mode not in TRANSLATION_MODES:
        raise ValueError(f"unknown translator mode {mode!r}; choose from {', '.join(MODES)}")
    return TRANSLATION_MODES[mode]


def gated_fuse(gate: torch.Tensor, own: KVState, translated: KVState, source: str) -> KVState:
    """``own + sigmoid(gate) * (translated - own)`` per layer, for keys and values, per target head (both
    states rotated at the same positions, so mixing the rotated tensors is exact)."""
    if own.num_tokens != translated.num_tokens or not torch.equal(own.token_ids, translated.token_ids):
        raise KVStateError(f"fuse needs the target's own state of the same tokens: it holds {own.num_tokens} "
                           f"tokens, the translation {translated.num_tokens}")
    layers = []
    for i, (o, t) in enumerate(zip(own.layers, translated.layers)):
        o, t = o.to_dense(), t.to_dense()
        n = o.length  # a sliding target layer holds only its last tokens
        g = torch.sigmoid(gate[i]).view(2, 1, -1, 1, 1)
        ok, ov = o.tensors["keys"], o.tensors["values"]
        tk, tv = t.tensors["keys"][:, :, -n:], t.tensors["values"][:, :, -n:]
        layers.append(LayerState.dense((ok + g[0] * (tk.to(ok.dtype) - ok)).to(ok.dtype),
                                       (ov + g[1] * (tv.to(ov.dtype) - ov)).to(ov.dtype)))
    return KVState(layers, own.token_ids, own.positions, list(own.layer_types), own.fingerprint,
                   model_name=own.model_name, sliding_window=own.sliding_window,
                   num_model_layers=own.num_model_layers, meta={**own.meta, "fused_from": source})
