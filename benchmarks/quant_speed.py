"""Speed of kvforge's quantized caches against the full-precision cache they replace (``quant.py --speed``).

Decode: ms per greedy decode step at several context lengths (default 2k, 8k, 16k, 32k tokens) for
``dynamic`` and each quantized spec, every ratio against ``dynamic`` measured in the same run. The context
is prefilled once per model into a DynamicCache, growing from one length to the next; at each length every
spec gets a fresh cache holding that context (imported from the dynamic cache's state: the codes a prefill
would have written) and the specs' decode runs are interleaved, ``--repeats`` times, best of each kept, so
that drift of the machine hits every spec alike.

Prefill and memory (one fresh subprocess per measurement, so peaks are not polluted by earlier work): time
to prefill ``--prefill`` tokens (default 2k and 8k) in one call, the peak resident memory above what the
process held before it, and the extra working memory of a decode step at that length (peak resident memory
during 8 decode steps above the resident memory before them, less the cache's own growth). Peak memory is
read from ``/proc/self/status`` (VmHWM, reset through ``/proc/self/clear_refs``): Linux only.

    python benchmarks/quant.py --speed                                   # both bundled models, ~25 min on 2 cores
    python benchmarks/quant.py --speed --model smollm2-135m --contexts 2048,8192 --no-prefill

A spec ending in ``@torch`` runs with the compiled kernel off (``KVFORGE_CPU_KERNEL=0``: the PyTorch path on
the codes), for contexts up to ``--torch-max``. Each run writes a new folder under ``--out`` (never
overwritten): ``results.md``, ``results.json`` and ``decode.png`` (ms/token against context length).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import torch  # noqa: E402

from kvforge import KVState, load_model, run  # noqa: E402
from kvforge.plots import plot_lines  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.specs import cache_nbytes  # noqa: E402
from kvforge.texts import load_text  # noqa: E402

PRESETS = ("safe", "balanced", "2bit")
TORCH = "@torch"


def _spec(name: str) -> tuple[str, bool]:
    """A short name (a preset, ``dynamic``) or a full spec -> (spec, kernel on)."""
    torch_path = name.endswith(TORCH)
    name = name.removesuffix(TORCH)
    spec = f"kvforge-quant:preset={name}" if name in (*PRESETS, "compact", "aggressive") else name
    return spec, not torch_path


def _kernel(on: bool) -> None:
    if on:
        os.environ.pop("KVFORGE_CPU_KERNEL", None)
    else:
        os.environ["KVFORGE_CPU_KERNEL"] = "0"


def _tokens(tok, n: int) -> torch.Tensor:
    """``n`` token ids of English text (the pydoc text, repeated if it is shorter)."""
    ids = run.encode(tok, load_text("pydoc", "eval") + "\n\n" + load_text("pydoc", "calibration"))
    while ids.shape[1] < n:
        ids = torch.cat([ids, ids], 1)
    return ids[:, :n]


# ------------------------------------------------------------------------------------------------ memory
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> int:
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


@torch.inference_mode()
def probe(model_name: str, name: str, n: int) -> dict:
    """Run in a fresh process: prefill time and peak memory for ``n`` tokens, then a decode step's extra memory."""
    spec, kernel = _spec(name)
    _kernel(kernel)
    model, tok = load_model(model_name)
    ids = _tokens(tok, n)
    warm = run.new_cache(model, spec)  # first-call costs (kernels, compilation) are not the prefill's
    run.decode(model, warm, run.prefill(model, ids[:, :256], warm), 3, log_probs=False)
    del warm
    cache = run.new_cache(model, spec)
    before = _reset_peak()
    t = time.perf_counter()
    logits = run.prefill(model, ids, cache)
    seconds = time.perf_counter() - t
    peak = _status("VmHWM") - before
    held = cache_nbytes(cache)
    before = _reset_peak()
    run.decode(model, cache, logits, 9, log_probs=False)
    step_extra = _status("VmHWM") - before - (cache_nbytes(cache) - held)
    return {"seconds": seconds, "peak_bytes": peak, "cache_bytes": held, "decode_extra_bytes": max(step_extra, 0)}


