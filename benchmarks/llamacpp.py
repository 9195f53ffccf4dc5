"""llama.cpp as a peer for quantized-KV decode speed: its ``llama-bench`` with an f16 and a q4_0 KV cache.

Measured: ms per decode token of llama.cpp on the bundled GGUF files (the same files kvforge converts),
flash attention on, keys and values both ``f16`` and both ``q4_0`` (``--quant``), after ``--depths`` tokens
of context (llama-bench prefills them untimed, then times ``--new-tokens`` single-token decode steps;
``-p 0 -n N -d DEPTH``), ``--threads`` threads, ``-r`` repetitions (llama-bench's mean). Per depth: both
ms/token and the ratio q4_0/f16, the cost of decoding from a quantized cache in llama.cpp. Beside it,
kvforge's own ratio at the same context (its quantized cache ``--kvforge-cache`` over a DynamicCache, from
the newest ``benchmarks/quant.py`` result under ``--out`` with decode speed at that context; the model runs
float32 there, so only the ratios compare, not the milliseconds). Each depth runs f16 then the quantized
type back to back, so a ratio's two sides see the same machine load.

    make llamacpp                                   # builds llama-bench once (~5 min on 2 CPU cores)
    python benchmarks/llamacpp.py                   # both models, depths 2048,8192,16384,32768
    python benchmarks/llamacpp.py --depths 512 --model smollm2-135m -r 1     # a quick check

llama-bench is ``$KVFORGE_LLAMA_BENCH`` or else the one ``make llamacpp`` builds (kvforge's cache dir,
``~/.cache/kvforge/llama.cpp/build/bin/llama-bench``); without either the script says how to get one and
exits 0. Each run writes a new folder under ``--out`` (default benchmarks/results), named after its settings
and never overwritten (``kvforge.results``): ``results.md`` and ``results.json`` (the run's metadata, the
llama.cpp version and the llama-bench command lines, and the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from kvforge.models import BUNDLED, cache_dir
from kvforge.results import Results, folder_name, portable

ENV = "KVFORGE_LLAMA_BENCH"
BASE = "f16"
MODELS = "smollm2-135m,gemma3-270m"
DEPTHS = "2048,8192,16384,32768"
KVFORGE_CACHE = "kvforge-quant:preset=safe"  # K4/V4, the kvforge preset nearest to q4_0 keys and values
HOW_TO_GET = (f"build it with `make llamacpp` (about 5 minutes on 2 CPU cores; it goes to {{default}}) "
              f"or set {ENV} to the path of a llama-bench binary")


# ---------------------------------------------------------------------------- finding llama-bench
def default_binary() -> Path:
    """Where ``make llamacpp`` puts llama-bench (its ``LLAMACPP_DIR`` default: kvforge's cache dir)."""
    return cache_dir() / "llama.cpp" / "build" / "bin" / "llama-bench"


def find_llama_bench(environ=None) -> Path | None:
    """``$KVFORGE_LLAMA_BENCH``, else the ``make llamacpp`` build, else ``None``. A variable that names no
    executable file is an error (``FileNotFoundError``), not a silent skip."""
    environ = os.environ if environ is None else environ
    given = environ.get(ENV)
    if given:
        path = Path(given).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"{ENV}={given} is not an executable file")
        return path
    path = default_binary()
    return path if path.is_file() and os.access(path, os.X_OK) else None


def skip_message() -> str:
    return f"llamacpp benchmark skipped: no llama-bench found; {HOW_TO_GET.format(default=default_binary())}"


def version(binary: Path) -> dict:
    """What the build says of itself (``llama-bench --version``) and, for a ``make llamacpp`` build, the
    source package it came from (``kvforge-source.json`` beside ``build/``)."""
    out: dict = {}
    try:
        p = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
        text = (p.stdout + p.stderr).strip()
        out["version"] = text
        # "version: 0.6.0-dev (build 11434, commit 1a2b3c4)"; older builds: "version: 11434 (1a2b3c4)"
        m = re.search(r"\(build (\d+), commit ([^)\s]+)\)", text) or re.search(r"version: (\d+) \(([^)\s]+)\)", text)
        if m:
            out["build_number"], out["build_commit"] = int(m.group(1)), m.group(2)
    except (OSError, subprocess.SubprocessError) as e:
        out["version"] = f"unknown ({e})"
    source = binary.resolve().parent.parent.parent / "kvforge-source.json"
    if source.is_file():
        try:
            out["source"] = json.loads(source.read_text())
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------------------- running and parsing
def model_path(name: str) -> Path:
    """A bundled model's GGUF file (as kvforge finds it), or a ``.gguf`` path as given."""
    if name in BUNDLED:
        return BUNDLED[name].locate()
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise SystemExit(f"unknown model {name!r}: not a bundled model ({', '.join(BUNDLED)}) nor a .gguf file")


