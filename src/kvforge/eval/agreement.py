"""Agreement of a cache under test with the uncompressed run (a ``DynamicCache``).

For each prompt: greedy continuation of ``new_tokens`` tokens with each cache; the match rate is the
fraction of positions where the two pick the same token, and the first divergence is the first
position where they differ. Because one early divergence changes everything after it, the mean KL
divergence ``KL(p_baseline || p_test)`` of the next-token distributions is measured teacher-forced:
both caches are fed the *baseline's* tokens one at a time, so positions are comparable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .. import run
from ..progress import progress
from .common import CacheLike, cache_factory, model_device


@dataclass
class AgreementResult:
    cache: str
    prompts: int
    new_tokens: int
    match_rate: float  # fraction of greedy positions equal to the baseline's
    exact: float  # fraction of prompts whose whole continuation matches
    first_divergence: list[int | None] = field(default_factory=list)  # per prompt; None = never
    mean_kl: float = 0.0  # nats, teacher-forced on baseline tokens
    max_kl: float = 0.0

    @property
    def mean_first_divergence(self) -> float:
        """Mean first-divergence position, counting 'never' as ``new_tokens``."""
        vals = [self.new_tokens if d is None else d for d in self.first_divergence]
        return sum(vals) / max(1, len(vals))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_first_divergence"] = self.mean_first_divergence
        return d


def _decode(model, prompt: torch.Tensor, cache, steps: int, forced: torch.Tensor | None = None):
    """Greedy decode (or teacher-force ``forced``) for ``steps`` tokens; returns tokens and log-probs."""
    logits = run.prefill(model, prompt, cache)
    tokens, logp = run.decode(model, cache, logits, steps, forced=None if forced is None else forced[None])
    return tokens[0].cpu(), logp[0]


def agreement(
    model,
    tokenizer,
    cache: CacheLike,
    prompts: list[torch.Tensor] | None = None,
    new_tokens: int = 32,
    n_prompts: int = 4,
    prompt_tokens: int = 256,
    show_progress: bool = True,
) -> AgreementResult:
    """Compare greedy decoding with ``cache`` against a ``DynamicCache`` on fixed prompts.

    ``prompts`` default to ``n_prompts`` pieces of ``prompt_tokens`` tokens from the evaluation text.
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    label, factory = cache_factory(cache)
    _, base_factory = cache_factory("dynamic")
    if prompts is None:
        prompts = default_prompts(tokenizer, n_prompts, prompt_tokens)
    device = model_device(model)
    matches, exact, firsts, kls = 0, 0, [], []
    for p in progress(prompts, desc=f"agree {label}", disable=not show_progress):
        p = p.to(device)
        base_tok, base_logp = _decode(model, p, base_factory(model), new_tokens)
        test_tok, _ = _decode(model, p, factory(model), new_tokens)
        _, forced_logp = _decode(model, p, factory(model), new_tokens, forced=base_tok.to(device))
        same = base_tok == test_tok
        matches += int(same.sum())
        exact += int(bool(same.all()))
        diff = (~same).nonzero()
        firsts.append(int(diff[0]) if diff.numel() else None)
        # KL(p || q) with p the baseline distribution, per position: [new_tokens]
        kl = (base_logp.exp() * (base_logp - forced_logp)).sum(-1)
        kls.append(kl)
    kl_all = torch.cat(kls)
    return AgreementResult(
        cache=label,
        prompts=len(prompts),
        new_tokens=new_tokens,
        match_rate=matches / (len(prompts) * new_tokens),
        exact=exact / len(prompts),
        first_divergence=firsts,
        mean_kl=float(kl_all.mean().clamp_min(0)),
        max_kl=float(kl_all.max().clamp_min(0)),
    )


def default_prompts(tokenizer, n: int = 4, tokens: int = 256, text: str | None = None) -> list[torch.Tensor]:
    """``n`` prompts of ``tokens`` ids (each starting as the model's prompts do, e.g. with ``<bos>``), cut
    at evenly spaced offsets of the evaluation text."""
    from ..texts import load_text

    text = text if text is not None else load_text("pydoc", "eval")
    body = len(tokenizer(text, add_special_tokens=False).input_ids)
    if body < n * tokens:
        raise ValueError(f"the text has {body} tokens, {n} prompts of {tokens} need {n * tokens}")
    return run.token_windows(tokenizer, text, n, tokens, stride=body // n)
