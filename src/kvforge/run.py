"""The one way kvforge runs a model through a KV cache.

Every capability (``generate``, the metrics of ``kvforge.eval``, calibration, the trainers' validation,
the benchmarks, the tests) goes through these functions, so positions, prompt prefixes and the
transformers-version shims live in one place. Read top to bottom, this is the whole inference path:

    cache = new_cache(model, "kvforge-quant:preset=safe")
    logits = prefill(model, ids, cache, chunk_size=512)          # [batch, vocab]: predicts the next token
    tokens = decode(model, cache, logits, max_new_tokens=32)      # greedy (or sampled) loop
    nll, n = score(model, cache, continuation)                    # teacher-forced NLL of given tokens

Positions: a forward pass that appends ``k`` tokens to a cache holding ``n`` places them at absolute
positions ``n .. n+k-1`` (``cache.get_seq_length()`` counts every token a cache has *seen*, also those a
sliding window dropped). The server's batched step places each request's rows with ``row_positions``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version

# transformers 5.24 renamed ``past_key_values`` of ``forward``/``generate`` to ``cache`` (the old name
# warns until 5.40): pass whichever the installed version prefers
CACHE_ARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"

CacheLike = Any  # a spec string, a CacheSpec, a ``model -> Cache`` callable, or None (DynamicCache)


def cache_kw(cache) -> dict:
    """``{"cache": cache}`` or ``{"past_key_values": cache}`` for the installed transformers."""
    return {CACHE_ARG: cache}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ---------------------------------------------------------------------------- caches
def cache_factory(cache: CacheLike) -> tuple[str, Callable[[Any], Any]]:
    """``(label, factory)`` for a spec string, a ``CacheSpec``, a ``model -> Cache`` callable or ``None``.

    Raises ``TypeError`` for anything else, and :class:`kvforge.specs.UnknownCacheSpecError` for a
    spec string that names no cache.
    """
    from .specs import CacheSpec, parse_spec

    if cache is None:
        cache = "dynamic"
    if isinstance(cache, str | CacheSpec):
        spec = parse_spec(cache)
        return str(spec), spec.build
    if callable(cache):
        return getattr(cache, "__name__", "custom"), cache
    raise TypeError(f"expected a cache spec or a callable model -> Cache, got {type(cache).__name__}")


def new_cache(model, cache: CacheLike = None):
    """A fresh, empty cache for ``model`` from a spec (default ``dynamic``) or a factory."""
    return cache_factory(cache)[1](model)


# ---------------------------------------------------------------------------- prompts and windows
def prompt_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a prompt (``[<bos>]`` for Gemma, ``[]`` for SmolLM2)."""
    bare = list(tokenizer("x", add_special_tokens=False).input_ids)
    full = list(tokenizer("x", add_special_tokens=True).input_ids)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return [int(t) for t in full[:i]]
    return []


def token_windows(tokenizer, text: str, n_windows: int, window: int, stride: int | None = None,
                  name: str = "") -> list[torch.Tensor]:
    """``n_windows`` windows of ``window`` token ids (``[1, window]`` each) from ``text``.

    Every window starts as the model's prompts do (with the tokenizer's prefix, e.g. ``<bos>``), followed
    by ``window - len(prefix)`` consecutive text tokens; window ``i`` starts at text token ``i * stride``.
    Too little text raises ``ValueError`` (naming the text as ``name`` when given), never a silently smaller run.
    """
    prefix = prompt_prefix(tokenizer)
    body = window - len(prefix)
    if body < 1:
        raise ValueError(f"a window of {window} tokens has no room after the prompt prefix {prefix}")
    stride = stride or body
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long).flatten()
    need = (n_windows - 1) * stride + body
    if ids.numel() < need:
        raise ValueError(
            f"the text{f' {name!r}' if name else ''} has {ids.numel()} tokens; {n_windows} window{'s' if n_windows != 1 else ''} of {window} "
            f"(stride {stride}) need {need}"
        )
    head = torch.tensor(prefix, dtype=torch.long)
    return [torch.cat([head, ids[i * stride : i * stride + body]])[None] for i in range(n_windows)]


