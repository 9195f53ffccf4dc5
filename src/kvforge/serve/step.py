"""The engine's forward passes: one chunk of prompt tokens, or one decode step, for many requests at once.

Each request keeps its own cache. A pass over several requests runs through a
:class:`~kvforge.serve.batch.BatchedCache` view (rows left-padded to the longest, positions per row); a pass
over one request runs through :mod:`kvforge.run` with its own cache, exactly as ``kvforge.generate`` does.
Positions always come from :mod:`kvforge.run` (``positions``, ``row_positions``): a request that has fed ``seen`` tokens to its
cache places the next ``n`` at ``seen .. seen+n-1``.
"""

from __future__ import annotations

import torch

from .. import run
from .batch import BatchedCache
from .request import Request


def prefill(model, rows: list[tuple[Request, int]], device, dtype) -> tuple[list[torch.Tensor], int]:
    """Feed each request ``r`` its prompt tokens ``r.seen .. end`` (``rows``: ``(r, end)``). Returns the last
    logits ``[1, vocab]`` of each row and the number of forward passes run.

    The chunks go through the model in one batched pass unless padding would cost more than the real
    tokens; then each request runs alone. ``r.seen`` is not advanced here.
    """
    sizes = [end - r.seen for r, end in rows]
    if len(rows) > 1 and max(sizes) * len(rows) <= 2 * sum(sizes):
        seen = [r.seen for r, _ in rows]
        view = BatchedCache(model, [r.cache for r, _ in rows], seen, sizes)
        ids, _ = view.inputs([r.prompt_ids[:end] for r, end in rows], device)
        out = model(input_ids=ids, **run.cache_kw(view), use_cache=True, position_ids=run.row_positions(seen, sizes, device),
                    attention_mask=view.attention_mask(dtype, device), logits_to_keep=1)
        return [out.logits[i : i + 1, -1] for i in range(len(rows))], 1
    logits = []
    for r, end in rows:
        ids = torch.tensor([r.prompt_ids[r.seen : end]], device=device)
        logits.append(run.prefill(model, ids, r.cache, start=r.seen))
    return logits, len(rows)


def decode(model, rows: list[Request], device, dtype) -> torch.Tensor:
    """One decode step: each request's last generated token at its position ``r.seen``. Returns the logits
    ``[len(rows), vocab]``; ``r.seen`` is not advanced here."""
    ids = torch.tensor([[r.generated[-1]] for r in rows], device=device)
    if len(rows) == 1:  # alone: the request's own cache, exactly as kvforge.generate runs it
        r = rows[0]
        return run.forward(model, ids, r.cache, start=r.seen, logits_to_keep=1).logits[:, -1]
    seen = [r.seen for r in rows]
    view = BatchedCache(model, [r.cache for r in rows], seen)
    out = model(input_ids=ids, **run.cache_kw(view), use_cache=True, position_ids=run.row_positions(seen, [1] * len(rows), device),
                attention_mask=view.attention_mask(dtype, device), logits_to_keep=1)
    return out.logits[:, -1]
