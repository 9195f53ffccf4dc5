"""``kvforge mla convert|finetune``: post-hoc conversion to latent attention."""

from __future__ import annotations

from pathlib import Path

from ..mla.attention import METHODS
from ..mla.finetune import FinetuneConfig


def add_commands(sub) -> None:
    t = sub.add_parser("mla", help="convert a model's attention so that its cache holds low-rank latents")
    tsub = t.add_subparsers(dest="mla_command", metavar="COMMAND", required=True)

    p = tsub.add_parser("convert", help="activation-aware SVD conversion (calibrated, no training)")
    p.add_argument("--model", required=True, help="bundled name, directory or hub id")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--ratio", type=float, help="original KV bytes over latent KV bytes (2 = half)")
    size.add_argument("--rank", type=int, help="the same latent dims in every layer instead of a ratio")
    p.add_argument("--method", choices=METHODS, default="joint",
                   help="joint (default; best quality), separate, or decoupled_rope (decode on the latents)")
    p.add_argument("--rope-pairs", type=int, help="decoupled_rope: rotary pairs kept per KV head (default head_dim/8, at most half the budget)")
    p.add_argument("--calibration", default="mix",
                   help="calibration texts, comma-separated, taken in turn: named texts (their calibration parts) "
                        "or files (whole) (default: mix = pydoc, licenses, kjv; see kvforge.texts)")
    p.add_argument("--calibration-pieces", type=int, default=32, help="pieces of ~512 tokens (default 32)")
    p.add_argument("--no-whiten", action="store_true", help="plain weight SVD (no activation statistics)")
    p.add_argument("--output-aware", choices=["auto", "fisher", "on", "off"], default="auto",
                   help="weigh key/value errors by their cost: fisher (loss gradients; one backward pass per "
                        "piece and sample), on (query energy and o_proj) or off (auto: fisher up to 2.5x, else off)")
    p.add_argument("--fisher-damping", type=float,
                   help="with fisher weighting: add this much of the query/o_proj weights (default 0.5; 0: Fisher alone)")
    p.add_argument("--refine", type=int,
                   help="read the calibration statistics again on the converted model and factor again, N times (default 0)")
    p.add_argument("--bias-correction", choices=["auto", "on", "off"], default="auto",
                   help="whiten by the input's covariance and restore its mean by a bias (auto: on up to 2.5x)")
    p.add_argument("--output-correction", choices=["auto", "local", "global", "off"], default="auto",
                   help="refit each layer's o_proj by least squares to the original attention's output on the "
                        "calibration text: on the converted model's hidden states (local) or the original "
                        "model's (global) (auto: see kvforge.mla.conversion_defaults)")
    p.add_argument("--correction-damping", type=float,
                   help="with the output correction: shrink towards the original o_proj by this share of the "
                        "latent outputs' mean eigenvalue (default 1.0; 0: plain least squares)")
    p.add_argument("--allocation", choices=["auto", "uniform", "spectrum"], default="auto",
                   help="latent widths: the same in every layer, or by the normalised spectra "
                        "(auto: uniform up to 2.5x, else spectrum)")
    p.add_argument("--rank-multiple", type=int, default=1,
                   help="latent widths in multiples of this (8: quantize the latents with any kvforge-quant bits)")
    p.add_argument("-o", "--output", type=Path, required=True, help="directory for the converted model")
    p.set_defaults(func=cmd_convert)

    p = tsub.add_parser("finetune", help="distil the original model into a converted one (Stiefel up-projections)")
    p.add_argument("--model", required=True, type=Path, help="a directory from `kvforge mla convert`")
    p.add_argument("--teacher", help="the original model (default: the base recorded at conversion)")
    p.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    p.add_argument("--lr", type=float, default=FinetuneConfig.lr)
    p.add_argument("--stiefel-lr", type=float, default=FinetuneConfig.stiefel_lr)
    p.add_argument("--temperature", type=float, default=FinetuneConfig.temperature)
    p.add_argument("--alpha", type=float, default=FinetuneConfig.alpha, help="KL weight (1 - alpha: next-token)")
    p.add_argument("--seq-len", type=int, default=FinetuneConfig.seq_len)
    p.add_argument("--batch", type=int, default=FinetuneConfig.batch)
    p.add_argument("--eval-every", type=int, default=FinetuneConfig.eval_every)
    p.add_argument("--checkpoint-dir", type=Path, help="save every --eval-every steps and resume from here")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("-o", "--output", type=Path, required=True, help="directory for the fine-tuned model")
    p.set_defaults(func=cmd_finetune)


