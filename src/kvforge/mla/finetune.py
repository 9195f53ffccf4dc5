"""Fine-tuning a converted model by distillation from the original.

Loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * next-token CE``. Only the conversion's own
weights train: the up-projections on the Stiefel manifold (orthonormal columns, ``geoopt.optim.RiemannianAdam``),
the down-projections (and the kept rotary rows of ``decoupled_rope``) with AdamW; everything else stays
frozen. Training text is the calibration split, validation text the eval split (never overlapping).
Checkpoints hold the trainable weights and both optimizers; training resumes from them.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import run
from .attention import LatentAttention
from .convert import attention_modules


@dataclass
class FinetuneConfig:
    steps: int = 300
    lr: float = 1e-4  # down-projections (AdamW)
    stiefel_lr: float = 1e-4  # up-projections (Riemannian Adam)
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.9  # weight of the KL term (1 - alpha on next-token loss)
    seq_len: int = 256
    batch: int = 2
    val_windows: int = 8
    eval_every: int = 50
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("steps", "seq_len", "batch", "val_windows", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


@dataclass
class FinetuneReport:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    teacher_ppl: float = float("nan")


def trainable(model) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """``(stiefel, euclidean)`` parameters of the conversion: up-projections, and down-projections with the
    kept rotary rows and biases."""
    stiefel, other = [], []
    for a in attention_modules(model):
        if not isinstance(a, LatentAttention):
            raise ValueError("the model has attention that is not latent; convert it first (kvforge.mla.convert)")
        stiefel += a.stiefel()
        for module in a.impl.trainable_modules(a):
            other += list(module.parameters())
        other += [p for p in (a.k_bias, a.v_bias) if p is not None]
    return stiefel, other


def orthonormality_error(model) -> float:
    """Largest ``|U^T U - I|`` over the up-projections."""
    worst = 0.0
    for p in trainable(model)[0]:
        u = p.detach().double()
        worst = max(worst, (u.T @ u - torch.eye(u.shape[1], dtype=u.dtype)).abs().max().item())
    return worst


def windows(tokenizer, text: str, n: int | None, seq_len: int) -> list[torch.Tensor]:
    """``n`` windows of ``seq_len`` tokens from ``text`` (``None``: as many as it holds)."""
    from ..run import token_windows

    if n is None:
        n = tokenizer(text, return_tensors="pt").input_ids.shape[1] // seq_len
        if n < 1:
            raise ValueError(f"the training text holds fewer than {seq_len} tokens")
    return token_windows(tokenizer, text, n, seq_len)


def _losses(student, teacher, ids: torch.Tensor, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
    s_logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
    t = cfg.temperature
    kl = F.kl_div(F.log_softmax(s_logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                  reduction="none").sum(-1).mean() * t * t
    ce = F.cross_entropy(s_logits.reshape(-1, s_logits.shape[-1]), ids[:, 1:].reshape(-1))
    return {"kl": kl, "ce": ce, "loss": cfg.alpha * kl + (1 - cfg.alpha) * ce}


@torch.no_grad()
def _validate(student, teacher, val: list[torch.Tensor], cfg: FinetuneConfig) -> dict[str, float]:
    kl = nll = 0.0
    n = 0
    for ids in val:
        d = _losses(student, teacher, ids, cfg)
        kl += d["kl"].item()
        nll += d["ce"].item() * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    return {"kl": kl / len(val), "ppl": math.exp(nll / n), "orthonormality_error": orthonormality_error(student)}


def finetune(student, teacher, tokenizer, cfg: FinetuneConfig, train_text: str, val_text: str,
             checkpoint_dir: str | Path | None = None, resume: bool = True, show_progress: bool = True,
             log=print) -> FinetuneReport:
    """Distil ``teacher`` (the original model, frozen) into the converted ``student`` in place."""
    import geoopt

    from ..progress import progress

    teacher.eval().requires_grad_(False)
    student.eval().requires_grad_(False)
    stiefel, other = trainable(student)
    manifold = geoopt.EuclideanStiefel()  # QR retraction: columns stay orthonormal to float precision
    for p in stiefel:
        p.requires_grad_(True)
    for p in other:
        p.requires_grad_(True)
    # geoopt reads the manifold off the parameter: swap each up-projection for a ManifoldParameter in place
    for a in attention_modules(student):
        for _, name in a.impl.factors.values():
            p = getattr(a, name, None)
            if isinstance(p, torch.nn.Parameter) and not isinstance(p, geoopt.ManifoldParameter):
                setattr(a, name, geoopt.ManifoldParameter(p.data, manifold=manifold))
    stiefel, other = trainable(student)
    opt_s = geoopt.optim.RiemannianAdam(stiefel, lr=cfg.stiefel_lr, stabilize=10)
    opt_e = torch.optim.AdamW(other, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and resume and (ckpt / "finetune_state.pt").exists():
        saved = torch.load(ckpt / "finetune_state.pt", weights_only=False)
        if {k: v for k, v in saved["config"].items() if k != "steps"} != {
                k: v for k, v in asdict(cfg).items() if k != "steps"}:
            raise ValueError(f"{ckpt} holds a checkpoint of different settings: {saved['config']}")
        with torch.no_grad():
            for p, q in zip(stiefel + other, saved["params"]):
                p.copy_(q)
        opt_s.load_state_dict(saved["opt_s"])
        opt_e.load_state_dict(saved["opt_e"])
        step, history = saved["step"], saved["history"]
        log(f"resumed from {ckpt} at step {step}")
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    data = [w.to(device) for w in windows(tokenizer, train_text, None, cfg.seq_len)]
    val = [w.to(device) for w in windows(tokenizer, val_text, cfg.val_windows, cfg.seq_len)]
    scored = [run.score(teacher, run.new_cache(teacher), v, single_pass_context=1)[:2] for v in val]
    teacher_ppl = math.exp(sum(s[0] for s in scored) / sum(s[1] for s in scored))
    if not history:
        v = _validate(student, teacher, val, cfg) | {"step": 0}
        history.append(v)
        log(f"step 0: val KL {v['kl']:.4f}, PPL {v['ppl']:.3f} (teacher {teacher_ppl:.3f})")
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(step):
        torch.randint(len(data), (cfg.batch,), generator=gen)
    bar = progress(total=cfg.steps, initial=step, desc="finetune", disable=not show_progress)
    while step < cfg.steps:
        opt_s.zero_grad(set_to_none=True)
        opt_e.zero_grad(set_to_none=True)
        total = 0.0
        for i in torch.randint(len(data), (cfg.batch,), generator=gen).tolist():
            d = _losses(student, teacher, data[i], cfg)
            (d["loss"] / cfg.batch).backward()
            total += d["loss"].item() / cfg.batch
        opt_s.step()
        opt_e.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total:.4f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = _validate(student, teacher, val, cfg) | {"step": step, "train_loss": total}
            history.append(v)
            log(f"step {step}: train loss {total:.4f}, val KL {v['kl']:.4f}, PPL {v['ppl']:.3f}, "
                f"orthonormality error {v['orthonormality_error']:.2e}")
        if ckpt and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            ckpt.mkdir(parents=True, exist_ok=True)
            tmp = ckpt / "finetune_state.pt.tmp"
            torch.save({"params": [p.detach().clone() for p in stiefel + other], "opt_s": opt_s.state_dict(),
                        "opt_e": opt_e.state_dict(), "step": step, "history": history, "config": asdict(cfg)}, tmp)
            os.replace(tmp, ckpt / "finetune_state.pt")
            (ckpt / "history.json").write_text(json.dumps({"teacher_ppl": teacher_ppl, "history": history}, indent=1))
    bar.close()
    student.requires_grad_(False)
    cfg_mla = getattr(student, "kvforge_mla", None)
    if cfg_mla is not None:
        cfg_mla.finetune = {**asdict(cfg), "steps_done": step, "val": history[-1]}
        student.config.kvforge_mla = cfg_mla.to_dict()
    return FinetuneReport(step, time.perf_counter() - t0, history, teacher_ppl)
