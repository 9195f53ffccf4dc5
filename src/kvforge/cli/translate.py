"""``kvforge translate fit|train|run``: cross-model KV translation."""

from __future__ import annotations

from pathlib import Path

from ..translate.modes import MODES
from ..translate.recompute import SELECT
from ..translate.train import TrainConfig


def add_commands(sub) -> None:
    t = sub.add_parser("translate", help="translate one model's KV cache into another's")
    tsub = t.add_subparsers(dest="translate_command", metavar="COMMAND", required=True)

    p = tsub.add_parser("fit", help="fit a translator (closed-form ridge, both models frozen) on calibration text")
    p.add_argument("--source", required=True, help="source model (bundled name, directory or hub id)")
    p.add_argument("--target", required=True, help="target model")
    p.add_argument("--pieces", type=int, default=96, help="calibration pieces (default 96)")
    p.add_argument("--piece-chars", type=int, default=1400, help="characters per piece (default 1400)")
    p.add_argument("--strategy", default="nearest", help="layer map: nearest, terminal, uniform, all")
    p.add_argument("--k", type=int, default=3, help="source layers per target layer for 'nearest'")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--fact-passages", type=int, help="calibration passages with planted facts (default: --pieces)")
    p.add_argument("--window", type=int, default=3, help="source tokens per target token (default 3)")
    p.add_argument("--window-rank", type=int, default=32, help="components kept per older window slot (default 32)")
    p.add_argument("--neighbours", type=int, default=1, help="previous target tokens in the token features (default 1)")
    p.add_argument("--token-rank", type=int, default=192,
                   help="components of the target's token-local features (default 192; 0: source-only maps)")
    p.add_argument("-o", "--output", type=Path, required=True, help="translator file (.safetensors)")
    p.set_defaults(func=cmd_fit)

    p = tsub.add_parser("train", help="train a translator by distillation (both models frozen), resumable")
    p.add_argument("--source", required=True, help="the model whose cache is translated")
    p.add_argument("--target", required=True, help="the model that continues from the translation")
    p.add_argument("--mode", choices=MODES, default="replace",
                   help="replace: the translation is the target's whole past (KL to its own prefill); fuse: mixed "
                        "into the target's own prefill by a learned gate (next-token loss)")
    p.add_argument("--init", type=Path, help="translator to start from (default: the shipped one, else a ridge fit)")
    p.add_argument("--steps", type=int, help="optimizer steps (default 400 replace, 150 fuse)")
    p.add_argument("--lr", type=float, help="learning rate of the maps (default 1e-4 replace, 3e-5 fuse)")
    p.add_argument("--gate-lr", type=float, default=TrainConfig.gate_lr)
    p.add_argument("--batch", type=int, default=TrainConfig.batch)
    p.add_argument("--train-examples", type=int, default=TrainConfig.train_examples)
    p.add_argument("--val-examples", type=int, default=TrainConfig.val_examples)
    p.add_argument("--fact-examples", type=int, default=TrainConfig.fact_examples,
                   help=f"passages with planted facts besides the general text (default {TrainConfig.fact_examples})")
    p.add_argument("--fact-val-examples", type=int, default=TrainConfig.fact_val_examples)
    p.add_argument("--answer-weight", type=float, default=TrainConfig.answer_weight,
                   help=f"loss weight of answer tokens in fact passages (default {TrainConfig.answer_weight:g})")
    p.add_argument("--own-prefix", type=float, default=TrainConfig.own_prefix,
                   help="share (0 to 1) of few-shot fact passages trained with their opening as the target's own "
                        "cached state, only the passage translated (as `run --own-prefix-chars` serves it; default 0)")
    p.add_argument("--recompute", type=float, default=TrainConfig.recompute,
                   help="in half the examples the target re-reads this share (0 to below 1) of the context over the translation "
                        "(by sentence, as `run --recompute` does), and training goes through the re-read (default 0)")
    p.add_argument("--context-chars", type=int, default=TrainConfig.context_chars)
    p.add_argument("--continuation-tokens", type=int, default=TrainConfig.continuation_tokens)
    p.add_argument("--top-k", type=int, default=TrainConfig.top_k, help="teacher probabilities kept per token")
    p.add_argument("--ce-weight", type=float, help="weight of next-token loss (default 0 replace, 1 fuse)")
    p.add_argument("--kv-weight", type=float, default=0.0, help="weight of a key/value regression term (replace)")
    p.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    p.add_argument("--checkpoint-dir", type=Path, help="save every --eval-every steps and resume from here")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint in --checkpoint-dir")
    p.add_argument("--last", action="store_true",
                   help="keep the last weights, not those of the best validation point")
    p.add_argument("-o", "--output", type=Path, required=True, help="trained translator (.safetensors)")
    p.set_defaults(func=cmd_train)

    p = tsub.add_parser("run", help="the source reads a context, the target answers from the translated cache")
    p.add_argument("--source", required=True, help="the model that reads the context (bundled name or directory)")
    p.add_argument("--target", required=True, help="the model that answers from the translated cache")
    p.add_argument("--translator", type=Path,
                   help="a file from `kvforge translate fit` or `train` for this source and target (default: the "
                        "shipped replace translator of the pair)")
    p.add_argument("--context", type=Path, required=True, help="text file the source reads")
    p.add_argument("--prompt", required=True, help="what the target continues with after the context")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens the target generates (default 32)")
    p.add_argument("--recompute", type=float, default=0.0,
                   help="share of the context's tokens the target re-reads over the translation (0 to 1, default 0)")
    p.add_argument("--select", choices=SELECT,
                   help="which tokens --recompute re-reads: trust (least trusted by the translator), sentence "
                        "(whole sentences, least trusted on average first; the default), last")
    p.add_argument("--own-prefix-chars", type=int, default=0,
                   help="the target reads the context's first N characters itself (a shared instruction or few-shot "
                        "block it keeps in its prefix cache); the rest is translated (default 0)")
    p.set_defaults(func=cmd_run)


