"""Helpers shared by the test modules (plain functions, not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from transformers import DynamicCache

from kvforge import run
from kvforge._compat import one_thread  # noqa: F401  (re-exported for the tests)
from kvforge.run import cache_kw

CONTEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
QUESTION = " Then the fox"


@torch.inference_mode()
def forward_into(model, cache, ids: torch.Tensor, start: int = 0, **kwargs):
    """One forward pass of ``ids`` ``[batch, k]`` at absolute positions ``start..start+k-1``."""
    return run.forward(model, ids, cache, start=start, **kwargs)


def prefilled_cache(model, ids: torch.Tensor):
    """A ``DynamicCache`` holding ``ids`` after a single forward pass (logits of the last token only)."""
    cache = DynamicCache(config=model.config)
    forward_into(model, cache, ids, logits_to_keep=1)
    return cache


def greedy_continue(model, cache, seen: int, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy ``[batch, n]`` tokens after feeding ``ids`` to a cache that already holds ``seen`` tokens.

    The uninterrupted reference: the very cache the context was prefilled into, never exported.
    """
    logits = run.prefill(model, ids, cache, start=seen)
    return run.decode(model, cache, logits, n)[0]


@torch.inference_mode()
def hf_greedy(model, ids: torch.Tensor, n: int, cache=None, **kwargs) -> torch.Tensor:
    """The ``[batch, n]`` new tokens of transformers' ``model.generate`` (greedy, exactly ``n`` tokens)."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), **cache_kw(cache), do_sample=False,
        max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kwargs,
    )
    return out[:, ids.shape[1]:]


def ids_of(tok, text: str, special: bool = True) -> torch.Tensor:
    return tok(text, return_tensors="pt", add_special_tokens=special).input_ids


def run_cli(*args, check: bool = True) -> subprocess.CompletedProcess:
    """``kvforge ARGS`` in a fresh process (what a user runs), quiet progress bars."""
    env = {**os.environ, "KVFORGE_QUIET": "1"}
    r = subprocess.run([sys.executable, "-m", "kvforge", *args], capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr
    return r
