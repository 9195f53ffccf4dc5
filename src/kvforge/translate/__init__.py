"""Cross-model KV-cache translation: a target model continues from a source model's cache.

    from kvforge.translate import fit, Translator
    tr = fit(src_model, tgt_model, src_tok, tgt_tok, texts)          # ridge, both models frozen
    tgt_state = tr.translate(src_state, text, src_model, tgt_model, src_tok, tgt_tok)
    kvforge.generate(tgt_model, tgt_tok, question, state=tgt_state)
    train(tr, src_model, tgt_model, src_tok, tgt_tok, TrainConfig(mode="replace"), calib_text, val_text)  # KL

A token-conditioned translator (the default of ``fit``) also reads a window of source tokens and the target's
own token-local features (its embeddings and exact layer-0 keys/values), so names and numbers keep their
identity; ``tr.translate(..., recompute=0.1)`` then lets the target re-read the 10% of the tokens the
translation is least sure of (``.recompute``). Training adds passages with planted facts (``.facts``).

A ``fuse`` translator (``with_mode(tr, "fuse")``, then ``train`` with ``mode="fuse"``) mixes the translation
into the target's own prefill by a learned gate: ``tr.translate(..., own=target_state)``. Each mode is a
small class over :class:`TranslationMode` (``Replace``, ``Fuse``), registered by its name in ``TRANSLATION_MODES``;
``tr.mode`` is the translator's.
"""

from ..rope import apply_rope, cos_sin, remove_rope
from .align import Alignment, align
from .fit import calibration_texts, fit
from .layers import STRATEGIES, layer_map
from .modes import MODES, TRANSLATION_MODES, Fuse, Replace, TranslationMode, get_mode
from .registry import load, shipped
from .train import TrainConfig, TrainReport, train, with_mode
from .translator import Translator, TranslatorConfig, TranslatorMismatchError, identity, unrotated

__all__ = ["Alignment", "Fuse", "MODES", "Replace", "STRATEGIES", "TRANSLATION_MODES", "TrainConfig",
           "TrainReport", "TranslationMode", "Translator", "TranslatorConfig", "TranslatorMismatchError",
           "align", "apply_rope", "calibration_texts", "cos_sin", "fit", "get_mode", "identity", "layer_map", "load",
           "remove_rope", "shipped", "train", "unrotated", "with_mode"]
