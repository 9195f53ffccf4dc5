"""Decode speed with and without a KV cache, on a bundled model.

Measures, for each prompt length, the decode rate (tokens/s after the first token) of:

* ``kvforge.generate`` with kvforge's ``PreallocatedCache`` (sized prompt + new tokens),
* ``kvforge.generate`` with transformers' ``DynamicCache``,
* ``kvforge.generate`` with ``use_cache=False`` (every step re-reads the whole sequence: the baseline),
* transformers' ``model.generate`` (``DynamicCache``, greedy, exactly ``--new-tokens`` tokens),

and the ratio of each to the no-cache baseline measured in the same run. It also checks that the three
kvforge paths pick the same greedy tokens. Prompts are the first N tokens of the built-in evaluation
text (``kvforge.texts.load_text("pydoc", "eval")``).

    python benchmarks/cache_vs_nocache.py                      # smollm2-135m; 64,256,1024 tokens; 32 new
    python benchmarks/cache_vs_nocache.py --prompt-lengths 128 --new-tokens 16 --threads 1

Each run writes a new folder under ``--out`` (default ``benchmarks/results``), named after its settings and
never overwritten (``kvforge.results``): ``results.md`` and ``results.json`` (the run's metadata and rows).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import kvforge  # noqa: E402
from kvforge import PreallocatedCache, generate, load_model  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.run import cache_kw, encode  # noqa: E402
from kvforge.texts import load_text  # noqa: E402

PATHS = ["kvforge + PreallocatedCache", "kvforge + DynamicCache", "kvforge, no cache", "transformers generate"]
BASELINE = "kvforge, no cache"


class _TokenTimes(BaseStreamer):
    """Timestamps each token ``model.generate`` emits (the first ``put`` is the prompt)."""

    def __init__(self):
        self.calls = 0
        self.times: list[float] = []

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self):
        pass


def run_kvforge(model, tok, ids, new_tokens: int, path: str) -> dict:
    if path == "kvforge + PreallocatedCache":
        kw = {"cache": PreallocatedCache(model, ids.shape[1] + new_tokens)}
    elif path == "kvforge + DynamicCache":
        kw = {"cache": DynamicCache(config=model.config)}
    else:
        kw = {"use_cache": False}
    r = generate(model, tok, ids, max_new_tokens=new_tokens, stop_at_eos=False, **kw)
    decode_s = r.seconds - r.first_token_seconds
    return {"tokens": r.token_ids, "ttft_s": r.first_token_seconds, "decode_s": decode_s,
            "decode_tps": (len(r.token_ids) - 1) / decode_s, "forwarded_tokens": r.forwarded_tokens}


@torch.inference_mode()
def run_transformers(model, tok, ids, new_tokens: int) -> dict:
    timer = _TokenTimes()
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), **cache_kw(DynamicCache(config=model.config)),
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=timer,
        pad_token_id=tok.pad_token_id,
    )
    end = time.perf_counter()
    tokens = out[0, ids.shape[1]:].tolist()
    if len(timer.times) == len(tokens):
        ttft, decode_s = timer.times[0] - t0, timer.times[-1] - timer.times[0]
    else:  # the streamer was not called once per token: fall back to the whole call
        ttft, decode_s = float("nan"), end - t0
    return {"tokens": tokens, "ttft_s": ttft, "decode_s": decode_s, "decode_tps": (len(tokens) - 1) / decode_s}


def measure(model, tok, ids, new_tokens: int, path: str, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        if path == "transformers generate":
            runs.append(run_transformers(model, tok, ids, new_tokens))
        else:
            runs.append(run_kvforge(model, tok, ids, new_tokens, path))
    best = dict(runs[0])
    best["decode_tps"] = statistics.median(r["decode_tps"] for r in runs)
    best["ttft_s"] = statistics.median(r["ttft_s"] for r in runs)
    best["repeats"] = repeats
    best["decode_tps_runs"] = [r["decode_tps"] for r in runs]
    best["same_tokens_across_repeats"] = all(r["tokens"] == runs[0]["tokens"] for r in runs)
    return best


def markdown(results: dict, meta: dict) -> str:
    """The table of one run's ``results`` (``meta``: its :func:`kvforge.results.metadata`)."""
    s = meta["settings"]
    lines = [
        f"## KV cache vs no cache: {s['model']}",
        "",
        f"{s['new_tokens']} new tokens, greedy; torch {meta['torch']} on {meta['threads']} CPU thread(s); "
        f"{meta['started']}. Decode = tokens/s after the first token; ratios are against the no-cache run of the same "
        f"prompt length in this run. Cached paths: median of {s['repeats']} runs; no-cache: 1 run.",
        "",
        "| prompt tokens | path | first token (s) | decode tok/s | vs no cache | same tokens as no cache |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['prompt_tokens']} | {row['path']} | {row['ttft_s']:.3f} | {row['decode_tps']:.1f} | "
            f"{row['speedup']:.1f}x | {'yes' if row['same_tokens'] else 'NO'} |"
        )
    lines += ["", f"kvforge paths agree on every prompt: {'yes' if results['kvforge_paths_agree'] else 'NO'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="bundled name, local directory or hub id")
    p.add_argument("--prompt-lengths", default="64,256,1024", help="comma-separated prompt lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2, help="runs of each cached path (median reported)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.prompt_lengths.split(",") if x.strip()]
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is measured after the first token)")
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    settings = {"model": args.model, "prompt_lengths": lengths, "new_tokens": args.new_tokens,
                "repeats": args.repeats}
    name = folder_name("cache_vs_nocache", settings, args.model, "p" + "-".join(map(str, lengths)),
                      f"n{args.new_tokens}", f"r{args.repeats}", f"t{torch.get_num_threads()}")
    record = Results(args.out, name, settings)
    model, tok = load_model(args.model)
    text = load_text("pydoc", "eval")
    all_ids = encode(tok, text[: max(lengths) * 10])
    if all_ids.shape[1] < max(lengths):
        p.error(f"the text has only {all_ids.shape[1]} tokens")

    # warm-up: first calls allocate and pick kernels
    warm = all_ids[:, :16]
    for path in PATHS:
        measure(model, tok, warm, 4, path, 1)

    rows, agree_all = [], True
    for n in lengths:
        ids = all_ids[:, :n]
        res = {path: measure(model, tok, ids, args.new_tokens, path, 1 if path == BASELINE else args.repeats)
               for path in PATHS}
        base = res[BASELINE]
        for path in PATHS:
            r = res[path]
            same = r["tokens"] == base["tokens"]
            if path.startswith("kvforge"):
                agree_all &= same and r["same_tokens_across_repeats"]
            rows.append({"prompt_tokens": n, "path": path, **r, "speedup": r["decode_tps"] / base["decode_tps"],
                         "same_tokens": same})
            print(f"  {n:>5} tokens  {path:<28} {r['decode_tps']:8.1f} tok/s  "
                  f"{r['decode_tps'] / base['decode_tps']:6.1f}x  same={same}", file=sys.stderr)

    results = {"fingerprint": kvforge.fingerprint(model), "rows": rows, "kvforge_paths_agree": agree_all}
    md = markdown(results, record.meta)
    print(md)
    record.write_table(md, **results)
    record.announce()
    if not agree_all:
        print("warning: the kvforge paths picked different greedy tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
