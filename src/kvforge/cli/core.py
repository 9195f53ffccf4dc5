"""Foundation commands: models, inspect, prefill, generate, demo."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("models", help="list the bundled models and where they are")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="per-layer table of a KV cache (and a PNG of key/value norms)")
    _model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to prefill and inspect")
    src.add_argument("--text", type=Path, help="a text file to prefill and inspect")
    src.add_argument("--cache", type=Path, help="a saved KV state (.kv) to inspect")
    p.add_argument("--plot", type=Path, help="save a PNG of key/value norms per layer and head")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prefill", help="run a text through a model and save its KV state")
    _model_arg(p)
    p.add_argument("--text", type=Path, required=True, help="text file (the context)")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the state (.kv)")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per forward pass (default 512)")
    p.set_defaults(func=cmd_prefill)

    p = sub.add_parser("generate", help="generate text, optionally continuing from a saved KV state")
    _model_arg(p)
    p.add_argument("--cache", type=Path, help="a KV state saved by `kvforge prefill`: its context is not re-read")
    p.add_argument("--prompt", required=True, help="text appended after the cached context (or the whole prompt)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="re-read the whole sequence every step (slow baseline)")
    p.add_argument("--stats-json", type=Path, help="write token counts and timings as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: every capability on the bundled models, a line and a time per step")
    _model_arg(p, default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=1024, help="passage length to prefill, about (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--workdir", type=Path, help="where to keep the saved states and the summary plot (default: "
                   "~/.cache/kvforge/demo, reused by every run)")
    p.add_argument("--quick", action="store_true", help="only prefill + save and continue from the saved state")
    p.add_argument("--steps", help="comma-separated steps: prefill, continue, quant, mla, translate, serve")
    p.add_argument("--target", default="gemma3-270m", help="the model the translate step hands the passage to")
    p.set_defaults(func=cmd_demo)


def _model_arg(p, default: str | None = None) -> None:
    p.add_argument(
        "--model", "-m", default=default, required=default is None,
        help="bundled name (smollm2-135m, gemma3-270m), local directory or hub id",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")


def _load(args):
    from ..models import load_model

    return load_model(args.model, dtype=args.dtype)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path}: the file is empty")
    return text


def check_context(model, n_tokens: int, what: str) -> None:
    """Refuse (instead of silently truncating) a sequence longer than the model's context."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if limit and n_tokens > limit:
        raise ValueError(f"{what} has {n_tokens} tokens, more than the model's context of {limit}")


def cmd_models(args) -> int:
    from ..models import BUNDLED, cache_dir

    for m in BUNDLED.values():
        converted = (cache_dir() / "models" / m.name / "kvforge-converted.json").exists()
        try:
            m.locate() if not converted else None
            where = "ready" if converted else "installed (converted on first use)"
        except Exception as e:  # noqa: BLE001 - report any reason the package is unusable
            where = f"unavailable: {e}"
        print(f"{m.name:<14} {m.description}\n{'':<14} package {m.package}; {where}")
    print(f"converted models live in {cache_dir() / 'models'} (set KVFORGE_CACHE_DIR to move them)")
    return 0


def cmd_inspect(args) -> int:
    from ..generate import prefill
    from ..state import KVState

    if args.cache:
        state = KVState.load(args.cache)
        if args.model and state.model_name and Path(args.model).name != Path(state.model_name).name:
            raise ValueError(f"{args.cache} holds a KV state of {state.model_name}, not of --model {args.model}")
    else:
        model, tok = _load(args)
        text = args.prompt if args.prompt is not None else _read_text(args.text)
        state = prefill(model, tok, text)
    desc = state.describe()
    print(json.dumps(desc.to_dict(), indent=1) if args.json else desc)
    if args.plot:
        from ..plots import plot_norms

        plot_norms(desc, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_prefill(args) -> int:
    import time

    from ..generate import prefill

    model, tok = _load(args)
    text = _read_text(args.text)
    ids = tok(text, return_tensors="pt").input_ids
    check_context(model, ids.shape[1], str(args.text))
    t0 = time.perf_counter()
    state = prefill(model, tok, ids, chunk_size=args.chunk_size)
    seconds = time.perf_counter() - t0
    state.save(args.output)
    from ..state import format_bytes

    print(
        f"prefilled {state.num_tokens} tokens in {seconds:.2f}s; wrote {args.output} "
        f"({format_bytes(args.output.stat().st_size)}, KV {format_bytes(state.nbytes)})"
    )
    return 0


def cmd_generate(args) -> int:
    from ..generate import generate
    from ..state import KVState

    model, tok = _load(args)
    state = KVState.load(args.cache, model=model) if args.cache else None
    n_ctx = state.num_tokens if state is not None else 0
    n_prompt = len(tok(args.prompt, add_special_tokens=state is None).input_ids)
    check_context(model, n_ctx + n_prompt + args.max_new_tokens, "context + prompt + new tokens")
    result = generate(
        model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, use_cache=not args.no_cache, state=state, seed=args.seed,
    )
    print(result.text)
    if args.stats_json:
        args.stats_json.write_text(json.dumps({
            "cached_context_tokens": n_ctx,
            "prompt_tokens": result.prompt_tokens,
            "new_tokens": len(result.token_ids),
            "forwarded_tokens": result.forwarded_tokens,
            "token_ids": result.token_ids,
            "seconds": result.seconds,
            "first_token_seconds": result.first_token_seconds,
        }))
    return 0


def cmd_demo(args) -> int:
    from ..demo import pick_steps, run_demo

    pick_steps(args.steps, args.quick)  # a bad --steps fails before any model loads
    run_demo(args.model, tokens=args.tokens, max_new_tokens=args.max_new_tokens, workdir=args.workdir, dtype=args.dtype,
             steps=args.steps, quick=args.quick, target_name=args.target)
    return 0
