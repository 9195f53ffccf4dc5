"""Helpers shared by the test modules (plain functions, not fixtures)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from transformers import DynamicCache

from kvforge._compat import cache_kw, one_thread  # noqa: F401  (one_thread: re-exported for the tests)

CONTEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs."
QUESTION = " Then the fox"


@torch.inference_mode()
def forward_into(model, cache, ids: torch.Tensor, start: int = 0, **kwargs):
    """One forward pass of ``ids`` ``[batch, k]`` at absolute positions ``start..start+k-1``."""
    pos = torch.arange(start, start + ids.shape[1])[None]
    return model(input_ids=ids, **cache_kw(cache), use_cache=True, position_ids=pos, **kwargs)


def prefilled_cache(model, ids: torch.Tensor):
    """A ``DynamicCache`` holding ``ids`` after a single forward pass (logits of the last token only)."""
    cache = DynamicCache(config=model.config)
    forward_into(model, cache, ids, logits_to_keep=1)
    return cache


@torch.inference_mode()
def greedy_continue(model, cache, seen: int, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy ``[batch, n]`` tokens after feeding ``ids`` to a cache that already holds ``seen`` tokens.

    The uninterrupted reference: the very cache the context was prefilled into, never exported.
    """
    out = []
    step, pos = ids, seen
    for _ in range(n):
        logits = forward_into(model, cache, step, pos).logits
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        pos += step.shape[1]
        step = nxt[:, None]
    return torch.stack(out, dim=1)


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