def cmd_fit(args) -> int:
    from ..models import load_model
    from ..translate import calibration_texts, fit

    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    texts = calibration_texts(args.pieces, args.piece_chars, args.fact_passages)
    tr = fit(src, tgt, s_tok, t_tok, texts, strategy=args.strategy, k=args.k, ridge=args.ridge,
             source_name=args.source, target_name=args.target, window=args.window, window_rank=args.window_rank,
             neighbours=args.neighbours, token_rank=args.token_rank)
    tr.save(args.output)
    print(f"fitted {args.source} -> {args.target} on {tr.config.tokens_fitted:,} target tokens: {args.output}")
    return 0


def cmd_train(args) -> int:
    import torch

    from ..models import load_model
    from ..texts import load_text
    from ..translate import Translator, calibration_texts, fit, load, shipped
    from ..translate.train import train, with_mode

    cfg = TrainConfig(mode=args.mode, steps=args.steps, lr=args.lr, gate_lr=args.gate_lr, batch=args.batch,
                      context_chars=args.context_chars, continuation_tokens=args.continuation_tokens,
                      top_k=args.top_k, ce_weight=args.ce_weight, kv_weight=args.kv_weight,
                      train_examples=args.train_examples, val_examples=args.val_examples,
                      fact_examples=args.fact_examples, fact_val_examples=args.fact_val_examples,
                      answer_weight=args.answer_weight, own_prefix=args.own_prefix, recompute=args.recompute,
                      eval_every=args.eval_every, checkpoint_every=args.eval_every, keep_best=not args.last)
    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    if torch.cuda.is_available():
        src, tgt = src.cuda(), tgt.cuda()
    if args.init:
        tr = Translator.load(args.init)
        tr.check_pair(src, tgt)
    elif (args.source, args.target) in shipped():
        tr = load(args.source, args.target, src, tgt)
        print(f"starting from the shipped {args.source} -> {args.target} translator")
    else:
        print("no translator to start from: fitting one (ridge) first")
        tr = fit(src, tgt, s_tok, t_tok, calibration_texts(), source_name=args.source, target_name=args.target)
    if tr.config.mode != args.mode:
        tr = with_mode(tr, args.mode)
    rep = train(tr, src, tgt, s_tok, t_tok, cfg, load_text("pydoc", "calibration"), load_text("pydoc", "eval"),
                checkpoint_dir=args.checkpoint_dir, resume=not args.no_resume)
    tr.cpu().save(args.output, dtype=torch.float16)
    first = rep.history[0]
    last = next((h for h in rep.history if h["step"] == tr.config.trained_steps), rep.history[-1])
    facts = (f"; fact passages: answer tokens right {100 * first['answer_acc']:.0f}% -> {100 * last['answer_acc']:.0f}%"
             if "answer_acc" in first else "")
    print(f"trained {args.mode} {args.source} -> {args.target} for {rep.steps} steps ({rep.seconds:.0f}s): "
          f"validation text PPL {first.get('ppl_text', first['ppl']):.3f} -> {last.get('ppl_text', last['ppl']):.3f} "
          f"(own prefill {rep.baseline['own']:.3f}, no context {rep.baseline['none']:.3f}), KL {first['kl']:.4f} -> "
          f"{last['kl']:.4f}{facts}: {args.output}")
    return 0


