"""Cross-model KV-cache translation: a target model continues from a source model's cache.

    from kvforge.translate import fit, Translator
    tr = fit(src_model, tgt_model, src_tok, tgt_tok, texts)          # ridge, both models frozen
    tgt_state = tr.translate(src_state, text, src_model, tgt_model, src_tok, tgt_tok)
    kvforge.generate(tgt_model, tgt_tok, question, state=tgt_state)
    train(tr, src_model, tgt_model, src_tok, tgt_tok, TrainConfig(mode="replace"), calib_text, val_text)  # KL

A ``fuse`` translator (``with_mode(tr, "fuse")``, then ``train`` with ``mode="fuse"``) mixes the translation
into the target's own prefill by a learned gate: ``tr.translate(..., own=target_state)``. Each mode is a
small class over :class:`TranslationMode` (``Replace``, ``Fuse``), registered by its name in ``TRANSLATION_MODES``;
``tr.mode`` is the translator's.
"""

from ..rope import apply_rope, cos_sin, remove_rope
from .align import Alignment, align
from .layers import STRATEGIES, layer_map
from .modes import MODES, TRANSLATION_MODES, Fuse, Replace, TranslationMode, get_mode
from .registry import load, shipped
from .train import TrainConfig, TrainReport, train, with_mode
from .translator import Translator, TranslatorConfig, TranslatorMismatchError, fit, identity, unrotated

__all__ = ["Alignment", "Fuse", "MODES", "Replace", "STRATEGIES", "TRANSLATION_MODES", "TrainConfig",
           "TrainReport", "TranslationMode", "Translator", "TranslatorConfig", "TranslatorMismatchError",
           "align", "apply_rope", "cos_sin", "fit", "get_mode", "identity", "layer_map", "load",
           "remove_rope", "shipped", "train", "unrotated", "with_mode"]
