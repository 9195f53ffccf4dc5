"""Process-level helpers shared by the capabilities (the transformers-version shims live in
:mod:`kvforge.run`, with the rest of the inference path)."""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
