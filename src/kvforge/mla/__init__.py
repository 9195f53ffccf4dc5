"""Post-hoc conversion to multi-head latent attention: the cache holds low-rank latents.

    from kvforge.mla import convert, save_converted
    cfg = convert(model, tok, ratio=2, method="decoupled_rope", calibration=texts)   # in place
    save_converted(model, tok, "smollm2-mla2")          # kvforge.load_model("smollm2-mla2") loads it back

Methods: ``separate`` and ``joint`` (keys rebuilt and rotated every step, exact at full rank) and
``decoupled_rope`` (a few rotary pairs per head kept uncompressed; attention runs on the latents with the
up-projections absorbed). Initialisation is activation-aware SVD on calibration text. Each method is a
class (:class:`SeparateKV`, :class:`JointKV`, :class:`DecoupledRope` over :class:`LatentMethod`,
:mod:`kvforge.mla.methods`) registered by its name in ``REGISTRY``; ``METHODS`` is the tuple of names.
"""

from .attention import LatentAttention
from .convert import MLAConfig, allocate, calibrate, compression, convert, install, kv_bytes_per_token
from .io import load_converted, read_config, save_converted
from .methods import METHODS, REGISTRY, DecoupledRope, JointKV, LatentMethod, SeparateKV, get_method

__all__ = ["METHODS", "REGISTRY", "DecoupledRope", "JointKV", "LatentAttention", "LatentMethod", "MLAConfig",
           "SeparateKV", "allocate", "calibrate", "compression", "convert", "get_method", "install",
           "kv_bytes_per_token", "load_converted", "read_config", "save_converted"]
