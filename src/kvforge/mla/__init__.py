"""Post-hoc conversion to multi-head latent attention: the cache holds low-rank latents.

    from kvforge.mla import convert, save_converted
    cfg = convert(model, tok, ratio=2, method="decoupled_rope", calibration=texts)   # in place
    save_converted(model, tok, "smollm2-mla2")          # kvforge.load_model("smollm2-mla2") loads it back

Methods: ``separate`` and ``joint`` (keys rebuilt and rotated every step, exact at full rank) and
``decoupled_rope`` (a few rotary pairs per head kept uncompressed; attention runs on the latents with the
up-projections absorbed). Initialisation is activation-aware SVD on calibration text.
"""

from .attention import METHODS, LatentAttention
from .convert import MLAConfig, allocate, calibrate, compression, convert, install, kv_bytes_per_token
from .io import load_converted, read_config, save_converted

__all__ = ["METHODS", "LatentAttention", "MLAConfig", "allocate", "calibrate", "compression", "convert", "install",
           "kv_bytes_per_token", "load_converted", "read_config", "save_converted"]
