"""Reference generation loop, with or without a KV cache, and prefill into a ``KVState``.

``generate`` is deliberately small and readable: one prefill forward pass, then one forward pass per
new token that feeds only that token and the cache. With ``use_cache=False`` every step re-reads the
whole sequence (the quadratic baseline). Both pick identical greedy tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import run
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
    device = run.model_device(model)
    ids = run.encode(tokenizer, prompt, special=state is None).to(device)  # a continuation gets no second BOS
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    if state is not None:
        if not use_cache:
            raise ValueError("a KV state can only be continued with use_cache=True")
        cache = state.to_cache(model, cache)
        prefix = state.token_ids.to(device)
        start = state.next_position  # a sliced state's tokens need not sit at positions 0..n-1
    else:
        prefix, start = ids[:, :0], 0
        if use_cache and cache is None:
            cache = run.new_cache(model)
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: nothing to continue from")
    eos = set(_eos_ids(model, tokenizer)) if stop_at_eos else set()

    t0 = time.perf_counter()
    first = [0.0]
    bar = progress(total=max_new_tokens, desc="generate", disable=not show_progress)

    def on_token(_tok):
        if not first[0]:
            first[0] = time.perf_counter() - t0
        bar.update(1)

    with TokenCounter(model) as counter:
        if max_new_tokens == 0:
            new = []
        elif use_cache:
            logits = run.prefill(model, ids, cache, start=start)
            tokens, _ = run.decode(model, cache, logits, max_new_tokens, temperature=temperature, top_p=top_p,
                                   generator=generator, eos=eos, start=start + ids.shape[1], on_token=on_token,
                                   log_probs=False)
            new = tokens[0].tolist()
        else:  # the quadratic baseline: every step re-reads the whole sequence
            new, seq = [], torch.cat([prefix, ids], dim=1)
            for _ in range(max_new_tokens):
                logits = model(input_ids=seq, use_cache=False, logits_to_keep=1).logits[:, -1]
                nxt = run.sample_next(logits, temperature, top_p, generator)
                on_token(int(nxt[0]))
                new.append(int(nxt[0]))
                seq = torch.cat([seq, nxt[:, None]], dim=1)
                if new[-1] in eos:
                    break
        forwarded = counter.count
    bar.close()
    first = first[0]
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
    ids = run.encode(tokenizer, text).to(run.model_device(model))
    if ids.shape[1] == 0:
        raise ValueError("nothing to prefill: the text has no tokens")
    cache = run.new_cache(model) if cache is None else cache
    run.prefill(model, ids, cache, chunk_size=chunk_size, show_progress=True)
    return KVState.from_cache(cache, model, ids)
