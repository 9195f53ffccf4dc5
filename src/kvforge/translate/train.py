"""Training a translator with both models frozen.

``replace``: KL distillation. The target's next-token distribution on a continuation, given the translated
cache as its whole past, is pulled towards its distribution given its own prefill of the context (the
teacher). The teacher is summarised by its top-k probabilities plus one bucket for the rest of the
vocabulary, so the loss is an exact KL between those coarsened distributions.

``fuse`` (Cache-to-Cache): the target prefills the context itself and the translated cache is mixed into
its own by a learned gate; trained by next-token loss on the true continuation (as C2C does), optionally
mixed with the KL to the target's own distribution.

Examples are general text (pieces of the calibration split) and, with ``fact_examples``, passages with
planted invented facts (``.facts``) whose continuations ask about them: the loss on the answer tokens is
weighted by ``answer_weight``, so the translation has to carry names and numbers, not only the topic.
Validation holds out both kinds: eval-split text and fact passages from another seed. Checkpoints hold the
translator and the optimizer, and training resumes from them exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..state import KVState
from .data import Example, examples, fact_examples
from .evaluate import continuation_logits
from .modes import TranslationMode, get_mode
from .translator import Inputs, Translator


@dataclass
class TrainConfig:
    mode: str = "replace"  # a registered TranslationMode's name; its defaults fill steps, lr and ce_weight
    steps: int | None = None  # default: 400 replace, 150 fuse
    lr: float | None = None  # the maps (they start from the ridge fit); default: 1e-4 replace, 3e-5 fuse
    gate_lr: float = 1e-2  # fuse mode's gate logits
    batch: int = 2  # examples per optimizer step
    context_chars: int = 1000
    continuation_tokens: int = 32
    top_k: int = 128
    temperature: float = 1.0
    ce_weight: float | None = None  # weight of next-token loss (1 - it on KL); default: 0 replace, 1 fuse
    kv_weight: float = 0.0  # optional regression of translated onto own keys/values (replace)
    train_examples: int = 96  # general pieces; the pydoc calibration part holds 108 of 1000 characters every 500
    val_examples: int = 12
    fact_examples: int = 128  # passages with planted facts (.facts) besides the general ones
    fact_val_examples: int = 12
    answer_weight: float = 4.0  # weight of an answer token's loss in a fact passage (others: 1)
    own_prefix: float = 0.0  # share of few-shot fact passages whose opening is the target's own (replace mode)
    recompute: float = 0.0  # in half the examples the target re-reads this share of the context (by sentence)
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_best: bool = True  # end with the weights of the best validation point (KL replace, PPL fuse)
    seed: int = 0

    def __post_init__(self):
        mode = self.translation_mode
        if self.steps is None:
            self.steps = mode.steps
        if self.lr is None:
            self.lr = mode.lr
        if self.ce_weight is None:
            self.ce_weight = mode.ce_weight
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight}")
        for name in ("steps", "batch", "continuation_tokens", "top_k", "train_examples", "val_examples",
                     "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fact_examples < 0 or self.fact_val_examples < 0 or self.answer_weight <= 0:
            raise ValueError("fact_examples and fact_val_examples must be >= 0 and answer_weight > 0")
        if not 0.0 <= self.own_prefix <= 1.0:
            raise ValueError(f"own_prefix is a share of the fact passages, 0 to 1; got {self.own_prefix}")
        if not 0.0 <= self.recompute < 1.0:
            raise ValueError(f"recompute is a share of the context's tokens, 0 to below 1; got {self.recompute}")
        if (self.own_prefix or self.recompute) and self.translation_mode.needs_own:
            raise ValueError(f"own_prefix and recompute train a replace-mode translation; a {self.mode} translator "
                             "has the target's own state of the whole context")

    @property
    def translation_mode(self) -> TranslationMode:
        """The :class:`~kvforge.translate.modes.TranslationMode` named by ``mode``."""
        return get_mode(self.mode)


@dataclass
class Prepared:
    inputs: Inputs  # the translator's inputs (float16: halves what a set of examples holds)
    own: KVState  # the target's own state of the context minus its last token
    last: torch.Tensor
    cont: torch.Tensor
    top_idx: torch.Tensor  # [K, top_k] the teacher's most likely next tokens
    top_logp: torch.Tensor  # [K, top_k] their log-probabilities
    tail_logp: torch.Tensor  # [K] log of the rest of the teacher's probability
    weights: torch.Tensor  # [K] loss weight per continuation token
    kind: str = "text"
    prefix: int = 0  # the context's first tokens kept as the target's own (an own prefix), not translated
    redo: torch.Tensor | None = None  # positions the target re-reads over the translation (sorted)


@dataclass
class TrainReport:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # validation points
    baseline: dict = field(default_factory=dict)  # PPL own / none / before training


@torch.no_grad()
def prepare(tr: Translator, ex: Example, source_model, target_model, source_tokenizer, target_tokenizer,
            top_k: int, temperature: float, recompute: float = 0.0) -> Prepared:
    """Everything a step needs that does not depend on the translator's weights: the source's aligned
    features, the target's own state, the teacher's top-k next-token distribution and, with ``recompute``,
    the tokens the target re-reads (``select="sentence"``: the layer-0 trust probe takes no gradient, so
    the choice is fixed)."""
    from .align import prefix_tokens
    from .evaluate import prefill_state
    from .recompute import by_sentence, choose, sentence_ids

    s_ids = source_tokenizer(ex.context, return_tensors="pt").input_ids[0]
    t_ids = target_tokenizer(ex.context, return_tensors="pt").input_ids[0]
    inputs = tr.prepare(prefill_state(source_model, s_ids), ex.context, source_model, target_model,
                        source_tokenizer, target_tokenizer)
    prefix = prefix_tokens(target_tokenizer, ex.context, ex.own_prefix_chars) if ex.own_prefix_chars else 0
    redo = None
    if recompute:
        scores = by_sentence(tr.trust_scores(inputs), sentence_ids(target_tokenizer, ex.context))
        redo = choose(inputs.a.index, recompute, "sentence", scores, start=prefix)
        redo = redo[redo < len(t_ids) - 1]  # the last token is the continuation's first input, read anyway
    inputs = inputs.to(torch.float16)  # plain tensors, not inference
    own = _plain(prefill_state(target_model, t_ids[:-1]))
    logits = continuation_logits(target_model, own, t_ids[-1], ex.continuation, check=False)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    top_logp, top_idx = logp.topk(min(top_k, logp.shape[-1]), -1)
    tail = torch.log1p(-top_logp.exp().sum(-1).clamp(max=1 - 1e-6))
    weights = torch.ones(len(ex.continuation)) if ex.weights is None else ex.weights
    return Prepared(inputs, own, t_ids[-1], ex.continuation, top_idx.cpu(), top_logp.cpu(), tail.cpu(), weights,
                    ex.kind, min(prefix, own.num_tokens), redo)


def _plain(state: KVState) -> KVState:
    """``state`` with its tensors copied out of inference mode (so autograd may use them)."""
    from ..state import LayerState

    layers = [LayerState(la.kind, {n: t.clone() for n, t in la.tensors.items()}, la.length) for la in state.layers]
    return KVState(layers, state.token_ids, state.positions, list(state.layer_types), state.fingerprint,
                   model_name=state.model_name, sliding_window=state.sliding_window,
                   num_model_layers=state.num_model_layers, meta=dict(state.meta))


def student_state(tr: Translator, p: Prepared, target_model) -> KVState:
    """The past the target continues from: the translation (replace) or its fusion into the target's own
    state (fuse), minus the context's last token; the first ``p.prefix`` tokens are the target's own and the
    tokens at ``p.redo`` re-read by the target, as :meth:`Translator.translate` does with ``own_prefix`` and
    ``recompute`` (the gradient flows through the re-read into the translated tokens it attends to)."""
    from .recompute import recompute, splice_prefix

    state = tr.build_state(tr.project(p.inputs.to(torch.float32)), p.inputs.a, target_model)[: p.own.num_tokens]
    if p.prefix:
        state = splice_prefix(state, p.own[: p.prefix])
    if p.redo is not None and len(p.redo):
        state = recompute(target_model, state, p.redo, grad=True)
    return tr.mode.combine(tr, p.own, state)


def losses(tr: Translator, p: Prepared, target_model, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """``kl`` (to the teacher's coarsened distribution), ``ce`` (next-token), ``kv`` (regression) and their
    weighted ``loss``."""
    state = student_state(tr, p, target_model)
    logits = continuation_logits(target_model, state, p.last, p.cont, check=False).float()
    logq = torch.log_softmax(logits / cfg.temperature, -1)
    top_q = logq.gather(1, p.top_idx.to(logq.device))
    tail_q = torch.log1p(-top_q.exp().sum(-1).clamp(max=1 - 1e-6))
    p_top, p_tail = p.top_logp.exp().to(logq.device), p.tail_logp.exp().to(logq.device)
    kl = ((p_top * (p.top_logp.to(logq.device) - top_q)).sum(-1) + p_tail * (p.tail_logp.to(logq.device) - tail_q))
    w = p.weights.to(kl.device)
    kl = (kl * w).sum() / w.sum() * cfg.temperature ** 2
    ce_all = F.cross_entropy(logits, p.cont.to(logits.device), reduction="none")
    ce = (ce_all * w).sum() / w.sum()
    out = {"kl": kl, "ce": ce, "loss": (1 - cfg.ce_weight) * kl + cfg.ce_weight * ce, "nll": ce_all.detach()}
    answer = w > 1
    if answer.any():  # answer tokens the student gets right (greedy), as a share
        out["answer_hits"] = (logits.argmax(-1) == p.cont.to(logits.device))[answer].float().sum().detach()
        out["answer_tokens"] = answer.sum()
    if cfg.kv_weight and tr.mode.kv_regression:
        kv = sum(F.mse_loss(s.to_dense().tensors[n].float(), o.to_dense().tensors[n][:, :, -s.length:].float())
                 for s, o in zip(state.layers, p.own.layers) for n in ("keys", "values")) / (2 * len(state.layers))
        out["kv"] = kv
        out["loss"] = out["loss"] + cfg.kv_weight * kv
    return out


@torch.no_grad()
def validate(tr: Translator, val: list[Prepared], target_model, cfg: TrainConfig) -> dict[str, float]:
    """Mean KL to the teacher and the target's perplexity on the continuations, over all validation examples
    and per kind (``kl_text``, ``ppl_facts``, ...), and the share of answer tokens the target gets right
    greedily (``answer_acc``, fact passages)."""
    sums: dict[str, list[float]] = {}
    hits = answers = 0.0
    for p in val:
        d = losses(tr, p, target_model, cfg)
        for key in ("all", p.kind):
            s = sums.setdefault(key, [0.0, 0.0, 0, 0])
            s[0] += d["kl"].item()
            s[1] += d["nll"].sum().item()
            s[2] += len(p.cont)
            s[3] += 1
        if "answer_hits" in d:
            hits += d["answer_hits"].item()
            answers += d["answer_tokens"].item()
    out = {"kl": sums["all"][0] / sums["all"][3], "ppl": math.exp(sums["all"][1] / sums["all"][2])}
    for kind, s in sums.items():
        if kind != "all":
            out[f"kl_{kind}"], out[f"ppl_{kind}"] = s[0] / s[3], math.exp(s[1] / s[2])
    if answers:
        out["answer_acc"] = hits / answers
    return out


@torch.no_grad()
def baselines(val: list[Prepared], target_model, bos: torch.Tensor) -> dict[str, float]:
    """The target's perplexity on the validation continuations with its own prefill and with no context."""
    from .evaluate import prefill_state

    out = {}
    for name in ("own", "none"):
        nll = n = 0
        for p in (q for q in val if q.kind == "text"):
            st = p.own if name == "own" else (prefill_state(target_model, bos) if len(bos) else None)
            logits = continuation_logits(target_model, st, p.last, p.cont, check=False).float()
            nll += F.cross_entropy(logits, p.cont.to(logits.device), reduction="sum").item()
            n += len(p.cont)
        out[name] = math.exp(nll / n)
    return out


def describe(v: dict) -> str:
    """One validation point as a log line."""
    out = f"val KL {v['kl']:.4f}, PPL {v.get('ppl_text', v['ppl']):.3f}, gap recovered {100 * v['gap_recovered']:.1f}%"
    if "kl_facts" in v:
        out += f"; facts KL {v['kl_facts']:.4f}, answer tokens right {100 * v.get('answer_acc', 0):.0f}%"
    return out


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(tr: Translator, source_model, target_model, source_tokenizer, target_tokenizer, cfg: TrainConfig,
          train_text: str, val_text: str, checkpoint_dir: str | Path | None = None, resume: bool = True,
          show_progress: bool = True, log=print) -> TrainReport:
    """Train ``tr`` in place (both models frozen) and return the validation history.

    ``tr`` must be in ``cfg.mode`` (start it from :func:`~kvforge.translate.fit`, and for ``fuse`` convert
    it with :func:`with_mode`). With ``checkpoint_dir``, the translator and optimizer are saved every
    ``cfg.checkpoint_every`` steps and training resumes from the last checkpoint there.
    """
    from ..progress import progress

    if tr.config.mode != cfg.mode:
        raise ValueError(f"the translator is in {tr.config.mode!r} mode, training asks for {cfg.mode!r} "
                         "(convert it with kvforge.translate.with_mode)")
    for m in (source_model, target_model):
        m.eval()
        m.requires_grad_(False)
    tr.check_pair(source_model, target_model)
    device = next(target_model.parameters()).device
    tr.to(device)
    gates = [getattr(tr, name) for name in tr.mode.extra_parameter_names]  # e.g. fuse mode's gate, at gate_lr
    maps = [p for n, p in tr.named_parameters() if n.startswith("maps.")]
    opt = torch.optim.Adam([{"params": maps, "lr": cfg.lr}] + ([{"params": gates, "lr": cfg.gate_lr}] if gates else []))
    step, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and resume and (ckpt / "train_state.pt").exists():
        saved = torch.load(ckpt / "train_state.pt", map_location=device, weights_only=False)
        if saved["train_config"] != asdict(cfg) | {"steps": saved["train_config"]["steps"]}:
            raise ValueError(f"{ckpt} holds a checkpoint of different training settings: {saved['train_config']}; "
                             "use another --checkpoint-dir or the same settings")
        tr.load_state_dict(saved["translator"])
        opt.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
        log(f"resumed from {ckpt} at step {step}")

    t0 = time.perf_counter()
    ex_train = examples(train_text, cfg.train_examples, cfg.context_chars, cfg.continuation_tokens, target_tokenizer,
                        stride=cfg.context_chars // 2)  # overlapping contexts: more examples from the split
    ex_val = examples(val_text, cfg.val_examples, cfg.context_chars, cfg.continuation_tokens, target_tokenizer)
    if cfg.fact_examples:  # seeds apart from each other and from fit's (FIT_FACT_SEED)
        ex_train += fact_examples(cfg.fact_examples, 1000 + cfg.seed, target_tokenizer, cfg.answer_weight,
                                  cfg.own_prefix)
    if cfg.fact_val_examples and cfg.fact_examples:
        ex_val += fact_examples(cfg.fact_val_examples, 2000 + cfg.seed, target_tokenizer, cfg.answer_weight,
                                cfg.own_prefix)
    args = (source_model, target_model, source_tokenizer, target_tokenizer, cfg.top_k, cfg.temperature)
    redo = random.Random(cfg.seed)  # which half of the examples re-read (drawn per example, in order)
    val = [prepare(tr, e, *args, recompute=cfg.recompute * (redo.random() < 0.5))
           for e in progress(ex_val, desc="prepare validation", disable=not show_progress)]
    data = [prepare(tr, e, *args, recompute=cfg.recompute * (redo.random() < 0.5))
            for e in progress(ex_train, desc="prepare training", disable=not show_progress)]
    bos = target_tokenizer("", return_tensors="pt").input_ids[0]
    base = baselines(val, target_model, bos)

    metric = tr.mode.metric
    best = {"value": min((h[metric] for h in history), default=float("inf")), "state": None}

    def record(at: int) -> dict:
        v = validate(tr, val, target_model, cfg)
        v["gap_recovered"] = (base["none"] - v.get("ppl_text", v["ppl"])) / (base["none"] - base["own"])
        v["step"] = at
        history.append(v)
        if v[metric] <= best["value"]:
            best["value"], best["state"] = v[metric], {k: t.detach().clone() for k, t in tr.state_dict().items()}
            best["step"] = at
            if ckpt:
                ckpt.mkdir(parents=True, exist_ok=True)
                tr.save(ckpt / "best.safetensors")
        return v

    if not history:
        v = record(0)
        log(f"step 0: {describe(v)} (text PPL own {base['own']:.3f}, none {base['none']:.3f})")
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(step):  # the same example order after a resume
        torch.randint(len(data), (cfg.batch,), generator=gen)
    bar = progress(total=cfg.steps, initial=step, desc=f"train {cfg.mode}", disable=not show_progress)
    while step < cfg.steps:
        tr.train()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in torch.randint(len(data), (cfg.batch,), generator=gen).tolist():
            d = losses(tr, data[i], target_model, cfg)
            (d["loss"] / cfg.batch).backward()
            total += d["loss"].item() / cfg.batch
        opt.step()
        step += 1
        tr.config.trained_steps = step
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            tr.eval()
            v = record(step)
            log(f"step {step}: train loss {total:.4f}, {describe(v)}")
        if ckpt and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            ckpt.mkdir(parents=True, exist_ok=True)
            _atomic_save({"translator": tr.state_dict(), "optimizer": opt.state_dict(), "step": step,
                          "history": history, "train_config": asdict(cfg)}, ckpt / "train_state.pt")
            tr.save(ckpt / "translator.safetensors")
            (ckpt / "history.json").write_text(json.dumps({"baseline": base, "history": history}, indent=1))
    bar.close()
    tr.eval()
    if cfg.keep_best:
        if best["state"] is not None:
            tr.load_state_dict(best["state"])
            tr.config.trained_steps = best["step"]
            log(f"kept the best validation point: step {best['step']} ({metric} {best['value']:.4f})")
        elif ckpt and (ckpt / "best.safetensors").exists():  # resumed past the best point
            tr.load_state_dict(Translator.load(ckpt / "best.safetensors").state_dict())
            log(f"kept the best validation point saved in {ckpt / 'best.safetensors'}")
    return TrainReport(step, time.perf_counter() - t0, history, base)


def with_mode(tr: Translator, mode: str | TranslationMode) -> Translator:
    """A copy of ``tr`` in ``mode`` (its maps kept; the new mode's own parameters start afresh, e.g. a fuse gate
    near "target alone")."""
    from copy import deepcopy

    from .translator import TranslatorConfig

    cfg = TranslatorConfig(**{**asdict(tr.config), "mode": get_mode(mode).name})
    out = Translator(cfg)
    state = {k: v for k, v in tr.state_dict().items() if k not in tr.mode.extra_parameter_names}
    out.load_state_dict(state, strict=False)
    out.config.extra = deepcopy(tr.config.extra)
    return out
