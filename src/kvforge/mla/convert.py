"""Post-hoc conversion of a model's attention to latent (MLA-style) attention.

Initialisation is activation-aware: for each layer the covariance ``C`` of the true input of ``k_proj`` and
``v_proj`` (the normalised hidden state, captured by hooks on calibration text:
:mod:`kvforge.mla.calibration`) whitens the weights,
``W' = U_r U_r^T W`` with ``U`` the left singular vectors of ``W L`` (``C = L L^T``). The down-projection
is ``U_r^T W`` and the up-projection ``U_r`` (orthonormal columns). Ranks are allocated over layers (and
between keys and values) under one budget by the retained energy of each matrix's normalised spectrum.
``whiten=False`` gives plain weight SVD.

Output-aware weighting also weighs the rows of ``W`` by what their errors cost and factors ``L W C^(1/2)``
instead; ``W' = L^-1 U_r U_r^T L W``, written with an orthonormal up-projection by one QR. Two weights:
``output_aware=True`` (:func:`output_weights`: key dims by the calibrated query energy, values through
``o_proj``) and ``output_aware="fisher"`` (``L = G^(1/2)``, ``G`` the second moment of the loss gradient at
the keys and values, :func:`kvforge.mla.calibration.fisher`: the output side of a Kronecker-factored
Fisher, so ``|L dW C^(1/2)|^2`` approximates the KL a weight error costs; Fisher-weighted SVD, Hsu et al.
2022). **Bias correction** (as in data-free quantization, Nagel et al. 2019) whitens with the input's
covariance instead of its second moment and adds the mean error ``(W - W') E[x]`` as a bias after the
up-projection, so no latent dimension is spent on the input's mean.

**Output correction** (:mod:`kvforge.mla.correction`) then refits each layer's ``o_proj`` by least squares
so that it maps the latent attention's output onto the original attention's on the same inputs.

Defaults up to 2.5x (``None``): Fisher weighting (damped by half the query/o_proj weights), bias
correction, the same rank in every layer and the local output correction; beyond 2.5x: plain whitening,
no bias correction, ranks allocated by the spectra (output-aware weighting was worse there). Chosen for ``joint`` at 2x on the
calibration parts of kjv and fortunes (``benchmarks/mla_defaults.py``); ``separate`` and
``decoupled_rope`` get the same defaults, not measured separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .._compat import one_thread
from .attention import LatentAttention, attention_modules
from .calibration import calibrate, fisher
from .correction import correct_outputs
from .methods import REGISTRY, get_method
from .weights import _fisher_weights, _left_weights, _sqrtm, output_weights, whitened_basis  # noqa: F401


@dataclass
class MLAConfig:
    """What a conversion did; stored with a saved model (``kvforge_mla.json``)."""

    method: str
    ranks: list[dict[str, int]]  # per layer: {"k", "v"} (separate) or {"kv"}
    kept_pairs: list[list[list[int]]] | None = None  # decoupled_rope: per layer, per KV head
    ratio: float | None = None
    base_fingerprint: str = ""
    base_model: str = ""
    whiten: bool = True
    output_aware: bool | str = False  # True (query energy and o_proj), "fisher" or False
    key_weight: float = 1.0
    bias_correction: bool = False
    allocation: str = "spectrum"
    fisher_damping: float = 0.0  # with output_aware="fisher": the weight of the query/o_proj term
    refine: int = 0  # calibration passes over the converted model after the first
    output_correction: bool | str = False  # o_proj refitted by least squares: False, "local" or "global"
    correction_damping: float = 0.0  # with output_correction: the ridge towards the original o_proj
    calibration_tokens: int = 0
    retained_energy: list[dict[str, float]] = field(default_factory=list)
    finetune: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def allocate(spectra: list[torch.Tensor], budget: int, floor: int = 4, step: int = 1) -> list[int]:
    """Ranks for matrices with singular values ``spectra`` summing to at most ``budget``: greedily the next
    ``step`` singular directions with the largest share of their own matrix's energy (normalised spectra;
    raw energies would starve small-norm matrices such as layer 0's values). Every rank is a multiple of
    ``step`` (or the matrix's full rank), which bit-packed quantized latents need."""
    caps = [len(s) for s in spectra]
    if budget >= sum(caps):
        return caps
    floor = -(-floor // step) * step
    ranks = [min(floor, c) for c in caps]
    if sum(ranks) > budget:
        raise ValueError(f"a budget of {budget} latent dims is below the floor of {floor} per matrix")
    shares = [(s.detach().double() ** 2) / (s.detach().double() ** 2).sum() for s in spectra]
    import heapq

    def gain(m: int) -> float:
        return -float(shares[m][ranks[m]:ranks[m] + step].sum())

    heap = [(gain(m), m) for m in range(len(spectra)) if ranks[m] < caps[m]]
    heapq.heapify(heap)
    left = budget - sum(ranks)
    while heap:
        _, m = heapq.heappop(heap)
        add = min(step, caps[m] - ranks[m])
        if add > left:
            continue
        ranks[m] += add
        left -= add
        if ranks[m] < caps[m]:
            heapq.heappush(heap, (gain(m), m))
    return ranks


def conversion_defaults(ratio: float, whiten: bool = True) -> dict:
    """What :func:`convert` picks for ``output_aware``, ``bias_correction``, ``allocation``,
    ``fisher_damping``, ``refine``, ``output_correction`` and ``correction_damping`` at ``ratio`` (original
    KV bytes over the latent's): Fisher weights damped by half the query/o_proj ones, bias correction,
    uniform ranks and the local o_proj refit (damped by the mean eigenvalue) up to 2.5x; plain whitening
    and ranks by the spectra beyond (measured: module doc).
    At ``ratio <= 1`` (full rank: nothing is truncated, so no weighting or correction changes the result)
    none of the calibration passes beyond the statistics are run."""
    light = 1 < ratio <= 2.5
    return {"output_aware": "fisher" if whiten and light else False, "bias_correction": whiten and light,
            "allocation": "uniform" if ratio <= 2.5 else "spectrum", "fisher_damping": 0.5, "refine": 0,
            "output_correction": "local" if whiten and light else False, "correction_damping": 1.0}


def _energy(s: torch.Tensor, r: int) -> float:
    e = s.double() ** 2
    return float(e[:r].sum() / e.sum()) if e.sum() > 0 else 1.0


@torch.no_grad()
def convert(model, tokenizer=None, ratio: float | None = None, rank: int | None = None, method: str = "joint",
            calibration: list[str] | None = None, whiten: bool = True, rope_pairs: int | None = None,
            max_calibration_tokens: int = 512, name: str = "", output_aware: bool | str | None = None,
            key_weight: float = 1.0, rank_multiple: int = 1, bias_correction: bool | None = None,
            allocation: str | None = None, fisher_samples: int = 2, fisher_damping: float | None = None,
            refine: int | None = None, output_correction: bool | str | None = None,
            correction_damping: float | None = None) -> MLAConfig:
    """Convert ``model`` in place so that its cache holds latents; returns what was done.

    ``ratio``: KV bytes of the original over the converted cache (2 = half), the latent dims allocated over
    layers from the calibrated spectra; or ``rank``: the same latent dims in every layer (per matrix for
    ``separate``). ``calibration``: texts whose k_proj inputs whiten the SVD (required unless
    ``whiten=False``; never the evaluation text). ``rope_pairs`` (decoupled_rope): rotary frequency pairs
    kept per KV head, chosen by measured contribution (default: a quarter of the head's pairs, at most half
    of the layer's byte budget; dropping the rotation of many pairs costs a RoPE model dearly untrained).
    ``output_aware``: weigh key and value errors by their effect on the output (see the module doc):
    ``"fisher"`` (one backward pass per calibration text and each of ``fisher_samples`` sampled labels),
    ``True`` (query energy and ``o_proj``; ``key_weight`` scales the keys' block against the values' in a
    joint latent) or ``False``. ``fisher_damping``: the Fisher matrix plus this much of the query/o_proj
    weights, each at unit trace (0: Fisher alone). ``bias_correction``: centre the whitening and add the
    mean error back as a bias. ``allocation``: ``"uniform"`` (the same latent width in every layer) or
    ``"spectrum"`` (over layers and between keys and values by the normalised spectra). ``refine``: after
    converting, read the calibration statistics again on the converted model (each layer then sees the
    inputs its converted predecessors give it) and factor every layer again from its original weights,
    this many times; the ranks stay. ``output_correction``: last, refit every layer's ``o_proj`` by least
    squares so that it maps the latent attention's output onto the original attention's on the same
    calibration inputs (``"local"`` or ``True``), or onto the unconverted model's own attention outputs
    (``"global"``) (:mod:`kvforge.mla.correction`; one more forward pass), shrunk towards the original
    weight by ``correction_damping`` (a share of the mean eigenvalue of the latent outputs' Gram matrix).
    ``rank_multiple``: every latent width a multiple of this (8 lets any bit width of :mod:`kvforge.quant`
    pack the latents).

    ``None`` picks each by the ratio (:func:`conversion_defaults`). Measured on SmolLM2 at 2x (joint),
    worst change over the calibration parts of kjv and fortunes: +14.3% with the previous defaults
    (query/o_proj weights, spectrum allocation), +9.5% with bias correction and uniform ranks, +7.8% with
    Fisher weights instead, +6.7% with Fisher damped by 0.5 (0.2: +7.2%, 1.0: +7.2%); one ``refine`` pass
    gained 0.24 points there but lost 0.18 on the evaluation texts' worst case, so it is off; the local
    output correction kept the worst case (+6.73%) and lowered the mean (+5.58% -> +5.05%), the global one
    raised the worst to +10.9%; its damping 1.0 gave +6.23% (0.001: +6.90%, 0.01: +6.73%, 0.1: +6.41%,
    0.3: +6.30%). Beyond 2.5x output-aware weighting raised perplexity (4x: 23.9 against 22.5, 8x: 75.6 against 51.5).
    Raises ``ValueError`` for a bad ratio, rank, option or missing calibration.
    """
    from ..models import fingerprint, text_config

    impl = get_method(method)  # "unknown MLA method" for a name not in REGISTRY
    if rank_multiple < 1:
        raise ValueError(f"rank_multiple must be >= 1, got {rank_multiple}")
    if (ratio is None) == (rank is None):
        raise ValueError("give exactly one of ratio= or rank=")
    if ratio is not None and ratio < 1:
        raise ValueError(f"ratio must be >= 1 (the original cache's bytes over the latent cache's), got {ratio}")
    if getattr(model, "kvforge_mla", None) is not None:
        raise ValueError("this model is already converted to latent attention")
    attns = attention_modules(model)
    if any(not hasattr(a, "k_proj") or not hasattr(a, "v_proj") for a in attns):
        raise ValueError(f"{type(model).__name__}: attention without k_proj/v_proj is not supported")
    h, d = text_config(model).num_key_value_heads, attns[0].head_dim
    auto = conversion_defaults(ratio if ratio is not None else 2 * h * d / (len(impl.factors) * rank), whiten)
    output_aware = auto["output_aware"] if output_aware is None else output_aware
    bias_correction = auto["bias_correction"] if bias_correction is None else bias_correction
    allocation = auto["allocation"] if allocation is None else allocation
    fisher_damping = auto["fisher_damping"] if fisher_damping is None else fisher_damping
    refine = auto["refine"] if refine is None else refine
    output_correction = auto["output_correction"] if output_correction is None else output_correction
    correction_damping = auto["correction_damping"] if correction_damping is None else correction_damping
    if output_correction not in (True, False, "local", "global"):
        raise ValueError(f"output_correction must be True, False, 'local' or 'global', got {output_correction!r}")
    if output_correction is True:
        output_correction = "local"
    if not correction_damping >= 0:
        raise ValueError(f"correction_damping must be >= 0, got {correction_damping}")
    if output_correction and not whiten:
        raise ValueError("the output correction reads calibration text; use it with whiten=True")
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine must be an int >= 0, got {refine!r}")
    if refine and not whiten:
        raise ValueError("refine re-reads calibration statistics; use it with whiten=True")
    if output_aware not in (True, False, "fisher"):
        raise ValueError(f"output_aware must be True, False or 'fisher', got {output_aware!r}")
    if not fisher_damping >= 0:
        raise ValueError(f"fisher_damping must be >= 0, got {fisher_damping}")
    if fisher_samples < 1:
        raise ValueError(f"fisher_samples must be >= 1, got {fisher_samples}")
    if allocation not in ("uniform", "spectrum"):
        raise ValueError(f"unknown rank allocation {allocation!r}; choose 'uniform' or 'spectrum'")
    if (output_aware or bias_correction) and not whiten:
        raise ValueError("output-aware weighting and bias correction need calibration statistics; "
                         "use them with whiten=True")
    need_cal = whiten or impl.rope_stats
    if need_cal and not calibration:
        raise ValueError("calibration texts are required (whitening and rotary-pair selection); pass "
                         "calibration=[...] or whiten=False with a method that selects no rotary pairs "
                         f"({', '.join(n for n, c in REGISTRY.items() if not c.rope_stats)})")
    if need_cal and tokenizer is None:
        raise ValueError("calibration needs the tokenizer")
    base_fp = fingerprint(model)

    def statistics(rope_stats: bool = False) -> dict:  # of the model as it is now (converted, when refining)
        st = calibrate(model, tokenizer, calibration, max_calibration_tokens, rope_stats=rope_stats)
        if bias_correction:  # whiten by the covariance; the mean is restored by a bias
            st["cov"] = [c - torch.outer(m, m) for c, m in zip(st["cov"], st["mean"])]
        return st

    stats = statistics(impl.rope_stats) if need_cal else {"cov": [None] * len(attns), "tokens": 0}
    grads = fisher(model, tokenizer, calibration, max_calibration_tokens, fisher_samples) \
        if output_aware == "fisher" else None

    # the matrices to factor, per layer (and the rotary pairs kept uncompressed, by methods that keep some)
    kept_all = [impl.select_kept(a, i, stats, ratio, rope_pairs) for i, a in enumerate(attns)]
    mats = [impl.matrices(a, kept) for a, kept in zip(attns, kept_all)]

    def factorise(st):  # the left weights and the whitened bases of every matrix, from statistics st
        with one_thread():  # small dense factorisations: threads only add contention (28 s vs 0.3 s seen)
            lefts = [_left_weights(a, st, i, method, impl.key_rows(a, kept_all[i]), key_weight)
                     if output_aware and (grads is None or fisher_damping) else {} for i, a in enumerate(attns)]
            if grads is not None:  # Fisher weights, damped towards the query/o_proj ones
                lefts = [_fisher_weights(a, grads[i], method, impl.key_rows(a, kept_all[i]), lefts[i],
                                         fisher_damping) for i, a in enumerate(attns)]
            return lefts, [{k: whitened_basis(lefts[i][k] @ w.double() if k in lefts[i] else w, st["cov"][i])
                            for k, w in m.items()} for i, m in enumerate(mats)]

    lefts, bases = factorise(stats)
    spectra = [bases[i][k][1] for i, m in enumerate(mats) for k in m]
    if rank is not None:
        flat = [min(rank // rank_multiple * rank_multiple or rank_multiple, len(s)) for s in spectra]
    else:
        full = 2 * h * d * len(attns)
        overhead = sum(impl.extra_cache(a, k) for k, a in zip(kept_all, attns))
        budget = int(round(full / ratio)) - overhead
        if budget < len(spectra):
            raise ValueError(f"ratio {ratio} leaves {budget} latent dims for {len(spectra)} matrices "
                             "(the kept rotary dims alone take more); lower the ratio or rope_pairs")
        if allocation == "uniform":  # an even share, whole multiples, never above a matrix's rank
            flat = [min(budget // len(spectra) // rank_multiple * rank_multiple or rank_multiple, len(s))
                    for s in spectra]
        else:
            flat = allocate(spectra, budget, floor=min(max(4, rank_multiple), budget // len(spectra)),
                            step=rank_multiple)
    ranks, it = [], iter(flat)
    for m in mats:
        ranks.append({k: next(it) for k in m})
    kept_pairs = None if kept_all[0] is None else [k.tolist() for k in kept_all]
    cfg = MLAConfig(method, ranks, kept_pairs, ratio, base_fp, name or getattr(model, "kvforge_name", ""),
                    whiten, output_aware, key_weight, bias_correction=bias_correction, allocation=allocation,
                    fisher_damping=fisher_damping if output_aware == "fisher" else 0.0, refine=refine,
                    output_correction=output_correction,
                    correction_damping=correction_damping if output_correction else 0.0,
                    calibration_tokens=stats["tokens"])
    new_attns = install(model, cfg)
    cfg.retained_energy = _load_factors(attns, new_attns, impl, mats, lefts, bases, ranks, stats, bias_correction)
    for _ in range(refine):  # the statistics again, as the converted model sees them; the same ranks
        stats = statistics()
        lefts, bases = factorise(stats)
        cfg.retained_energy = _load_factors(attns, new_attns, impl, mats, lefts, bases, ranks, stats,
                                            bias_correction)
    if output_correction:  # last: it fits o_proj to the final factors
        correct_outputs(model, attns, tokenizer, calibration, max_calibration_tokens, correction_damping,
                        target=output_correction)
    model.config.kvforge_mla = cfg.to_dict()
    return cfg


@torch.no_grad()
def _load_factors(attns, new_attns, impl, mats, lefts, bases, ranks, stats, bias_correction) -> list[dict]:
    """Write each layer's truncated factors (and bias corrections) into its latent module; returns the
    retained energy per layer and matrix."""
    energy = []
    with one_thread():
        for i, (a, new) in enumerate(zip(attns, new_attns)):
            e, factors, shifts = {}, {}, {}
            for k, w in mats[i].items():
                u = bases[i][k][0][:, : ranks[i][k]]  # [out, r]
                if k in lefts[i]:  # W' = L^-1 U U^T L W, re-based (QR) so that the up-projection stays orthonormal
                    left = lefts[i][k]
                    down = u.T @ left @ w.double()
                    u, tri = torch.linalg.qr(torch.linalg.solve(left, u))
                    down = tri @ down
                else:
                    down = u.T @ w.double()
                factors[k] = (down.to(w.dtype), u.to(w.dtype))
                e[k] = _energy(bases[i][k][1], ranks[i][k])
                if bias_correction:
                    shifts[k] = (w.double() - u @ down) @ stats["mean"][i]  # the mean error, one per output row
            for bias in (new.k_bias, new.v_bias):
                if bias is not None:
                    bias.zero_()
            impl.load(new, a, factors)  # the factors, the kept rotary rows and the original biases
            for k, shift in shifts.items():  # rows: keys ("k"), values ("v") or keys over values ("kv")
                if k in ("k", "kv"):
                    new.k_bias.add_(shift[: new.n_k].to(new.k_bias.dtype))
                if k in ("v", "kv"):
                    new.v_bias.add_(shift[-new.v_bias.shape[0]:].to(new.v_bias.dtype))
            energy.append(e)
    return energy


def install(model, cfg: MLAConfig) -> list[LatentAttention]:
    """Replace every attention module of ``model`` by an (uninitialised) :class:`LatentAttention` of the
    shapes ``cfg`` records; used by :func:`convert` and to load a saved converted model."""
    from ..models import layer_types

    attns = attention_modules(model)
    if len(cfg.ranks) != len(attns):
        raise ValueError(f"the MLA config has {len(cfg.ranks)} layers, the model {len(attns)}")
    types = layer_types(model)
    rotary = getattr(model, "model", model).rotary_emb
    out = []
    for i, a in enumerate(attns):
        kept = torch.tensor(cfg.kept_pairs[i]) if cfg.kept_pairs is not None else None
        new = LatentAttention(a, cfg.method, cfg.ranks[i], rotary, types[i], kept,
                              bias=cfg.bias_correction).to(a.q_proj.weight.device)
        model.model.layers[i].self_attn = new
        out.append(new)
    model.kvforge_mla = cfg
    model.__dict__.pop("_kvforge_fingerprint", None)
    return out


def kv_bytes_per_token(model, dtype_bytes: int = 2) -> int:
    """Bytes the cache holds per token, all layers, at ``dtype_bytes`` per number (2: fp16/bf16)."""
    total = 0
    for a in attention_modules(model):
        if isinstance(a, LatentAttention):
            total += a.cache_dims()
        else:
            total += 2 * a.k_proj.out_features
    return total * dtype_bytes


def compression(model) -> float:
    """Original KV bytes over this model's (1.0 for an unconverted model)."""
    full = sum(2 * (a.k_proj.out_features if hasattr(a, "k_proj") else a.num_kv_heads * a.head_dim)
               for a in attention_modules(model))
    return full * 2 / kv_bytes_per_token(model)