def bench_args(binary: Path, gguf: Path, cache_type: str, depth: int, new_tokens: int, threads: int,
               reps: int) -> list[str]:
    return [str(binary), "-m", str(gguf), "-fa", "1", "-ctk", cache_type, "-ctv", cache_type, "-t", str(threads),
            "-p", "0", "-n", str(new_tokens), "-d", str(depth), "-r", str(reps), "-o", "json"]


def parse_tests(text: str) -> list[dict]:
    """llama-bench's ``-o json`` output: a JSON list of tests (one per parameter combination)."""
    data = json.loads(text)
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(t, dict) for t in data):
        raise ValueError("llama-bench JSON is not a list of tests")
    return data


def decode_ms(tests: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """``{(type_k, type_v): {depth: {"ms": mean ms per token, "sd": its standard deviation}}}`` of the
    generation-only tests (``n_prompt`` 0): llama-bench times ``n_gen`` decode steps per repetition."""
    out: dict[tuple[str, str], dict[int, dict]] = {}
    for t in tests:
        n_gen = int(t.get("n_gen") or 0)
        if n_gen <= 0 or int(t.get("n_prompt") or 0) != 0:
            continue
        samples = t.get("samples_ns") or []
        avg = t.get("avg_ns", sum(samples) / len(samples) if samples else None)
        if avg is None:
            continue
        key = (str(t.get("type_k", BASE)), str(t.get("type_v", BASE)))
        out.setdefault(key, {})[int(t.get("n_depth") or 0)] = {
            "ms": avg / n_gen / 1e6, "sd": float(t.get("stddev_ns") or 0) / n_gen / 1e6}
    return out


# ---------------------------------------------------------------------------- kvforge's figures
_CONTEXT_KEYS = ("context", "depth", "n_depth", "prompt", "prompt_tokens")
_MS_KEYS = ("ms_per_token", "decode_ms", "ms")
_NESTED_KEYS = ("speed", "speeds", "decode", "contexts", "per_context", "by_context")


def _number(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _ms(entry) -> float | None:
    if isinstance(entry, dict):
        for k in _MS_KEYS:
            if _number(entry.get(k)) is not None:
                return float(entry[k])
        return None
    return _number(entry)


def _contexts(entry) -> dict[int, float]:
    """``{context: ms}`` of a nested speed entry: ``{"2048": ms}``, ``{"2048": {"ms": ms}}`` or a list of
    ``{"context": 2048, "ms": ms}``."""
    out: dict[int, float] = {}
    items = entry.items() if isinstance(entry, dict) else (
        ((next((e.get(k) for k in _CONTEXT_KEYS if k in e), None), e) for e in entry if isinstance(e, dict))
        if isinstance(entry, list) else ())
    for ctx, v in items:
        try:
            ctx = int(ctx)
        except (TypeError, ValueError):
            continue
        ms = _ms(v)
        if ms is not None:
            out[ctx] = ms
    return out


def _spec_name(name: str) -> str:
    """A cache name as the quant benchmarks write it, as a spec: a bare preset name (``safe``, as
    ``quant.py --speed`` writes it) is ``kvforge-quant:preset=safe``; ``dynamic`` and full specs stay."""
    return name if name == "dynamic" or ":" in name else f"kvforge-quant:preset={name}"


def kvforge_speeds(data: dict, model: str) -> dict[str, dict[int, float]]:
    """``{cache spec: {context: decode ms/token}}`` from a ``benchmarks/quant.py`` results file, or ``{}``
    when it is of other models or holds no decode speed at a known context. Tolerant of the layout: rows per
    (cache, context) with or without a ``model`` each (``quant.py --speed``), rows with a nested per-context
    speed, or one speed per cache after ``settings.prompt`` tokens (``quant.py``'s quality run)."""
    if not isinstance(data, dict):
        return {}
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    models = settings.get("model") or settings.get("models") or meta.get("model") or data.get("model")
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",")]
    if not isinstance(models, list) or model not in models:
        return {}
    prompt = settings.get("prompt", meta.get("prompt"))
    out: dict[str, dict[int, float]] = {}
    rows = next((data[k] for k in ("rows", "decode") if isinstance(data.get(k), list)), [])
    for row in rows:
        if (not isinstance(row, dict) or not isinstance(row.get("cache"), str) or "skipped" in row
                or row.get("model", model) != model):
            continue
        got = out.setdefault(_spec_name(row["cache"]), {})
        nested = next((row[k] for k in _NESTED_KEYS if isinstance(row.get(k), dict | list)), None)
        ctx = next((row[k] for k in _CONTEXT_KEYS if _number(row.get(k)) is not None), None)
        if nested is not None:
            got.update(_contexts(nested))
        elif _ms(row) is not None and (ctx is not None or _number(prompt) is not None):
            got[int(ctx if ctx is not None else prompt)] = _ms(row)
    top = data.get("speed")
    if isinstance(top, dict):  # {"speed": {spec: per-context entry}}
        for spec, entry in top.items():
            if isinstance(entry, dict | list):
                out.setdefault(_spec_name(spec), {}).update(_contexts(entry))
    return {k: v for k, v in out.items() if v}