def run_probe(model_name: str, name: str, n: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--probe", model_name, name, str(n), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"probe {name} {n} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ decode
@torch.inference_mode()
def decode_curve(model_name: str, names: list[str], contexts: list[int], new_tokens: int, repeats: int,
                 torch_max: int) -> list[dict]:
    model, tok = load_model(model_name)
    ids = _tokens(tok, max(contexts))
    dyn = run.new_cache(model, "dynamic")
    rows, seen = [], 0
    for ctx in sorted(contexts):
        logits = run.prefill(model, ids[:, seen:ctx], dyn, start=seen, chunk_size=4096)
        seen = ctx
        state = KVState.from_cache(dyn, model, ids[:, :ctx])
        todo = [n for n in names if not (n.endswith(TORCH) and ctx > torch_max)]
        caches = {}
        for n in todo:
            spec, kernel = _spec(n)
            caches[n] = state.to_cache(model, run.new_cache(model, spec), check=False)
        best: dict[str, float] = {}
        for _ in range(repeats):
            for n in todo:
                _kernel(_spec(n)[1])
                t = time.perf_counter()
                run.decode(model, caches[n], logits, new_tokens + 1, log_probs=False)
                ms = 1000 * (time.perf_counter() - t) / new_tokens
                best[n] = min(best.get(n, ms), ms)
        _kernel(True)
        for n in todo:
            rows.append({"model": model_name, "context": ctx, "cache": n, "ms_per_token": best[n],
                         "x_dynamic": best[n] / best["dynamic"], "bytes": cache_nbytes(caches[n])})
            print(f"{model_name} {ctx:>6} {n:<24} {best[n]:8.1f} ms/token  x{best[n] / best['dynamic']:.2f}", flush=True)
        del caches, state
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--caches", default=",".join(PRESETS), help="presets or specs (dynamic is always added); "
                    "a name ending in @torch runs with the compiled kernel off")
    ap.add_argument("--contexts", default="2048,8192,16384,32768")
    ap.add_argument("--prefill", default="2048,8192", help="prompt lengths for the prefill/memory probes")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-max", type=int, default=8192, help="longest context for @torch specs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--probe", nargs=3, metavar=("MODEL", "CACHE", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        m, name, n = args.probe
        print(json.dumps(probe(m, name, int(n))))
        return 0
    models = args.model.split(",")
    names = list(dict.fromkeys(["dynamic", *args.caches.split(",")]))
    contexts = [int(c) for c in args.contexts.split(",")]
    prefill = [] if args.no_prefill else [int(c) for c in args.prefill.split(",")]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "probe")}
    record = Results(args.out, folder_name("quant-speed", settings, *models, f"c{max(contexts)}", f"t{args.threads}"),
                     settings)

    decode_rows, prefill_rows = [], []
    for m in models:
        decode_rows += decode_curve(m, names, contexts, args.new_tokens, args.repeats, args.torch_max)
        record.write_json("partial.json", {"decode": decode_rows})
    for m in models:
        for n in prefill:
            base = None
            for name in names:
                r = run_probe(m, name, n, args.threads)
                base = base or r
                prefill_rows.append({"model": m, "tokens": n, "cache": name, **r,
                                     "x_time": r["seconds"] / base["seconds"], "x_peak": r["peak_bytes"] / base["peak_bytes"]})
                print(f"prefill {m} {n} {name}: {r['seconds']:.1f} s x{prefill_rows[-1]['x_time']:.2f}, peak "
                      f"{r['peak_bytes'] / 2**20:.0f} MiB x{prefill_rows[-1]['x_peak']:.2f}", flush=True)
        record.write_json("partial.json", {"decode": decode_rows, "prefill": prefill_rows})

    lines = [f"# Decode and prefill speed of quantized caches ({', '.join(models)})", "",
             f"Decode: ms per greedy step, best of {args.repeats} interleaved runs of {args.new_tokens} steps, "
             f"{args.threads} threads; the ratio divides by `dynamic` (float32 keys/values) at the same context in "
             "this run. `@torch`: the compiled kernel off.", ""]
    for m in models:
        mine = [r for r in decode_rows if r["model"] == m]
        ctxs = sorted({r["context"] for r in mine})
        lines += [f"## {m}: decode ms/token (x dynamic)", "", "| cache | " + " | ".join(f"{c:,}" for c in ctxs) + " |",
                  "|---|" + "---|" * len(ctxs)]
        for name in names:
            cells = []
            for c in ctxs:
                r = next((r for r in mine if r["cache"] == name and r["context"] == c), None)
                cells.append("" if r is None else f"{r['ms_per_token']:.1f} ({r['x_dynamic']:.2f}x)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        held = [r for r in mine if r["context"] == ctxs[-1]]
        lines += ["", f"Cache held at {ctxs[-1]:,} tokens: " + ", ".join(f"{r['cache']} {r['bytes'] / 2**20:.1f} MiB"
                                                                       for r in held), ""]
    if prefill_rows:
        lines += ["## Prefill in one call, and a decode step's working memory", "",
                  "| model | tokens | cache | prefill s | x dynamic | peak MiB | x dynamic | cache MiB | decode extra MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in prefill_rows:
            lines.append(f"| {r['model']} | {r['tokens']:,} | {r['cache']} | {r['seconds']:.1f} | {r['x_time']:.2f}x | "
                         f"{r['peak_bytes'] / 2**20:.0f} | {r['x_peak']:.2f}x | {r['cache_bytes'] / 2**20:.1f} | "
                         f"{r['decode_extra_bytes'] / 2**20:.1f} |")
    meta = record.meta
    lines += ["", f"torch {meta['torch']}, {meta['threads']} threads, {meta['started']}"]
    text = "\n".join(lines)
    print(text)
    panels = {m: {name: [(r["context"], r["ms_per_token"]) for r in decode_rows if r["model"] == m and r["cache"] == name]
                  for name in names} for m in models}
    plot_lines(panels, record.path("decode.png"), xlabel="context tokens", ylabel="ms per decode step",
               title="decode step time against context length")
    record.write_table(text, rows=decode_rows, prefill=prefill_rows)
    record.remove("partial.json")
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
