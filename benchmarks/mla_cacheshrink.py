"""cacheshrink (the peer in ``kvforge[peers]``) against ``kvforge.mla`` at 2x, 4x and 8x fewer KV bytes, on one
protocol, training-free, in one run.

Protocol (exactly ``benchmarks/mla.py``'s): decode-faithful perplexity (``kvforge.eval.perplexity``: 4 windows
of the pydoc eval split, 512 tokens prefilled, 512 scored in chunks of 32, every chunk attending to the
stored past), calibration on 32 pieces of 2,200 characters of the calibration split (never the eval text),
float32 model on CPU. cacheshrink runs ``convert_to_mla(<the bundled model's directory>,
compression_ratio=R, compression_method="separate" (its default and recommended method),
calibration_texts=<the same pieces>)``; kvforge runs ``convert(model, tok, ratio=R, method="joint",
calibration=<the same pieces>)``. Both kvforge columns and cacheshrink columns are measured here.

Bytes: "KV numbers per token" is what the cache actually holds after a prefill, summed over all layers
(the original holds 2 x 3 KV heads x 64 = 384 per layer, 11,520 in all); the measured ratio is the
original's over that (for kvforge: ``kvforge.mla.compression``), i.e. bytes at any common element size.

cacheshrink variants, each row saying which run-time patches it had (monkeypatches applied from this script
only; nothing of cacheshrink is copied into kvforge):
- ``as published``: nothing changed. It runs, but under transformers >= 5.24 the decoder layer hands attention
  the cache as ``cache=`` while cacheshrink's adapter reads ``past_key_values`` (``cache`` lands in its
  ``**kwargs``): the cache stays empty and every 32-token chunk attends only to itself;
- ``cache arg``: each converted layer's ``forward`` gets the cache under the old name (``--intermediate`` adds
  the row with only this patch: the state FINDINGS measured as "as published" on older transformers);
- ``rope base``: cacheshrink reads ``config.rope_theta``, which transformers 5 configs no longer have (it is in
  ``config.rope_parameters``), falls back to 10000 (SmolLM2: 100000) and re-rotates every cached key with it
  once a past exists (queries use the model's own cos/sin). The patch sets each converted layer's rotary base
  from ``config.rope_parameters`` and checks its frequencies against the model's own ``rotary_emb.inv_freq``.
  Neither this nor ``cache arg`` changes a weight, so both are applied to the same converted model after the
  as-published evaluation. With both, ``--ratios 1`` reproduces the original exactly (measured: 9.5137 and
  9.5137 on one window), which is the check that the patches are right and complete;
- ``normalised calibration`` (on by default; ``--no-norm-calibration``): calibrates on what k_proj/v_proj
  actually receive (the layer input after ``input_layernorm``) instead of the residual stream, by handing
  cacheshrink's own collector the attention modules instead of the decoder layers; not needed to run, it is
  cacheshrink's best case here;
- ``offline`` (only when ``import datasets`` fails; cacheshrink imports it even when texts are passed): a stub
  ``datasets`` module, so that calibration on the passed texts runs without the hub.
cacheshrink's calibration activations for one capture point are collected once and reused across ratios
(memoised; they do not depend on the ratio). Fine-tuning is not compared (see the notes under the table).

    python benchmarks/mla_cacheshrink.py                       # smollm2-135m, 2x/4x/8x, ~20-30 min on 2 cores
    python benchmarks/mla_cacheshrink.py --ratios 1 --windows 1   # the patches' exactness check
    python benchmarks/mla_cacheshrink.py --render benchmarks/results/mla-cacheshrink-smollm2-135m_.../results.json

Each run writes a new folder under ``--out`` (default benchmarks/results), named after its settings and never
overwritten (``kvforge.results``): ``results.json`` and ``results.md``, rewritten after every row within the
run's own folder (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
import traceback
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: measure what runs offline
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from kvforge import load_model, run  # noqa: E402
from kvforge.eval import perplexity  # noqa: E402
from kvforge.mla import compression, convert  # noqa: E402
from kvforge.models import resolve  # noqa: E402
from kvforge.peers.cacheshrink import (
    cacheshrink_convert,
    datasets_importable,
    patch_cache_arg,
    patch_offline,
    patch_rope,
)
from kvforge.peers.cacheshrink import (  # noqa: E402
    error_text as _err,
)
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.run import token_windows  # noqa: E402
from kvforge.texts import load_text, text_pieces  # noqa: E402


@torch.inference_mode()
def kv_numbers_per_token(model, ids: torch.Tensor) -> tuple[int, str]:
    """Numbers the cache holds per token after a prefill of ``ids`` (all layers, keys and values), and dtype."""
    cache = run.new_cache(model, "dynamic")
    run.prefill(model, ids, cache)
    n, dtypes = 0, set()
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                n += t.numel()
                dtypes.add(str(t.dtype).replace("torch.", ""))
    return n // ids.shape[1], ",".join(sorted(dtypes))


def render(meta: dict) -> str:
    """The markdown table (and notes) of one run's JSON."""
    order = {"original": 0, "cacheshrink": 1, "kvforge": 2}
    rows = sorted(meta["rows"], key=lambda r: (r["target"], order.get(r["system"].split()[0], 3)))
    ref = next((r["ppl"] for r in rows if r["system"] == "original"), None)
    lines = [f"# cacheshrink vs kvforge.mla on {meta['model']}, training-free (decode-faithful PPL, {meta['windows']} "
             f"windows x 512 prefilled + 512 scored in chunks of 32; calibration: {meta['calibration_pieces']} pieces "
             "of the pydoc calibration split, the same for both)", "",
             "| target | system | run-time patches to cacheshrink | KV numbers / token (all layers) | measured ratio | "
             "PPL | vs original |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r and "ppl" not in r:
            ppl, rel = f"did not run: `{r['error']}`", ""
        else:
            ppl, rel = f"{r['ppl']:.3f}", f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref else ""
        nums = f"{r['numbers']:,}" if "numbers" in r else ""
        ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else ("cache empty" if r.get("numbers") == 0 else "")
        tgt = "-" if r["target"] == 1 else f"{r['target']:g}x"
        lines.append(f"| {tgt} | {r['system']} | {r['patches']} | {nums} | {ratio} | {ppl} | {rel} |")
    verdicts = []
    for t in sorted({r["target"] for r in rows if r["target"] != 1}):
        kv = [r["ppl"] for r in rows if r["target"] == t and r["system"].startswith("kvforge") and "ppl" in r]
        cs = [r["ppl"] for r in rows if r["target"] == t and r["system"].startswith("cacheshrink") and "ppl" in r
              and r.get("numbers")]  # rows whose cache holds the past
        if kv and cs:
            verdicts.append(f"{t:g}x: kvforge {kv[0]:.2f} vs best cacheshrink {min(cs):.2f} "
                            f"({'lower' if kv[0] < min(cs) else 'NOT lower'})")
    err = meta.get("datasets_import_error")
    lines += ["", "Lowest perplexity at the same bytes, kvforge joint against the best cacheshrink row that keeps a past: "
              + "; ".join(verdicts) + ".", "",
              f"cacheshrink {meta['cacheshrink_version']}, method `{meta['cacheshrink_method']}` (its default), on "
              f"transformers {meta.get('transformers') or meta.get('transformers_version', '?')}; kvforge method `joint`. Run-time patches "
              "(monkeypatches from this script, see its docstring):",
              "- `cache arg`: transformers 5.24 hands attention the cache as `cache=`, cacheshrink's adapter reads "
              "`past_key_values`, so as published its cache stays empty (0 numbers per token) and every 32-token "
              "chunk attends only to itself: the as-published row is a model without its 512-token past, not a "
              "compressed cache;",
              "- `rope base`: cacheshrink reads `config.rope_theta` (gone in transformers 5, now "
              "`config.rope_parameters`) and falls back to 10000 (the model uses 100000) when it re-rotates cached "
              "keys; the patch sets the model's base and checks the frequencies against its `rotary_emb`;",
              "- `normalised calibration`: cacheshrink calibrates on the residual stream before `input_layernorm`; "
              "this row calibrates on what k_proj/v_proj receive (not needed to run; its best case);",
              "- `offline`: a stub `datasets` module. " + (f"`import datasets` failed here: `{err}`." if err else
                                                          "Not needed here: `datasets` (a dependency of cacheshrink) "
                                                          "imports offline and `load_dataset` is only called when no "
                                                          "calibration texts are passed."),
              "",
              "Fine-tuning (cacheshrink's `MLATrainer`) not compared: not run here (shared 2-core CPU; kvforge's own "
              "distillation needs about an hour on it).",
              f"Run time {meta['seconds'] / 60:.1f} min, {meta.get('threads', meta.get('torch_threads'))} torch threads, "
              f"{meta.get('started') or meta.get('created')}."]
    if meta.get("note"):
        lines.append(meta["note"])
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--method", default="separate", help="cacheshrink's compression_method (default: its default)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--calibration-pieces", type=int, default=32)
    ap.add_argument("--no-norm-calibration", dest="norm_calibration", action="store_false",
                    help="skip the cacheshrink variant calibrated on k_proj's input")
    ap.add_argument("--intermediate", action="store_true", help="also the row with only the cache-argument patch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--render", type=Path, help="only re-render the table of a saved JSON (next to it)")
    args = ap.parse_args(argv)
    if args.render:
        text = render(json.loads(args.render.read_text()))
        print(text)
        args.render.with_suffix(".md").write_text(text + "\n")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "render")}
    name = folder_name(f"mla-cacheshrink-{args.model}", settings, "r" + args.ratios.replace(",", "-"),
                      args.method, f"w{args.windows}", f"cal{args.calibration_pieces}")
    record = Results(args.out, name, settings)
    import cacheshrink

    base, tok = load_model(args.model)
    path = resolve(args.model)
    ratios = [float(r) for r in args.ratios.split(",")]
    cal = text_pieces(load_text("pydoc", "calibration"), args.calibration_pieces, 2200)
    windows = token_windows(tok, load_text("pydoc", "eval"), args.windows, 1024)
    probe = windows[0][:, :64]
    full, _ = kv_numbers_per_token(base, probe)
    rows: list[dict] = []

    def save() -> str:
        """Write the JSON and the table so far, into this run's folder (after every row: a run cut short keeps
        what it measured)."""
        written = record.write_json("results.json", {
            "model": args.model, "rows": rows, "cacheshrink_version": cacheshrink.__version__,
            "cacheshrink_method": args.method, "datasets_import_error": offline_error, "windows": args.windows,
            "calibration_pieces": len(cal)})
        text = render(json.loads(written.read_text()))  # the table of what was written, as --render makes it
        record.write_text("results.md", text)
        return text

    offline_error = datasets_importable()
    if offline_error:
        print(f"import datasets fails: {offline_error}", flush=True)

    published: dict = {}

    def run_cacheshrink(ratio: float, label: str, norm_input: bool) -> None:
        patches = (["offline"] if offline_error and label != "as published" else [])
        row = {"target": ratio, "system": f"cacheshrink {cacheshrink.__version__} {args.method}"}
        info: dict = {}
        if label == "as published" and offline_error:  # show the failure as published, then run with the stub
            if "failure" not in published:  # once: after the stub is installed it would run
                try:
                    cacheshrink_convert(path, ratio, args.method, cal, norm_input)
                    published["failure"] = None
                except Exception as e:  # noqa: BLE001
                    published["failure"] = _err(e)
                patch_offline()
            rows.append({**row, "patches": "none (as published)", "error": published["failure"] or "ran"})
            print(f"cacheshrink {ratio:g}x as published: {published['failure']}", flush=True)
            patches = ["offline"]
        t = time.perf_counter()
        try:
            m = cacheshrink_convert(path, ratio, args.method, cal, norm_input)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows.append({**row, "patches": label, "error": _err(e)})
            return
        conv_s = time.perf_counter() - t
        steps = [(["cache arg"], patch_cache_arg), (["rope base"], patch_rope)]
        if label == "as published":
            evals = [([], None)] + ([(["cache arg"], None)] if args.intermediate else []) + [
                (["cache arg", "rope base"], None)]
        else:
            evals = [(["cache arg", "rope base", "normalised calibration"], None)]
        done: list[str] = []
        for names, _ in evals:
            for pname, fix in steps:  # apply every patch this row names that the model does not have yet
                if pname[0] in names and pname[0] not in done:
                    info[pname[0]] = fix(m)
                    done.append(pname[0])
            plabel = ", ".join(patches + names) or "none (as published)"
            numbers, dtype = kv_numbers_per_token(m, probe)
            t = time.perf_counter()
            try:
                r = perplexity(m, tok, windows=windows, show_progress=False)
                res = {"ppl": r.ppl, "ppl_bytes_per_token": r.bytes_per_token}
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res = {"error": _err(e)}
            rows.append({**row, "patches": plabel, "numbers": numbers, "cache_dtype": dtype,
                         "ratio": full / numbers if numbers else None, "convert_seconds": conv_s,
                         "eval_seconds": time.perf_counter() - t, "patch_info": dict(info), **res})
            print(f"cacheshrink {ratio:g}x [{plabel}]: {numbers} numbers/token, PPL {res.get('ppl', float('nan')):.4f} "
                  f"{res.get('error', '')} (convert {conv_s:.0f}s, eval {time.perf_counter() - t:.0f}s)", flush=True)
        del m
        gc.collect()

    for ratio in ratios:  # what the comparison needs first; the original and cacheshrink's best case after
        run_cacheshrink(ratio, "as published", False)
        save()
        m = copy.deepcopy(base)
        t = time.perf_counter()
        convert(m, tok, ratio=ratio, method="joint", calibration=cal)
        conv_s = time.perf_counter() - t
        numbers, dtype = kv_numbers_per_token(m, probe)
        r = perplexity(m, tok, windows=windows, show_progress=False)
        rows.append({"target": ratio, "system": "kvforge joint", "patches": "", "numbers": numbers, "cache_dtype": dtype,
                     "ratio": compression(m), "ppl": r.ppl, "ppl_bytes_per_token": r.bytes_per_token,
                     "convert_seconds": conv_s})
        print(f"kvforge joint {ratio:g}x: {numbers} numbers/token ({compression(m):.2f}x), PPL {r.ppl:.4f}", flush=True)
        del m
        gc.collect()
        save()
    ref = perplexity(base, tok, windows=windows, show_progress=False)
    print(f"original: {full} KV numbers/token, PPL {ref.ppl:.4f}", flush=True)
    rows.append({"target": 1.0, "system": "original", "patches": "", "numbers": full, "ratio": 1.0, "ppl": ref.ppl})
    save()
    if args.norm_calibration:
        for ratio in ratios:
            run_cacheshrink(ratio, "patched + normalised calibration", True)
            save()
    print(save())
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