def _started(data: dict) -> str:
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return str(data.get("started") or meta.get("created") or "")


def kvforge_ratios(root: Path, model: str, spec: str) -> dict[int, dict]:
    """``{context: {"ratio": spec ms / dynamic ms, "source": file}}`` from the newest quant results under
    ``root`` (``quant*.json``, and ``results.json`` in ``quant*`` folders: ``quant.py`` and ``quant.py --speed``)
    holding both at that context."""
    found = []
    for path in [*root.glob("quant*.json"), *root.glob("quant*/results.json")]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        speeds = kvforge_speeds(data, model)
        if "dynamic" in speeds and spec in speeds:
            found.append((_started(data), path.stat().st_mtime, path, speeds))
    out: dict[int, dict] = {}
    for _, _, path, speeds in sorted(found, key=lambda f: f[:2], reverse=True):  # newest first
        for ctx, ms in speeds[spec].items():
            base = speeds["dynamic"].get(ctx)
            if ctx not in out and base:
                out[ctx] = {"ratio": ms / base, "source": path}
    return out


# ---------------------------------------------------------------------------- the table
def table_rows(model: str, measured: dict[tuple[str, str], dict[int, dict]], quant: str, depths: list[int],
               kvforge: dict[int, dict] | None = None, errors: dict | None = None) -> list[dict]:
    """One row per depth: f16 and ``quant`` ms/token, their ratio, and kvforge's ratio at that context."""
    base, q = measured.get((BASE, BASE), {}), measured.get((quant, quant), {})
    rows = []
    for d in depths:
        row: dict = {"model": model, "depth": d, "f16_ms": None, f"{quant}_ms": None, "ratio": None}
        if d in base:
            row.update(f16_ms=base[d]["ms"], f16_sd=base[d]["sd"])
        if d in q:
            row[f"{quant}_ms"], row[f"{quant}_sd"] = q[d]["ms"], q[d]["sd"]
        if row["f16_ms"] and row[f"{quant}_ms"]:
            row["ratio"] = row[f"{quant}_ms"] / row["f16_ms"]
        k = (kvforge or {}).get(d)
        row["kvforge_ratio"] = k["ratio"] if k else None
        if k:
            row["kvforge_source"] = k["source"]
        for t, err in (errors or {}).get(d, {}).items():
            row[f"{t}_error"] = err
        rows.append(row)
    return rows


def markdown(rows: list[dict], quant: str, kvforge_cache: str) -> list[str]:
    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    lines = [f"| model | depth | f16 ms/token | {quant} ms/token | {quant}/f16 | kvforge {kvforge_cache}/dynamic |",
             "|---|---|---|---|---|---|"]
    failures = []
    for r in rows:
        for k, v in r.items():
            if k.endswith("_error"):
                failures.append(f"- {r['model']} at depth {r['depth']:,}, {k[: -len('_error')]}: {v}")
        lines.append(f"| {r['model']} | {r['depth']:,} | {f(r['f16_ms'], '.2f')} | {f(r[f'{quant}_ms'], '.2f')} "
                     f"| {f(r['ratio'], '.2f')}{'x' if r['ratio'] else ''} "
                     f"| {f(r['kvforge_ratio'], '.2f')}{'x' if r['kvforge_ratio'] else ''} |")
    if failures:
        lines += ["", "Failed:", *failures]
    return lines