def encode(tokenizer, text: str | torch.Tensor, special: bool = True) -> torch.Tensor:
    """``[1, n]`` ids for a text (with the prompt prefix unless ``special=False``) or ids ``[n]``/``[b, n]``."""
    if isinstance(text, str):
        return tokenizer(text, return_tensors="pt", add_special_tokens=special).input_ids
    return text if text.dim() == 2 else text.unsqueeze(0)


# ---------------------------------------------------------------------------- forward passes
def positions(start: int, n: int, device=None) -> torch.Tensor:
    """``[1, n]`` absolute positions ``start .. start+n-1``."""
    return torch.arange(start, start + n, device=device)[None]


def row_positions(seen: list[int], new: list[int], device=None) -> torch.Tensor:
    """Positions ``[B, max(new)]`` for a batch of requests with their own caches (the server's batched step):
    row ``r`` places its ``new[r]`` tokens after its ``seen[r]``, left-padded with position 0 (a padding
    query's output is dropped and its key is not cached)."""
    q = max(new)
    return torch.cat([torch.cat([torch.zeros(1, q - n, dtype=torch.long, device=device), positions(p, n, device)], 1)
                      for p, n in zip(seen, new)])


def forward(model, ids: torch.Tensor, cache, *, start: int | None = None, logits_to_keep: int = 0, **kwargs):
    """One forward pass of ``ids`` ``[batch, k]`` appended to ``cache``; returns the model output.

    ``start`` is the absolute position of ``ids[:, 0]`` (default: the tokens the cache has seen);
    ``logits_to_keep=1`` computes only the last position's logits.
    """
    if ids.shape[1] == 0:
        raise ValueError("nothing to forward: no input tokens")
    pos = positions(cache.get_seq_length() if start is None else start, ids.shape[1], ids.device)
    return model(input_ids=ids, **cache_kw(cache), use_cache=True, position_ids=pos, logits_to_keep=logits_to_keep,
                 **kwargs)


