"""Evaluation commands: ``kvforge eval ppl|agree|needle`` and ``kvforge bench``."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path


def _csv(cast):
    def parse(text: str):
        try:
            return [cast(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"expected a comma-separated list of {cast.__name__}, got {text!r}") from None

    return parse


def _spec_list(text: str) -> list[str]:
    from ..specs import split_specs

    return split_specs(text)


TEXT_HELP = ("named texts or files, comma-separated (ppl and bench take several and report each, the mean and the "
             "worst): pydoc, licenses, kjv, fortunes, jargon, or all / mix / held-out (see kvforge.texts)")


def add_commands(sub) -> None:
    from .core import _model_arg

    ev = sub.add_parser("eval", help="measure one cache: perplexity, agreement or needle retrieval")
    evsub = ev.add_subparsers(dest="metric", metavar="METRIC", required=True)

    p = evsub.add_parser("ppl", help="decode-faithful perplexity (and the baseline's, same windows)")
    common(p)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--context", type=int, default=512, help="tokens prefilled into the cache per window")
    p.add_argument("--score", type=int, default=512, help="tokens scored after the prefill")
    p.add_argument("--chunk", type=int, default=32, help="tokens per scoring forward pass")
    p.add_argument("--single-pass", action="store_true", help="one forward per window (transformers' recipe)")
    p.add_argument("--no-baseline", action="store_true", help="skip the DynamicCache baseline")
    p.set_defaults(func=cmd_ppl)

    agree_arguments(evsub.add_parser("agree", help="greedy agreement and KL against a DynamicCache"))

    p = evsub.add_parser("needle", help="planted-fact retrieval per context length and depth")
    common(p)
    p.add_argument("--lengths", type=_csv(int), default=[512, 1024])
    p.add_argument("--depths", type=_csv(float), default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--plot", type=Path, help="save the accuracy heatmap as PNG")
    p.set_defaults(func=cmd_needle)

    p = sub.add_parser("bench", help="all metrics for several caches on the same windows, into a results folder")
    _model_arg(p)
    p.add_argument("--caches", required=True, type=_spec_list,
                   help="comma-separated cache specs, e.g. dynamic,kvforge-quant:preset=safe,tiny-turboquant")
    p.add_argument("--metrics", type=_csv(str), default=["ppl", "agree", "needle"], help="subset of ppl,agree,needle")
    p.add_argument("--out", type=Path, default=Path("results"), help="parent folder (default ./results)")
    p.add_argument("--text", default="pydoc", help=TEXT_HELP)
    p.add_argument("--split", default="eval", choices=["eval", "calibration", "all"], help="part of each text")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows (default 4)")
    p.add_argument("--context", type=int, default=512, help="tokens prefilled per window (default 512)")
    p.add_argument("--score", type=int, default=512, help="tokens scored per window (default 512)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per scoring forward (default 32)")
    p.add_argument("--needle-lengths", type=_csv(int), default=[512, 1024], help="haystack lengths in tokens")
    p.add_argument("--needle-trials", type=int, default=1, help="needles per length and depth")
    p.add_argument("--single-pass", action="store_true", help="also report single-pass perplexity")
    p.add_argument("--size-tokens", type=int, default=2048,
                   help="also measure bytes held after a prefill of this many tokens of the texts (0: skip; default 2048)")
    p.add_argument("--variants", type=_csv(str), default=[],
                   help="converted model directories of the same base (kvforge mla convert), run with every cache")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("caches", help="list the cache specs and whether each is available")
    p.set_defaults(func=cmd_caches)


def common(p, cache_default: str | None = "dynamic") -> None:
    """The arguments every one-cache measurement takes (model, cache, text, --json)."""
    from .core import _model_arg

    _model_arg(p)
    p.add_argument("--cache", default=cache_default, required=cache_default is None,
                   help="cache spec (see `kvforge caches`), e.g. kvforge-quant:preset=balanced")
    p.add_argument("--text", default="pydoc", help=TEXT_HELP)
    p.add_argument("--split", default="eval", choices=["eval", "calibration", "all"], help="part of each text")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def agree_arguments(p, cache_default: str | None = "dynamic", new_tokens: int = 32, min_match: float | None = None):
    """``kvforge eval agree`` (and ``kvforge validate``, its pass/fail form)."""
    common(p, cache_default)
    p.add_argument("--prompts", type=int, default=4, help="prompts from the text (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=256, help="tokens per prompt (default 256)")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help=f"greedy tokens per prompt (default {new_tokens})")
    p.add_argument("--min-match", type=float, default=min_match,
                   help="exit 1 below this greedy match rate" + (f" (default {min_match})" if min_match else ""))
    p.set_defaults(func=cmd_agree)


def _load(args):
    from ..models import load_model
    from ..specs import parse_spec

    parse_spec(args.cache)  # fail on a bad spec before loading a model
    return load_model(args.model, dtype=args.dtype)


def _text(args) -> str:
    from ..texts import load_text, text_names

    names = text_names(args.text)
    if len(names) > 1:
        raise ValueError(f"`kvforge eval {args.metric}` takes one text (got {', '.join(names)}); "
                         "`kvforge eval ppl` and `kvforge bench` take several")
    return load_text(names[0], args.split)


def _print(result, as_json: bool, lines: list[str]) -> None:
    print(json.dumps(result.to_dict(), indent=1) if as_json else "\n".join(lines))


def cmd_ppl(args) -> int:
    from ..eval import perplexity, token_windows
    from ..models import size_vs_fp16
    from ..texts import load_text, text_names

    names = text_names(args.text)
    model, tok = _load(args)
    # every text's windows are cut before any scoring, so a text that is too short fails first
    windows = {n: token_windows(tok, load_text(n, args.split), args.windows, args.context + args.score, name=n)
               for n in names}
    lines, out, changes = [], {}, {}
    for name in names:
        kw = dict(windows=windows[name], context=args.context, score=args.score, chunk=args.chunk,
                  single_pass=args.single_pass)
        base = None
        if args.cache != "dynamic" and not args.no_baseline:
            base = perplexity(model, tok, "dynamic", **kw)
        r = perplexity(model, tok, args.cache, baseline=base, **kw)
        out[name] = r.to_dict()
        lines.append(f"[{name}] {r.cache} ({r.mode}): PPL {r.ppl:.4f}  NLL {r.nll:.5f}  tokens {r.tokens}  "
                     f"{r.bytes_per_token:,.0f} B/token ({size_vs_fp16(r.bytes_per_token, r.fp16_bytes_per_token)})  "
                     f"{1000 * r.seconds_per_token:.2f} ms/token")
        if base is not None:
            changes[name] = r.rel_change
            lines.append(f"[{name}] dynamic baseline (this model's dtype): PPL {base.ppl:.4f}; {r.cache} changes it by "
                         f"{100 * r.rel_change:+.2f}% and holds {base.bytes_per_token / r.bytes_per_token:.2f}x fewer bytes")
    summary = {}
    if len(changes) > 1:
        worst = max(changes, key=changes.get)
        summary = {"mean_rel_change": sum(changes.values()) / len(changes), "worst_rel_change": changes[worst],
                   "worst_text": worst}
        lines.append(f"over {len(changes)} texts: mean {100 * summary['mean_rel_change']:+.2f}%, worst "
                     f"{100 * changes[worst]:+.2f}% ({worst})")
    if args.json:
        print(json.dumps(out[names[0]] if len(names) == 1 else {"texts": out, **summary}, indent=1))
    else:
        print("\n".join(lines))
    return 0


def cmd_agree(args) -> int:
    from ..eval import agreement, default_prompts

    text = _text(args)  # a bad text fails before the model loads
    model, tok = _load(args)
    prompts = default_prompts(tok, args.prompts, args.prompt_tokens, text)
    r = agreement(model, tok, args.cache, prompts=prompts, new_tokens=args.new_tokens)
    ok = args.min_match is None or r.match_rate >= args.min_match
    line = (f"{r.cache} vs DynamicCache on {args.model}: greedy match {100 * r.match_rate:.1f}% over "
            f"{r.prompts}x{r.new_tokens} tokens, {100 * r.exact:.0f}% of prompts identical, first divergence "
            f"{r.first_divergence}, mean KL {r.mean_kl:.5f} (max {r.max_kl:.4f})")
    if args.min_match is not None:
        line += f": {'PASS' if ok else 'FAIL'} (min {100 * args.min_match:.0f}%)"
    if args.json:
        print(json.dumps({**r.to_dict(), **({"pass": ok} if args.min_match is not None else {})}, indent=1))
    else:
        print(line)
    return 0 if ok else 1


def cmd_needle(args) -> int:
    from ..eval import needle
    from ..eval.report import plot_needle_result

    text = _text(args)
    model, tok = _load(args)
    r = needle(model, tok, args.cache, lengths=tuple(args.lengths), depths=tuple(args.depths),
               trials=args.trials, text=text)
    lines = [f"{r.cache}: needle accuracy {100 * r.mean_accuracy:.0f}%",
             "length  " + "  ".join(f"{d:>5.0%}" for d in r.depths)]
    lines += [f"{n:>6}  " + "  ".join(f"{a:>5.0%}" for a in row) for n, row in zip(r.lengths, r.accuracy)]
    _print(r, args.json, lines)
    if args.plot:
        plot_needle_result(r, args.plot)
    return 0


def cmd_bench(args) -> int:
    from ..eval import BenchSettings, run_bench

    names = {f.name for f in fields(BenchSettings)}
    settings = BenchSettings(**{k: v for k, v in vars(args).items() if k in names and k != "needle_lengths"},
                             needle_lengths=args.needle_lengths)
    settings.validate()
    out = run_bench(settings, args.out)
    print((out / "results.md").read_text())
    print(f"results: {out}")
    return 0


def cmd_caches(args) -> int:
    from ..specs import CacheSpec, known_specs

    for name, kind in sorted(known_specs().items()):
        ok, why = CacheSpec(name).available()
        params = ", ".join(kind.defaults) or "none"
        print(f"{name}  [{'available' if ok else 'unavailable: ' + why}]\n    {kind.description}\n    parameters: {params}")
    return 0
