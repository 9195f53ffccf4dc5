"""Output correction for :func:`kvforge.mla.convert`: each layer's ``o_proj`` refitted to undo what the latent
cache changed in that layer's attention output.

After a conversion the latent attention of a layer gives an output ``A'`` (per token, the concatenated heads
before ``o_proj``, ``[T, Hq*D]``) where the original attention module, on the same hidden states, gives
``A``. Compressing the values puts ``A'`` near a subspace and compressing the keys moves the attention
weights; a new ``o_proj`` weight can take back the part of that error that is linear in ``A'``. This is
the layer-wise reconstruction objective of post-training compression (Optimal Brain Compression, Frantar
& Alistarh 2022; GPTQ) applied to the one matrix after the cache, in closed form and without training:

    W = argmin_W  sum_t |W_o a_t - W a'_t|^2 + lam |W - W_o|^2_F  =  W_o (A^T A' + lam I) (A'^T A' + lam I)^-1

with ``lam`` a share (``damping``) of the mean eigenvalue of ``A'^T A'``, so that directions the
calibration text barely excites keep the original weight (for ``lam = 0``: the least squares solution
nearest ``W_o``; :func:`~kvforge.mla.convert.convert` uses ``damping=1``, chosen among 0.001 to 1 on
held-out text: the more shrinkage, the better it held there). Both attentions run in the same forward pass over
the calibration text (the converted model's hidden states: every layer is fitted on the inputs its
converted predecessors give it); each row of ``W`` is an independent regression, so no output weighting
is needed. ``target="global"`` fits to the unconverted model's own attention outputs instead (its hidden
states run through the original attention modules), so that each ``o_proj`` also takes back part of the
drift that the converted layers before it caused.
"""

from __future__ import annotations

import torch

from .._compat import one_thread
from ..models import inner_module
from .attention import attention_modules


@torch.no_grad()
def correct_outputs(model, originals: list, tokenizer, texts: list[str], max_tokens: int = 512,
                    damping: float = 1.0, target: str = "local") -> list[dict[str, float]]:
    """Refit every converted layer's ``o_proj`` in place (see the module doc); returns per layer the
    relative reconstruction error ``|W_o A - W A'|^2 / |W_o A|^2`` on the calibration text before and after
    (``{"before", "after"}``; "after" is never above "before" for ``damping=0``).

    ``model``: converted (its attention modules are :class:`~kvforge.mla.attention.LatentAttention`);
    ``originals``: the attention modules it replaced, in layer order (they share ``o_proj`` with the latent
    ones); ``texts``: calibration pieces, each read up to ``max_tokens`` tokens; ``damping`` >= 0.
    ``target``: ``"local"`` (``A``: the original attention on the converted model's hidden states, so each
    layer undoes its own cache's error) or ``"global"`` (``A``: the original model's own attention output,
    its hidden states unconverted, so each layer also takes back what the layers before it drifted).
    Raises ``ValueError`` for no calibration tokens, a negative damping, an unknown target or a layer
    count that differs."""
    new = attention_modules(model)
    if len(originals) != len(new):
        raise ValueError(f"{len(originals)} original attention modules for {len(new)} converted layers")
    if not damping >= 0:
        raise ValueError(f"the output correction's damping must be >= 0, got {damping}")
    if target not in ("local", "global"):
        raise ValueError(f"unknown output-correction target {target!r}; choose 'local' or 'global'")
    width = [a.o_proj.in_features for a in new]
    sums = [{k: torch.zeros(w, w, dtype=torch.float64) for k in ("aa", "ab", "bb")} for w in width]
    want: list[torch.Tensor | None] = [None] * len(new)  # per layer, the original's output for this piece
    mode = {"which": "latent"}
    hooks = []

    def run_original(i):  # local: before the latent attention runs, the original module on the same inputs
        def hook(_mod, args, kwargs):
            mode["which"] = "original"
            try:
                originals[i](*args, **kwargs)
            finally:
                mode["which"] = "latent"
        return hook

    def read_input(i):  # o_proj is shared: it reads the original's output, then the latent's
        def hook(_mod, args):
            x = args[0].reshape(-1, width[i]).float()
            if mode["which"] == "original":
                want[i] = x
            elif want[i] is not None:
                a, s = want[i], sums[i]
                want[i] = None
                # products in float32 per piece (a few hundred tokens), summed in float64
                s["aa"] += (a.T @ a).double()
                s["ab"] += (a.T @ x).double()
                s["bb"] += (x.T @ x).double()
        return hook

    layers = list(inner_module(model, "layers"))
    for i, a in enumerate(new):
        if target == "local":
            hooks.append(a.register_forward_pre_hook(run_original(i), with_kwargs=True))
        hooks.append(a.o_proj.register_forward_pre_hook(read_input(i)))
    device = next(model.parameters()).device
    tokens = 0
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens].to(device)
            if not ids.shape[1]:
                continue
            if target == "global":  # the original model: its attention modules back in place for one pass
                mode["which"] = "original"
                try:
                    for layer, orig in zip(layers, originals):
                        layer.self_attn = orig
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)
                finally:
                    for layer, lat in zip(layers, new):
                        layer.self_attn = lat
                    mode["which"] = "latent"
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            tokens += ids.shape[1]
    finally:
        for hk in hooks:
            hk.remove()
    if not tokens:
        raise ValueError("the output correction needs at least one non-empty calibration text")

    report = []
    with one_thread():
        for a, s in zip(new, sums):
            w0 = a.o_proj.weight.double()
            n = s["bb"].shape[0]
            lam = damping * float(torch.trace(s["bb"])) / n
            # W = W_o (A^T A' + lam I) (A'^T A' + lam I)^-1 = W_o + W_o (A^T A' - A'^T A') (A'^T A' + lam I)^-1;
            # the pseudo-inverse gives, for lam = 0 and A' of low rank (a narrow latent), the least squares
            # solution nearest W_o
            inv = torch.linalg.pinv(s["bb"] + lam * torch.eye(n, dtype=torch.float64), rtol=1e-6, hermitian=True)
            w = w0 + w0 @ (s["ab"] - s["bb"]) @ inv
            ref = float(((w0 @ s["aa"]) * w0).sum()) or 1.0
            report.append({"before": _error(w0, w0, s) / ref, "after": _error(w0, w, s) / ref})
            a.o_proj.weight.copy_(w.to(a.o_proj.weight.dtype))
    return report


def _error(w0: torch.Tensor, w: torch.Tensor, s: dict) -> float:
    """``|W_o A - W A'|^2`` from the Gram matrices ``s`` (``aa = A^T A``, ``ab = A^T A'``, ``bb = A'^T A'``)."""
    return float(((w0 @ s["aa"]) * w0).sum() - 2 * ((w0 @ s["ab"]) * w).sum() + ((w @ s["bb"]) * w).sum())