def _calibration(args) -> list[str]:
    from ..texts import calibration_pieces

    return calibration_pieces(args.calibration, args.calibration_pieces, 2200)


def cmd_convert(args) -> int:
    from ..mla import REGISTRY, compression, convert, save_converted
    from ..models import load_model

    model, tok = load_model(args.model)
    cfg = convert(model, tok, ratio=args.ratio, rank=args.rank, method=args.method,
                  calibration=None if args.no_whiten and not REGISTRY[args.method].rope_stats else _calibration(args),
                  whiten=not args.no_whiten, rope_pairs=args.rope_pairs, name=args.model,
                  output_aware={"auto": None, "fisher": "fisher", "on": True, "off": False}[args.output_aware],
                  bias_correction={"auto": None, "on": True, "off": False}[args.bias_correction],
                  allocation=None if args.allocation == "auto" else args.allocation,
                  fisher_damping=args.fisher_damping, refine=args.refine,
                  output_correction={"auto": None, "off": False}.get(args.output_correction, args.output_correction),
                  correction_damping=args.correction_damping,
                  rank_multiple=args.rank_multiple)
    save_converted(model, tok, args.output)
    energy = [sum(e.values()) / len(e) for e in cfg.retained_energy]
    print(f"converted {args.model} ({cfg.method}): cache {compression(model):.2f}x smaller than the original; "
          f"retained energy per layer min {min(energy):.3f}, mean {sum(energy) / len(energy):.3f}; "
          f"calibrated on {cfg.calibration_tokens:,} tokens: {args.output}")
    return 0


def cmd_finetune(args) -> int:
    from ..mla import read_config, save_converted
    from ..mla.finetune import finetune
    from ..models import fingerprint, load_model
    from ..texts import load_text

    cfg_mla = read_config(args.model)
    teacher_name = args.teacher or cfg_mla.base_model
    if not teacher_name:
        raise ValueError("the conversion does not record its base model; pass --teacher")
    student, tok = load_model(str(args.model))
    teacher, _ = load_model(teacher_name)
    if fingerprint(teacher) != cfg_mla.base_fingerprint:
        raise ValueError(f"--teacher {teacher_name} is not the model this conversion started from "
                         f"(fingerprint {fingerprint(teacher)}, recorded {cfg_mla.base_fingerprint})")
    cfg = FinetuneConfig(steps=args.steps, lr=args.lr, stiefel_lr=args.stiefel_lr, temperature=args.temperature,
                         alpha=args.alpha, seq_len=args.seq_len, batch=args.batch, eval_every=args.eval_every,
                         checkpoint_every=args.eval_every)
    rep = finetune(student, teacher, tok, cfg, load_text("pydoc", "calibration"), load_text("pydoc", "eval"),
                   checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume)
    save_converted(student, tok, args.output)
    a, b = rep.history[0], rep.history[-1]
    print(f"fine-tuned {rep.steps} steps ({rep.seconds:.0f}s): validation PPL {a['ppl']:.3f} -> {b['ppl']:.3f} "
          f"(teacher {rep.teacher_ppl:.3f}), KL {a['kl']:.4f} -> {b['kl']:.4f}, orthonormality error "
          f"{b['orthonormality_error']:.1e}: {args.output}")
    return 0
