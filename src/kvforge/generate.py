"""Reference generation loop, with or without a KV cache, and prefill into a ``KVState``.

``generate`` is deliberately small and readable: one prefill forward pass, then one forward pass per
new token that feeds only that token and the cache. With ``use_cache=False`` every step re-reads the
whole sequence (the quadratic baseline). Both pick identical greedy tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ._compat import cache_kw
from .progress import progress
from .state import KVState


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    prompt_tokens: int
    forwarded_tokens: int  # tokens that went through the model (counted at the embedding)
    seconds: float
    first_token_seconds: float
    stats: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("inf")


class TokenCounter:
    """Counts the tokens that actually go through a model (a hook on its input embedding)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.count += args[0].numel()

    def close(self):
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Pick next tokens from ``logits`` ``[batch, vocab]``: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, sorted_i, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: str | torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    use_cache: bool = True,
    cache=None,
    state: KVState | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    show_progress: bool = False,
) -> GenerationResult:
    """Generate ``max_new_tokens`` tokens after ``prompt`` (text or ``[1, n]`` ids).

    ``cache`` is any transformers cache to fill (default: ``DynamicCache``); ``state`` is a KV state whose
    tokens come before the prompt, so they are never run through the model again.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    if isinstance(prompt, str):
        add_special = state is None  # a continuation must not start with a second BOS
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special).input_ids
    else:
        ids = prompt if prompt.dim() == 2 else prompt.unsqueeze(0)
    ids = ids.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if state is not None:
        if not use_cache:
            raise ValueError("a KV state can only be continued with use_cache=True")
        cache = state.to_cache(model, cache)
        prefix = state.token_ids.to(device)
    else:
        prefix = ids[:, :0]
        if use_cache and cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: nothing to continue from")
    eos = set(_eos_ids(model, tokenizer)) if stop_at_eos else set()

    seq = torch.cat([prefix, ids], dim=1)
    new: list[int] = []
    t0 = time.perf_counter()
    first = 0.0
    with TokenCounter(model) as counter:
        step_input = ids
        for step in progress(range(max_new_tokens), desc="generate", disable=not show_progress):
            if use_cache:
                pos = torch.arange(seq.shape[1] - step_input.shape[1], seq.shape[1], device=device)
                out = model(input_ids=step_input, **cache_kw(cache), use_cache=True, position_ids=pos[None], logits_to_keep=1)
            else:
                out = model(input_ids=seq, use_cache=False, logits_to_keep=1)
            nxt = sample_next(out.logits[:, -1, :], temperature, top_p, generator)
            if step == 0:
                first = time.perf_counter() - t0
            tok = int(nxt[0])
            new.append(tok)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if tok in eos:
                break
        forwarded = counter.count
    seconds = time.perf_counter() - t0
    return GenerationResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        token_ids=new,
        prompt_tokens=ids.shape[1],
        forwarded_tokens=forwarded,
        seconds=seconds,
        first_token_seconds=first,
        stats={"cache": type(cache).__name__ if use_cache else None, "prefix_tokens": prefix.shape[1]},
    )


def _eos_ids(model, tokenizer) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else list(ids)


@torch.inference_mode()
def prefill(model, tokenizer, text: str | torch.Tensor, cache=None, chunk_size: int | None = None) -> KVState:
    """Run ``text`` (or ``[1, n]`` ids) through ``model`` into ``cache`` and export it as a ``KVState``.

    ``chunk_size`` feeds the text in chunks (bounded peak memory on long contexts).
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if isinstance(text, str):
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        ids = text if text.dim() == 2 else text.unsqueeze(0)
    if ids.shape[1] == 0:
        raise ValueError("nothing to prefill: the text has no tokens")
    ids = ids.to(device)
    cache = DynamicCache(config=model.config) if cache is None else cache
    step = chunk_size or ids.shape[1]
    for start in progress(range(0, ids.shape[1], step), desc="prefill", disable=ids.shape[1] <= step):
        chunk = ids[:, start : start + step]
        pos = torch.arange(start, start + chunk.shape[1], device=device)[None]
        model(input_ids=chunk, **cache_kw(cache), use_cache=True, position_ids=pos, logits_to_keep=1)
    return KVState.from_cache(cache, model, ids)
