"""Post-hoc MLA conversion on a bundled model: quality per method and compression, and decode speed on the
latents against decompress-every-step.

Quality: decode-faithful perplexity (``kvforge.eval.perplexity``: windows of the pydoc eval split, 512
tokens prefilled, 512 scored in chunks of 32), calibration on the calibration split (never overlapping).
"KV bytes" is the cache's numbers per token at 2 bytes each, against the original model's fp16 keys and
values. Ratio 1 checks exactness: the same perplexity and the same greedy tokens as the original.
Speed: ms per decode step after 1k, 4k and 8k tokens of context, attention on the latents (absorbed
up-projections) vs rebuilding past keys and values every step, same model and cache; extra memory is the
most memory one decode step holds at once beyond the cache and model, summed allocation by allocation
from torch's profiler (``profile_memory``; the process's resident peak cannot see it: malloc reuses the
prefill's freed blocks).

    python benchmarks/mla.py                                     # smollm2-135m
    python benchmarks/mla.py --finetuned DIR                     # add a fine-tuned directory's row
    python benchmarks/mla.py --configs decoupled_rope:4 --speed-only --name mla-speed-smollm2-135m  # speed only

Each run writes a new folder under ``--out`` (default benchmarks/results), named ``--name`` (default
``mla-MODEL``) plus its settings and never overwritten (``kvforge.results``): ``results.md`` and
``results.json`` (the run's metadata, rows, composed rows and speed).
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402

from kvforge import generate, load_model, run  # noqa: E402
from kvforge.eval import perplexity  # noqa: E402
from kvforge.mla import compression, convert  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.run import token_windows  # noqa: E402
from kvforge.texts import load_text, text_pieces  # noqa: E402

# (method, ratio, rotary pairs kept per KV head for decoupled_rope; None: the default, head_dim / 16)
CONFIGS = [("joint", 1.0, None), ("separate", 2.0, None), ("joint", 2.0, None), ("decoupled_rope", 2.0, None),
           ("decoupled_rope", 2.0, 16), ("joint", 4.0, None), ("decoupled_rope", 4.0, None),
           ("decoupled_rope", 4.0, 8), ("joint", 8.0, None)]
PROMPT = "The history of the Python programming language begins"
# MLA and quantization together: a joint conversion (latent widths multiples of 8, so that any bit width
# packs) with quantized latents, against kvforge's 2-bit caches on the original model. Latents are
# quantized per channel (KIVI's key layout) without rotation: SVD latents have no outlier channels to
# spread, and one rotation matrix per latent width would be bytes the cache holds.
COMBO_RATIO = 2.0
COMBO_CACHES = ["kvforge-quant:preset=safe,rotate=none,fused=off",
                "kvforge-quant:key_bits=3,value_bits=3,key_group=32,rotate=none,fused=off"]
QUANT_BASELINES = ["kvforge-quant:preset=2bit", "kvforge-quant:preset=aggressive"]


def extra_peak_bytes(fn) -> int:
    """The working memory of ``fn()``: the most it holds at once beyond what existed before and what it
    leaves behind (the cache's growth), from every CPU allocation and free in the profiler's memory
    timeline (per allocation, unlike the process's resident peak, which malloc's reuse of freed blocks
    hides)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _t, action, _key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak - max(live, 0)  # what is still held afterwards is the cache's own growth, not working memory


def _mib(n: int | None) -> str:
    return "not measured" if n is None else f"{n / 2**20:.1f} MiB"


@torch.inference_mode()
def decode_speed(model, ids: torch.Tensor, lengths=(1024, 4096, 8192), steps: int = 8) -> list[dict]:
    """Per context length: ms per decode step, absorbed vs decompressing; then the extra peak memory of
    one step of each (:func:`extra_peak_bytes`)."""

    def steps_from(cache, n: int, count: int) -> None:
        tok = ids[:, n:n + 1]
        for i in range(count):
            run.forward(model, tok, cache, start=n + i, logits_to_keep=1)
        for layer in cache.layers:  # drop the decode steps' tokens again
            layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]

    def set_absorb(on: bool) -> None:
        for layer in model.model.layers:
            layer.self_attn.absorb = on

    rows, caches = [], {}
    for n in lengths:
        cache = caches[n] = run.new_cache(model, "dynamic")
        run.prefill(model, ids[:, :n], cache, chunk_size=512)  # chunked: bounds the attention scores' memory
        row = {"context": n}
        for absorb in (True, False):
            set_absorb(absorb)
            t = time.perf_counter()
            steps_from(cache, n, steps)
            row["absorbed" if absorb else "decompressed"] = {"ms_per_token": 1000 * (time.perf_counter() - t) / steps}
        rows.append(row)
        print(f"context {n}: absorbed {row['absorbed']['ms_per_token']:.1f} ms/token, decompressed "
              f"{row['decompressed']['ms_per_token']:.1f} ms/token", flush=True)
    for row in rows:  # memory after the timings: the profiler slows the steps it watches
        n = row["context"]
        for absorb in (True, False):
            set_absorb(absorb)
            row["absorbed" if absorb else "decompressed"]["extra_peak_bytes"] = extra_peak_bytes(
                lambda n=n: steps_from(caches[n], n, 1))
        print(f"context {n}: extra peak memory absorbed {row['absorbed']['extra_peak_bytes']}, decompressed "
              f"{row['decompressed']['extra_peak_bytes']} bytes", flush=True)
    set_absorb(True)
    return rows


