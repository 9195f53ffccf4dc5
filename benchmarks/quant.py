"""Quantized KV caches side by side: kvforge presets, tiny-turboquant presets, transformers' QuantizedCache.

Quality (via ``kvforge.eval.run_bench``, same windows and prompts for every cache): decode-faithful
perplexity (4 windows of the pydoc eval split, 512 tokens prefilled, 512 scored in chunks of 32) and
greedy agreement / KL against a DynamicCache. Bytes: what each cache holds at the end of a window
(1,024 tokens) and after the speed run (2,112 tokens), as a ratio against float16 keys and values
(the usual deployment dtype; the model itself runs float32 here). Speed: 64 greedy tokens after a
2,048-token prompt, ms per decode step, as a ratio against a DynamicCache measured in the same run.

    python benchmarks/quant.py                         # smollm2-135m, ~15 min on 2 CPU cores
    python benchmarks/quant.py --caches kvforge-quant:preset=safe,tiny-turboquant:preset=safe --no-agree
    python benchmarks/quant.py --speed                 # decode ms/token against context, prefill time/memory

Each run writes a new folder under ``--out`` (default benchmarks/results), named after its settings and never
overwritten (``kvforge.results``): ``results.md``, ``results.json`` and, inside it, the results folder of the
quality run (``kvforge bench``'s, with its quality-vs-bytes plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402

from kvforge import load_model, run  # noqa: E402
from kvforge.eval.bench import BenchSettings, run_bench  # noqa: E402
from kvforge.models import text_config  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.specs import cache_nbytes, parse_spec, split_specs  # noqa: E402
from kvforge.texts import load_text  # noqa: E402

DEFAULT = ",".join([
    "kvforge-quant:preset=safe", "kvforge-quant:preset=balanced", "kvforge-quant:preset=compact",
    "kvforge-quant:preset=aggressive", "kvforge-quant:preset=2bit",
    # the rotation's effect, on and off
    "kvforge-quant:preset=safe,rotate=keys", "kvforge-quant:preset=2bit,rotate=none",
    "tiny-turboquant:preset=safe", "tiny-turboquant:preset=balanced", "tiny-turboquant:preset=compact",
    "tiny-turboquant:preset=aggressive", "hf-quantized:nbits=4", "hf-quantized:nbits=2",
])


@torch.inference_mode()
def decode_speed(model, ids: torch.Tensor, spec: str, new_tokens: int, repeats: int = 2) -> dict:
    """ms per greedy decode step after prefilling ``ids`` into a fresh cache (best of ``repeats``)."""
    best, held, tokens = None, 0, []
    n = ids.shape[1]
    for _ in range(repeats):
        cache = run.new_cache(model, spec)
        logits = run.prefill(model, ids, cache)
        t = time.perf_counter()
        # new_tokens greedy picks, new_tokens - 1 decode steps (the last pick is not fed back)
        toks = run.decode(model, cache, logits, new_tokens, log_probs=False)[0][0].tolist()
        step = (time.perf_counter() - t) / (new_tokens - 1)
        best = step if best is None else min(best, step)
        held, tokens = cache_nbytes(cache), toks
    return {"ms_per_token": 1000 * best, "bytes": held, "tokens": n + new_tokens - 1, "greedy": tokens}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--speed" in argv:  # decode/prefill speed against context length: benchmarks/quant_speed.py
        sys.path.insert(0, str(Path(__file__).parent))
        from quant_speed import main as speed_main

        return speed_main([a for a in argv if a != "--speed"])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--caches", default=DEFAULT, help="comma-separated cache specs (dynamic is always added)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens for the speed run")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-agree", action="store_true", help="perplexity only")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")

    caches = list(dict.fromkeys(["dynamic", *split_specs(args.caches)]))
    for c in caches:
        parse_spec(c)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"caches": caches}
    name = folder_name("quant", settings, args.model, f"w{args.windows}", f"{len(caches)}caches",
                      "no-speed" if args.no_speed else f"p{args.prompt}+{args.new_tokens}",
                      "no-agree" if args.no_agree else None, f"t{torch.get_num_threads()}")
    record = Results(args.out, name, settings)
    model, tok = load_model(args.model)
    tc = text_config(model)
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    fp16_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2

    metrics = ["ppl"] if args.no_agree else ["ppl", "agree"]
    # the quality run's own results folder goes inside this run's
    folder = run_bench(BenchSettings(model=args.model, caches=caches, metrics=metrics, windows=args.windows),
                       out_root=record.folder, model=model, tokenizer=tok)
    quality = {r["cache"]: r for r in json.loads((folder / "results.json").read_text())["results"]}

    speed: dict[str, dict] = {}
    if not args.no_speed:
        ids = run.encode(tok, load_text("pydoc", "eval"))[:, : args.prompt]
        for spec in caches:
            if "skipped" in quality.get(str(parse_spec(spec)), {}):
                continue
            speed[spec] = decode_speed(model, ids, spec, args.new_tokens)
            print(f"speed {spec}: {speed[spec]['ms_per_token']:.1f} ms/token", flush=True)

    rows = []
    base_ms = speed.get("dynamic", {}).get("ms_per_token")
    base_greedy = speed.get("dynamic", {}).get("greedy")
    for spec in caches:
        q = quality.get(str(parse_spec(spec)), {"cache": spec})
        row = {"cache": spec}
        if "skipped" in q or "error" in q:
            row["skipped"] = q.get("skipped") or q.get("error")
            rows.append(row)
            continue
        ppl = q["ppl"]
        row.update(ppl=ppl["ppl"], dppl=ppl["rel_change"], bytes_1k=ppl["bytes_per_token"],
                   x_fp16_1k=fp16_per_token / ppl["bytes_per_token"])
        if "agree" in q:
            row.update(agree=q["agree"]["match_rate"], kl=q["agree"]["mean_kl"])
        if spec in speed:
            s = speed[spec]
            row.update(bytes_2k=s["bytes"] / s["tokens"], x_fp16_2k=fp16_per_token * s["tokens"] / s["bytes"],
                       ms=s["ms_per_token"], x_time=s["ms_per_token"] / base_ms if base_ms else None,
                       same_greedy=sum(a == b for a, b in zip(s["greedy"], base_greedy)) / len(base_greedy)
                       if base_greedy else None)
        rows.append(row)

    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    L = args.prompt + args.new_tokens - 1
    lines = [
        f"# Quantized KV caches on {args.model}",
        "",
        f"Decode-faithful perplexity on {args.windows} windows (512 prefilled + 512 scored, chunks of 32); "
        f"agreement: greedy match over 32 tokens on 4 prompts and teacher-forced KL vs DynamicCache. "
        f"Bytes are those each cache holds, per token, after 1,024 tokens and after the {args.prompt}+{args.new_tokens} "
        f"speed run; 'x fp16' divides float16 keys+values ({fp16_per_token:,} B/token) by them. Decode: ms per step "
        f"after a {args.prompt}-token prompt, and the ratio to DynamicCache (float32) in this run.",
        "",
        f"| cache | PPL | ΔPPL | agree | KL | B/token @1k | x fp16 @1k | B/token @{L} | x fp16 @{L} | decode ms | vs dynamic |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['cache']} | skipped: {r['skipped']} |||||||||")
            continue
        lines.append(
            f"| {r['cache']} | {r['ppl']:.3f} | {100 * r['dppl']:+.2f}% | {f(r.get('agree') and 100 * r['agree'], '.1f')}% "
            f"| {f(r.get('kl'), '.4f')} | {r['bytes_1k']:,.0f} | {r['x_fp16_1k']:.2f}x | {f(r.get('bytes_2k'), ',.0f')} "
            f"| {f(r.get('x_fp16_2k'), '.2f')}x | {f(r.get('ms'), '.1f')} | {f(r.get('x_time'), '.2f')}x |")
    meta = record.meta
    quality_folder = record.relative(folder)
    lines += ["", f"torch {meta['torch']}, {meta['threads']} threads, {meta['started']}; quality run: `{quality_folder}`"]
    text = "\n".join(lines)
    print(text)
    record.write_table(text, rows=rows, quality_folder=quality_folder, fp16_bytes_per_token=fp16_per_token)
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
