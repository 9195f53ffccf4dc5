"""``kvforge quant recommend`` and ``kvforge validate`` (``kvforge eval agree`` with a pass/fail gate)."""

from __future__ import annotations

import json


def add_commands(sub) -> None:
    from .core import _model_arg
    from .evaluate import agree_arguments

    q = sub.add_parser("quant", help="quantized cache tools")
    qsub = q.add_subparsers(dest="quant_command", metavar="COMMAND", required=True)
    p = qsub.add_parser("recommend", help="one calibration pass: per-layer ranges, outliers, errors, recommended bits")
    _model_arg(p)
    p.add_argument("--mode", default="balanced", choices=["quality", "balanced"], help="recommendation mode")
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens per text (default 512)")
    p.add_argument("--text", default="mix", help="calibration texts, comma-separated: named texts (their calibration "
                   "parts) or files (whole) (default: mix = pydoc, licenses, kjv; see kvforge.texts)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_recommend)

    # `kvforge eval agree` with a pass/fail gate
    agree_arguments(sub.add_parser("validate", help="token agreement of a cache against DynamicCache (greedy A/B, "
                                   "KL); exit 1 below --min-match"), cache_default=None, new_tokens=64, min_match=0.9)


def cmd_recommend(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..models import load_model
    from ..quant.calibrate import BITS, calibrate
    from ..texts import calibration_text, text_names

    names = text_names(args.text)
    texts = [calibration_text(name) for name in names]
    model, tok = load_model(args.model, dtype=args.dtype)
    report = calibrate(model, tok, text=texts, tokens=args.tokens)
    if args.json:
        print(json.dumps({**report.to_dict(), "texts": names}, indent=1))
        return 0
    bits = "/".join(str(b) for b in BITS[:3])
    t = Table(title=f"{report.model}: calibration on {report.tokens} tokens of {', '.join(names)}, mode {args.mode}")
    for col in ("layer", "type", "|k| max", "k outlier x", "|v| max", "v outlier x", f"k err % @{bits}b",
                f"v err % @{bits}b", "recommended"):
        t.add_column(col, justify="right")
    for row in report.rows(args.mode):
        t.add_row(*row)
    con = Console()
    con.print(t)
    s = report.summary(args.mode)
    con.print(f"mean bits: keys {s['mean_key_bits']:.2f}, values {s['mean_value_bits']:.2f}. "
              f"Use it: QuantizedKVCache.from_model(model, tokenizer, mode={args.mode!r}"
              + ("" if args.text == "mix" else ", text=[kvforge.texts.calibration_text(n) for n in "
                 f"{names!r}]") + ")")
    return 0