def composed(base, tok, windows, cal, name: str) -> list[dict]:
    """Quantized latents (a joint conversion under each of ``COMBO_CACHES``) and the 2-bit caches of the
    original model, on the same windows; bytes measured from the caches."""
    from kvforge.mla import kv_bytes_per_token

    fp16 = kv_bytes_per_token(base)
    m = copy.deepcopy(base)
    convert(m, tok, ratio=COMBO_RATIO, method="joint", calibration=cal, name=name, rank_multiple=8)
    out = []
    for model, label, specs in ((m, f"joint {COMBO_RATIO:g}x", ["dynamic"] + COMBO_CACHES),
                                (base, "original", QUANT_BASELINES)):
        for spec in specs:
            r = perplexity(model, tok, cache=spec, windows=windows, show_progress=False)
            held = kv_bytes_per_token(model) if spec == "dynamic" else r.bytes_per_token  # fp16 numbers
            out.append({"model": label, "cache": spec if spec != "dynamic" else "fp16 latents", "ppl": r.ppl,
                        "bytes_per_token": held, "x_fp16": fp16 / held})
            print(f"{label} + {spec}: {fp16 / held:.2f}x fp16, PPL {r.ppl:.4f}", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calibration-pieces", type=int, default=32)
    ap.add_argument("--configs", help="method:ratio[:pairs],... (default: a grid over methods and 1/2/4/8x; "
                    "'none': only the composed rows and --finetuned)")
    ap.add_argument("--finetuned", type=Path, action="append", default=[], help="converted directories to add")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--no-combos", action="store_true", help="skip MLA + quantization")
    ap.add_argument("--speed-only", action="store_true", help="only the decode timing, on the first config")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", help="results folder name, before its settings (default mla-MODEL)")
    args = ap.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    name = folder_name(args.name or f"mla-{args.model}", settings, f"w{args.windows}",
                      f"cal{args.calibration_pieces}", "speed-only" if args.speed_only else None)
    record = Results(args.out, name, settings)
    torch.manual_seed(0)
    base, tok = load_model(args.model)
    configs = CONFIGS if not args.configs else [] if args.configs == "none" else [
        (c.split(":")[0], float(c.split(":")[1]), int(c.split(":")[2]) if c.count(":") == 2 else None)
        for c in args.configs.split(",")]
    cal = text_pieces(load_text("pydoc", "calibration"), args.calibration_pieces, 2200)
    windows = token_windows(tok, load_text("pydoc", "eval"), args.windows, 1024)
    rows = []
    if not args.speed_only:
        ref = perplexity(base, tok, windows=windows, show_progress=False)
        ref_tokens = generate(base, tok, PROMPT, max_new_tokens=32, stop_at_eos=False).token_ids
        print(f"original: PPL {ref.ppl:.4f}", flush=True)
        rows = [{"label": "original", "ratio": 1.0, "ppl": ref.ppl, "same_greedy": True}]
    speed_model = None
    for method, ratio, pairs in configs:
        m = copy.deepcopy(base)
        t = time.perf_counter()
        if ratio == 1 and method == "decoupled_rope":
            pairs = m.config.head_dim // 2
        try:
            cfg = convert(m, tok, ratio=ratio if ratio > 1 else None, rank=10**6 if ratio == 1 else None,
                          method=method, calibration=cal, name=args.model, rope_pairs=pairs)
        except ValueError as e:  # e.g. the kept rotary dims alone exceed the budget
            print(f"{method} {ratio:g}x pairs={pairs}: not possible ({e})", flush=True)
            continue
        conv_s = time.perf_counter() - t
        if args.speed_only:
            speed_model = m
            break
        r = perplexity(m, tok, windows=windows, show_progress=False)
        same = generate(m, tok, PROMPT, max_new_tokens=32, stop_at_eos=False).token_ids == ref_tokens
        energy = [sum(e.values()) / len(e) for e in cfg.retained_energy]
        kept = f", {len(cfg.kept_pairs[0][0])} rotary pairs kept" if method == "decoupled_rope" else ""
        row = {"label": f"{method} {ratio:g}x{kept}", "method": method, "ratio": compression(m), "ppl": r.ppl,
               "same_greedy": same, "convert_seconds": conv_s, "energy_min": min(energy),
               "energy_mean": sum(energy) / len(energy)}
        rows.append(row)
        print(f"{row['label']}: {row['ratio']:.2f}x, PPL {r.ppl:.4f} ({100 * (r.ppl / ref.ppl - 1):+.1f}%), "
              f"same greedy {same}, convert {conv_s:.0f}s", flush=True)
        if method == "decoupled_rope" and ratio == 4.0 and speed_model is None:
            speed_model = m
        else:
            del m
    for d in args.finetuned:
        m, _ = load_model(str(d))
        r = perplexity(m, tok, windows=windows, show_progress=False)
        rows.append({"label": f"finetuned {d.name}", "ratio": compression(m), "ppl": r.ppl,
                     "same_greedy": None, "finetune": m.kvforge_mla.finetune})
        print(f"{d}: {compression(m):.2f}x, PPL {r.ppl:.4f}", flush=True)
    combos = [] if args.no_combos or args.speed_only else composed(base, tok, windows, cal, args.model)
    speed = []
    if not args.no_speed and speed_model is not None:
        ids = token_windows(tok, load_text("pydoc", "eval"), 1, 8192 + 16)[0]
        speed = decode_speed(speed_model, ids)

    lines = [f"# MLA conversion of {args.model} (training-free unless marked; decode-faithful PPL, {args.windows} "
             "windows x 512 prefilled + 512 scored in chunks of 32)", ""]
    if rows:
        lines += ["| conversion | KV bytes vs fp16 | PPL | vs original | same greedy tokens | retained energy "
                  "(min / mean) |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = f"{r['energy_min']:.3f} / {r['energy_mean']:.3f}" if "energy_min" in r else ""
        same = "" if r["same_greedy"] is None else ("yes" if r["same_greedy"] else "no")
        lines.append(f"| {r['label']} | 1/{r['ratio']:.2f} | {r['ppl']:.3f} | {100 * (r['ppl'] / ref.ppl - 1):+.1f}% "
                     f"| {same} | {e} |")
    if combos:
        lines += ["", f"MLA and quantization together (joint {COMBO_RATIO:g}x, latent widths multiples of 8) against "
                  "kvforge's 2-bit caches on the original model; bytes are those the cache holds after 1,024 tokens "
                  "(`cache_nbytes`), against the original's fp16 keys and values:", "",
                  "| model | cache | B/token held | x fp16 | PPL | vs original |", "|---|---|---|---|---|---|"]
        for c in combos:
            lines.append(f"| {c['model']} | {c['cache']} | {c['bytes_per_token']:,.0f} | {c['x_fp16']:.2f}x | "
                         f"{c['ppl']:.3f} | {100 * (c['ppl'] / ref.ppl - 1):+.1f}% |")
    if speed:
        lines += ["", "Decode on the latents (decoupled_rope 4x, same model and cache) vs rebuilding past keys and "
                  "values every step:", "",
                  "| context | absorbed ms/token | decompressed ms/token | speed-up | absorbed extra peak | "
                  "decompressed extra peak |", "|---|---|---|---|---|---|"]
        for s in speed:
            a, d = s["absorbed"], s["decompressed"]
            lines.append(f"| {s['context']} | {a['ms_per_token']:.1f} | {d['ms_per_token']:.1f} | "
                         f"{d['ms_per_token'] / a['ms_per_token']:.2f}x | {_mib(a['extra_peak_bytes'])} | "
                         f"{_mib(d['extra_peak_bytes'])} |")
    text = "\n".join(lines)
    print(text)
    record.write_table(text, rows=rows, combos=combos, speed=speed)
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
