"""``kvforge translate fit|run``: cross-model KV translation."""

from __future__ import annotations

from pathlib import Path


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
    p.add_argument("-o", "--output", type=Path, required=True, help="translator file (.safetensors)")
    p.set_defaults(func=cmd_fit)

    p = tsub.add_parser("run", help="the source reads a context, the target answers from the translated cache")
    p.add_argument("--source", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--translator", type=Path, required=True, help="a file from `kvforge translate fit`")
    p.add_argument("--context", type=Path, required=True, help="text file the source reads")
    p.add_argument("--prompt", required=True, help="what the target continues with after the context")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_run)


def cmd_fit(args) -> int:
    from ..models import load_model
    from ..texts import load_text, text_pieces
    from ..translate import fit

    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    texts = text_pieces(load_text("pydoc", "calibration"), args.pieces, args.piece_chars)
    tr = fit(src, tgt, s_tok, t_tok, texts, strategy=args.strategy, k=args.k, ridge=args.ridge,
             source_name=args.source, target_name=args.target)
    tr.save(args.output)
    print(f"fitted {args.source} -> {args.target} on {tr.config.tokens_fitted:,} target tokens: {args.output}")
    return 0


def cmd_run(args) -> int:
    import time

    from ..generate import generate, prefill
    from ..models import load_model
    from ..translate import Translator

    if not args.context.is_file():
        raise ValueError(f"context file not found: {args.context}")
    tr = Translator.load(args.translator)
    src, s_tok = load_model(args.source)
    tgt, t_tok = load_model(args.target)
    text = args.context.read_text()
    t = time.perf_counter()
    state = prefill(src, s_tok, text)
    t_src = time.perf_counter() - t
    t = time.perf_counter()
    translated = tr.translate(state, text, src, tgt, s_tok, t_tok)
    t_tr = time.perf_counter() - t
    out = generate(tgt, t_tok, args.prompt, max_new_tokens=args.max_new_tokens, state=translated)
    print(out.text)
    print(f"[source prefill {t_src:.2f}s, translation {t_tr:.2f}s, target read {out.forwarded_tokens} tokens "
          f"of prompt and answer, none of the {translated.num_tokens}-token context]")
    return 0
