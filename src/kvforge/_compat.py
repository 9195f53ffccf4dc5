"""Small shims over transformers versions that kvforge supports (5.x).

transformers 5.24 renamed the ``past_key_values`` argument of ``forward``/``generate`` to ``cache``
(the old name still works, with a FutureWarning, until 5.40). kvforge passes whichever name the
installed version prefers, so users see no deprecation noise and nothing breaks when the old name
goes away.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import transformers
from packaging.version import Version

CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def cache_kw(cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}`` for the installed transformers."""
    return {CACHE_ARG: cache}


@contextmanager
def one_thread():
    """Run torch on one thread: small matmuls and factorisations gain nothing from more, and on a busy
    machine a second OpenMP/LAPACK thread waiting for a core makes each one up to 100x slower (one SVD
    in ``kvforge.mla.convert``: 28 s instead of 0.3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
