"""Peers behind kvforge's names, side by side: transformers' ``QuantizedCache`` and tiny-turboquant as cache
specs (:mod:`kvforge.peers.caches`), and cacheshrink's MLA conversion (:mod:`kvforge.peers.cacheshrink`).

Each adapter changes only what kvforge needs to run the peer on its protocol (an API rename, an offline
stub) and refuses by name what the peer cannot do correctly; the peers' own code is not copied.
"""

from . import caches as _caches  # noqa: F401  (registers the hf-quantized and tiny-turboquant specs)