# ---------------------------------------------------------------------------- main
def run_bench(args: list[str]) -> tuple[list[dict] | None, str | None]:
    """``(tests, None)`` or ``(None, error)``: one llama-bench run."""
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode != 0:
        tail = [ln for ln in p.stderr.strip().splitlines() if ln.strip()][-3:]
        return None, f"llama-bench exited {p.returncode}: {' / '.join(tail)}"
    try:
        return parse_tests(p.stdout), None
    except ValueError as e:
        return None, f"unreadable llama-bench output ({e})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODELS, help="comma-separated bundled model names or .gguf paths")
    ap.add_argument("--depths", default=DEPTHS, help="comma-separated context depths (llama-bench -d)")
    ap.add_argument("--new-tokens", "-n", type=int, default=32, help="decode steps timed per repetition")
    ap.add_argument("--threads", "-t", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3, help="llama-bench -r (the mean is reported)")
    ap.add_argument("--quant", default="q4_0", help="the quantized KV type for keys and values (-ctk/-ctv)")
    ap.add_argument("--kvforge-cache", default=KVFORGE_CACHE, help="the kvforge cache spec shown beside")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not depths or min(depths) < 0 or args.new_tokens < 1 or args.repetitions < 1:
        ap.error("--depths must be non-negative integers, --new-tokens and -r at least 1")

    try:
        binary = find_llama_bench()
    except FileNotFoundError as e:
        print(f"llamacpp benchmark: {e}; {HOW_TO_GET.format(default=default_binary())}", file=sys.stderr)
        return 2
    if binary is None:
        print(skip_message())
        return 0

    settings = {"models": models, "depths": depths, "new_tokens": args.new_tokens, "threads": args.threads,
                "repetitions": args.repetitions, "quant": args.quant, "kvforge_cache": args.kvforge_cache}
    name = folder_name("llamacpp", settings, "+".join(Path(m).stem for m in models),
                       "d" + "-".join(str(d) for d in depths), f"n{args.new_tokens}", f"t{args.threads}",
                       f"r{args.repetitions}", args.quant)
    record = Results(args.out, name, settings)
    llama = version(binary)
    print(f"llama-bench: {llama.get('version', '?').splitlines()[0]}", flush=True)

    rows, commands, tests_all = [], [], []
    for model in models:
        gguf = model_path(model)
        measured: dict[tuple[str, str], dict[int, dict]] = {}
        errors: dict[int, dict] = {}
        for d in depths:
            for t in (BASE, args.quant):
                cmd = bench_args(binary, gguf, t, d, args.new_tokens, args.threads, args.repetitions)
                commands.append(" ".join(str(portable(a)) for a in [binary.name, *cmd[1:]]))
                tests, err = run_bench(cmd)
                if err:
                    errors.setdefault(d, {})[t] = err
                    print(f"{model} d={d} {t}: {err}", flush=True)
                    continue
                tests_all += [{"model": model, **{k: v for k, v in x.items() if k != "model_filename"}}
                              for x in tests]
                for key, per_depth in decode_ms(tests).items():
                    measured.setdefault(key, {}).update(per_depth)
                got = measured.get((t, t), {}).get(d)
                if got:
                    print(f"{model} d={d} {t}: {got['ms']:.2f} ms/token", flush=True)
        kvforge = kvforge_ratios(args.out, model, args.kvforge_cache) if model in BUNDLED else {}
        rows += table_rows(model, measured, args.quant, depths, kvforge, errors)

    cpu = next((t.get("cpu_info") for t in tests_all if t.get("cpu_info")), None)
    text = [
        f"# llama.cpp decode with an f16 and a {args.quant} KV cache",
        "",
        f"llama-bench, flash attention on, {args.threads} threads: mean ms per decode token over {args.new_tokens} "
        f"tokens after `depth` tokens of context, {args.repetitions} repetition(s); keys and values both f16 or "
        f"both {args.quant}. Last column: kvforge's {args.kvforge_cache} over a DynamicCache at the same context "
        "(model in float32; ratios compare, milliseconds do not).",
        "",
        *markdown(rows, args.quant, args.kvforge_cache),
        "",
    ]
    sources = sorted({str(record.relative(r["kvforge_source"])) for r in rows if r.get("kvforge_source")})
    if sources:
        text.append(f"kvforge's ratios from: {', '.join(f'`{s}`' for s in sources)}.")
    else:
        text.append("No kvforge decode speed at these depths yet: kvforge's figures come from "
                    "`benchmarks/quant.py --speed`.")
    src = llama.get("source") or {}
    built = f"{src['package']} {src['version']} (llama.cpp {src['llama_cpp_release']})" if src else "llama.cpp"
    text.append(f"{built}, `{llama.get('version', '?').splitlines()[0]}`; {cpu or 'CPU'}; {record.meta['started']}")
    text = "\n".join(text)
    print(text)
    record.write_table(text, rows=rows, llama_cpp=llama, llama_bench_commands=commands, llama_bench_tests=tests_all)
    record.announce()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
