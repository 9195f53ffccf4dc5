"""``kvforge quant recommend`` and ``kvforge validate``."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    from .core import _model_arg

    q = sub.add_parser("quant", help="quantized cache tools")
    qsub = q.add_subparsers(dest="quant_command", metavar="COMMAND", required=True)
    p = qsub.add_parser("recommend", help="one calibration pass: per-layer ranges, outliers, errors, recommended bits")
    _model_arg(p)
    p.add_argument("--mode", default="balanced", choices=["quality", "balanced"], help="recommendation mode")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens (default 512)")
    p.add_argument("--text", default="pydoc", help="'pydoc' (its calibration split) or a text file")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("validate", help="token agreement of a cache against DynamicCache (greedy A/B, KL)")
    _model_arg(p)
    p.add_argument("--cache", required=True, help="cache spec, e.g. kvforge-quant:preset=balanced")
    p.add_argument("--prompts", type=int, default=4, help="prompts from the eval text (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    p.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt (default 64)")
    p.add_argument("--min-match", type=float, default=0.9, help="exit 1 below this match rate (default 0.9)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)


def cmd_recommend(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model
    from ..quant.calibrate import BITS, calibrate
    from ..texts import load_text

    model, tok = load_model(args.model, dtype=args.dtype)
    text = load_text(args.text, "calibration")
    report = calibrate(model, tok, text=text, tokens=args.tokens)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    bits = "/".join(str(b) for b in BITS[:3])
    t = Table(title=f"{report.model}: calibration on {report.tokens} tokens, mode {args.mode}")
    for col in ("layer", "type", "|k| max", "k outlier x", "|v| max", "v outlier x", f"k err % @{bits}b",
                f"v err % @{bits}b", "recommended"):
        t.add_column(col, justify="right")
    for row in report.rows(args.mode):
        t.add_row(*row)
    con = Console()
    con.print(t)
    s = report.summary(args.mode)
    con.print(f"mean bits: keys {s['mean_key_bits']:.2f}, values {s['mean_value_bits']:.2f}. "
              f"Use it: QuantizedKVCache.from_model(model, tokenizer, mode={args.mode!r})")
    return 0


def cmd_validate(args) -> int:
    from ..eval import agreement, default_prompts
    from ..models import load_model
    from ..specs import parse_spec
    from ..texts import load_text

    parse_spec(args.cache)
    model, tok = load_model(args.model, dtype=args.dtype)
    prompts = default_prompts(tok, args.prompts, args.prompt_tokens, load_text("pydoc", "eval"))
    r = agreement(model, tok, args.cache, prompts=prompts, new_tokens=args.new_tokens)
    ok = r.match_rate >= args.min_match
    if args.json:
        print(json.dumps({**r.to_dict(), "pass": ok}, indent=1))
    else:
        print(f"{r.cache} vs DynamicCache on {args.model}: greedy match {100 * r.match_rate:.1f}% over "
              f"{r.prompts}x{r.new_tokens} tokens, {100 * r.exact:.0f}% of prompts identical, first divergence "
              f"{r.first_divergence}, mean KL {r.mean_kl:.5f}: {'PASS' if ok else 'FAIL'} (min {100 * args.min_match:.0f}%)")
    return 0 if ok else 1