def cmd_run(args) -> int:
    import time

    from ..generate import generate, prefill
    from ..models import load_model
    from ..translate import Translator

    if not args.context.is_file():
        raise ValueError(f"context file not found: {args.context}")
    if not 0.0 <= args.recompute <= 1.0:
        raise ValueError(f"--recompute is a share of the context's tokens, 0 to 1; got {args.recompute}")
    if args.select is not None and not args.recompute:
        raise ValueError(f"--select {args.select} chooses the tokens that --recompute re-reads; give --recompute too")
    text = args.context.read_text()
    if not 0 <= args.own_prefix_chars <= len(text):
        raise ValueError(f"--own-prefix-chars must be within the context's {len(text)} characters; "
                         f"got {args.own_prefix_chars}")
    if args.translator is None:
        from ..translate import shipped
        from ..translate.registry import weights_path

        args.translator = weights_path(args.source, args.target)
        if not args.translator.exists():
            pairs = ", ".join(f"{a} -> {b}" for a, b in sorted(shipped())) or "none"
            raise ValueError(f"no shipped translator for {args.source} -> {args.target} (shipped: {pairs}); "
                             "give --translator FILE")
    tr = Translator.load(args.translator)
    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    t = time.perf_counter()
    state = prefill(src, s_tok, text)
    t_src = time.perf_counter() - t
    from ..translate.recompute import own_prefix_state

    t = time.perf_counter()
    own_prefix = own_prefix_state(tgt, t_tok, text, args.own_prefix_chars) if args.own_prefix_chars else None
    t_own = time.perf_counter() - t  # in a server: a prefix-cache hit
    t = time.perf_counter()
    translated = tr.translate(state, text, src, tgt, s_tok, t_tok, recompute=args.recompute,
                              own_prefix=own_prefix, **({"select": args.select} if args.select else {}))
    t_tr = time.perf_counter() - t
    out = generate(tgt, t_tok, args.prompt, max_new_tokens=args.max_new_tokens, state=translated)
    print(out.text)
    redone = translated.meta.get("recomputed_tokens", 0)
    print(f"[source prefill {t_src:.2f}s, translation {t_tr:.2f}s, target read {out.forwarded_tokens} tokens "
          f"of prompt and answer and re-read {redone} of the {translated.num_tokens}-token context"
          + (f"; its first {own_prefix.num_tokens} tokens are the target's own prefix, prefilled here in "
             f"{t_own:.2f}s (a prefix-cache hit in a server)" if own_prefix else "") + "]")
    return 0
