"""Perplexity of a model whose past is held in the cache under test.

``decode_faithful_ppl`` (the default): for each window, prefill the first ``context`` tokens into the
cache, then score the next ``score`` tokens in chunks of ``chunk`` tokens, each chunk one forward pass
with ``cache=cache`` (``past_key_values`` before transformers 5.24). Every scored token attends to the *stored* (possibly compressed) past,
exactly as during generation. The first scored token is predicted by the prefill's last position.

``single_pass_ppl``: the transformers docs' recipe, one forward over the window with the cache attached,
scoring the same tokens. Schemes that compress only what they store (most quantized caches) look
better or worse here than in real decoding, which is why the decode-faithful number is the default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..models import kv_bytes_fp16
from ..progress import progress
from ..run import window_nll
from ..specs import cache_nbytes
from .common import CacheLike, cache_factory, model_device, token_windows


@dataclass
class PerplexityResult:
    cache: str
    mode: str  # "decode" or "single-pass"
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored
    windows: int
    context: int
    chunk: int
    bytes_per_token: float  # cache bytes held after the window / tokens it holds
    fp16_bytes_per_token: float  # the same for a float16 DynamicCache of the model (what sizes are compared with)
    seconds_per_token: float  # wall time of the scoring passes per scored token
    per_window_nll: list[float] = field(default_factory=list)
    baseline_ppl: float | None = None

    @property
    def rel_change(self) -> float | None:
        """Relative PPL change against the uncompressed baseline of the same run (0.01 = +1%)."""
        if self.baseline_ppl is None:
            return None
        return self.ppl / self.baseline_ppl - 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rel_change"] = self.rel_change
        return d


def perplexity(
    model,
    tokenizer,
    cache: CacheLike = "dynamic",
    text: str | None = None,
    windows: list[torch.Tensor] | None = None,
    n_windows: int = 4,
    context: int = 512,
    score: int = 512,
    chunk: int = 32,
    single_pass: bool = False,
    baseline: PerplexityResult | None = None,
    show_progress: bool = True,
) -> PerplexityResult:
    """Perplexity with the past in ``cache`` (a spec or a ``model -> Cache`` factory).

    Give either ``text`` (default: the evaluation split of the built-in pydoc text) or pre-cut
    ``windows`` (``[1, context + score]`` ids each, e.g. to score several caches on the same windows).
    """
    if context < 1 or score < 1 or chunk < 1:
        raise ValueError(f"context, score and chunk must be >= 1 (got {context}, {score}, {chunk})")
    label, factory = cache_factory(cache)
    if windows is None:
        if text is None:
            from ..texts import load_text

            text = load_text("pydoc", "eval")
        windows = token_windows(tokenizer, text, n_windows, context + score)
    device = model_device(model)
    total, count, secs, bytes_tok, fp16_tok, per_window = 0.0, 0, 0.0, 0.0, 0.0, []
    for ids in progress(windows, desc=f"ppl {label}", disable=not show_progress):
        if ids.shape[1] != context + score:
            raise ValueError(f"window has {ids.shape[1]} tokens, expected context + score = {context + score}")
        c = factory(model)
        nll, k, s = window_nll(model, ids.to(device), c, context, chunk, single_pass)
        total, count, secs = total + nll, count + k, secs + s
        per_window.append(nll / k)
        seen = max(1, c.get_seq_length())
        bytes_tok, fp16_tok = cache_nbytes(c) / seen, kv_bytes_fp16(model, seen) / seen
        del c
    mean = total / count
    return PerplexityResult(
        cache=label,
        mode="single-pass" if single_pass else "decode",
        ppl=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=len(windows),
        context=context,
        chunk=score if single_pass else chunk,
        bytes_per_token=bytes_tok,
        fp16_bytes_per_token=fp16_tok,
        seconds_per_token=secs / count,
        per_window_nll=per_window,
        baseline_ppl=baseline.ppl if baseline is not None else None,
    )
