"""Measuring a translated cache: the target's loss on a continuation given some past."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import run
from ..state import KVState


def prefill_state(model, ids: torch.Tensor) -> KVState:
    """The model's own KV state of the token ids ``[N]`` (one forward pass)."""
    from ..generate import prefill

    return prefill(model, None, ids)


def continuation_nll(model, state: KVState | None, last: torch.Tensor, cont: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of the tokens ``cont`` when the model has ``state`` as its past (the context minus its
    last token ``last``, which is fed first so that it predicts ``cont[0]``); ``None``: no past at all."""
    nll = continuation_token_nll(model, state, last, cont)
    return nll.sum().item(), len(cont)


def continuation_logits(model, state: KVState | None, last: torch.Tensor, cont: torch.Tensor,
                        check: bool = True) -> torch.Tensor:
    """Logits ``[len(cont), vocab]`` predicting each token of ``cont`` when the model has ``state`` as its past
    and ``last`` is fed first (differentiable through ``state``'s tensors)."""
    cache = run.new_cache(model) if state is None else state.to_cache(model, check=check)
    x = torch.cat([last.view(1), cont[:-1]]).to(run.model_device(model))[None]
    return run.forward(model, x, cache).logits[0]


@torch.inference_mode()
def continuation_token_nll(model, state: KVState | None, last: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """Per-token NLL ``[len(cont)]`` of :func:`continuation_nll` (for how a benefit decays over tokens)."""
    logits = continuation_logits(model, state, last, cont)
    return F.cross_entropy(logits.float(), cont.to(logits.device), reduction="none").cpu()