@torch.inference_mode()
def prefill(model, ids: torch.Tensor, cache, *, chunk_size: int | None = None, start: int | None = None,
            show_progress: bool = False) -> torch.Tensor:
    """Run ``ids`` ``[batch, n]`` into ``cache`` (in chunks of ``chunk_size`` tokens: bounded peak memory).

    Returns the logits ``[batch, vocab]`` of the last position (they predict the next token).
    """
    from .progress import progress

    n = ids.shape[1]
    if n == 0:
        raise ValueError("nothing to prefill: no tokens")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = chunk_size or n
    start = cache.get_seq_length() if start is None else start
    out = None
    for s in progress(range(0, n, step), desc="prefill", disable=not show_progress or n <= step):
        out = forward(model, ids[:, s : s + step], cache, start=start + s, logits_to_keep=1)
    return out.logits[:, -1]


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator=None) -> torch.Tensor:
    """Next tokens ``[batch]`` from ``logits`` ``[batch, vocab]``: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p * keep)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def decode(model, cache, logits: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
           generator=None, eos: Iterable[int] = (), forced: torch.Tensor | None = None, start: int | None = None,
           on_token: Callable[[int], None] | None = None,
           log_probs: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode after a prefill whose last ``logits`` ``[batch, vocab]`` predict the first new token.

    Each step picks a token (``forced[:, i]`` when given: teacher forcing) and feeds it back through the
    cache at the next absolute position (from ``start``, default: the tokens the cache has seen). Stops after ``max_new_tokens`` or when every row has produced a token of ``eos``; the last pick
    is not fed through the model (nothing reads its logits). Returns ``(tokens [batch, m],
    log_probs [batch, m, vocab])``, the log-probabilities each pick was made from (float32), or
    ``(tokens, None)`` with ``log_probs=False`` (generation: no softmax over the vocabulary per step).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    eos = set(eos)
    tokens, logps = [], []
    done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    pos = cache.get_seq_length() if start is None else start
    for i in range(max_new_tokens):
        if log_probs:
            logps.append(F.log_softmax(logits.float(), -1))
        nxt = forced[:, i].to(logits.device) if forced is not None else sample_next(logits, temperature, top_p, generator)
        tokens.append(nxt)
        if on_token is not None:
            on_token(int(nxt[0]))
        if eos:
            done |= torch.isin(nxt, torch.tensor(sorted(eos), device=nxt.device))
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = forward(model, nxt[:, None], cache, start=pos, logits_to_keep=1).logits[:, -1]
        pos += 1
    if not tokens:
        empty = logits.new_zeros(logits.shape[0], 0, dtype=torch.long)
        return empty, logits.new_zeros(logits.shape[0], 0, logits.shape[-1]).float() if log_probs else None
    return torch.stack(tokens, 1), torch.stack(logps, 1) if log_probs else None


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, max_new_tokens: int, cache: CacheLike = None, chunk_size: int | None = None) -> torch.Tensor:
    """Greedy ``[batch, max_new_tokens]`` tokens after the prompt ``ids`` ``[batch, n]``.

    ``cache`` is an empty cache object, a spec or a factory (default ``dynamic``); a cache object that
    already holds tokens continues from them (``ids`` then come after its past).
    """
    cache = cache if hasattr(cache, "get_seq_length") else new_cache(model, cache)
    logits = prefill(model, ids, cache, chunk_size=chunk_size)
    return decode(model, cache, logits, max_new_tokens, log_probs=False)[0]


@torch.inference_mode()
def score(model, cache, ids: torch.Tensor, *, chunk: int = 32, logits: torch.Tensor | None = None,
          single_pass_context: int | None = None) -> tuple[float, int, float]:
    """Teacher-forced negative log-likelihood of ``ids`` ``[1, m]`` following what ``cache`` holds.

    ``logits`` ``[1, vocab]`` are the prefill's last logits (they predict ``ids[:, 0]``); the rest is fed
    in chunks of ``chunk`` tokens, each one forward pass that reads the *stored* past as decoding does.
    Returns ``(sum of NLL in nats, tokens scored, seconds spent in the scoring passes)``.

    ``single_pass_context=c`` instead runs ``ids`` ``[1, n]`` in one forward over an empty ``cache`` and
    scores ``ids[:, c:]`` (the transformers docs' recipe; compressed past is not read back).
    """
    t = time.perf_counter()
    if single_pass_context is not None:
        c = single_pass_context
        out = forward(model, ids, cache, start=0).logits[0, c - 1 : -1]
        nll = F.cross_entropy(out.float(), ids[0, c:], reduction="sum")
        return nll.item(), ids.shape[1] - c, time.perf_counter() - t
    if logits is None:
        raise ValueError("score needs the logits that predict the first token (prefill's return value)")
    m = ids.shape[1]
    parts = [logits.reshape(1, -1)]
    for s in range(0, m - 1, chunk):  # the last token is only ever a target
        parts.append(forward(model, ids[:, s : min(s + chunk, m - 1)], cache).logits[0])
    nll = F.cross_entropy(torch.cat(parts).float(), ids[0], reduction="sum")
    return nll.item(), m, time.perf_counter() - t


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor, cache, context: int, chunk: int = 32, single_pass: bool = False):
    """Decode-faithful NLL of one window ``[1, context + score]``: prefill ``context`` tokens into ``cache``,
    then :func:`score` the rest. Returns ``(NLL sum, tokens scored, scoring seconds)``."""
    if single_pass:
        return score(model, cache, ids, single_pass_context=context)
    logits = prefill(model, ids[:, :context], cache)
    return score(model, cache, ids[:, context:], chunk=chunk, logits=logits)
