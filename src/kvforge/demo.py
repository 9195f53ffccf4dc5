"""``kvforge demo``: the main job on a bundled model, with a short report."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def run_demo(model_name: str = "smollm2-135m", tokens: int = 1024, max_new_tokens: int = 32,
             workdir: Path | None = None, dtype: str = "float32") -> dict:
    """Load the model, prefill a passage, save and reload its KV state, continue from it, report."""
    from rich.console import Console
    from rich.table import Table

    from .generate import generate, prefill
    from .models import load_model
    from .state import KVState, format_bytes
    from .texts import load_text

    console = Console()
    t0 = time.perf_counter()
    model, tok = load_model(model_name, dtype=dtype)
    load_s = time.perf_counter() - t0
    text = load_text("pydoc", "eval")
    ids = tok(text[: tokens * 8], return_tensors="pt").input_ids[:, :tokens]
    question = "\n\nIn one sentence, the passage above is about"
    console.print(f"[bold]kvforge demo[/] on {model_name}: {ids.shape[1]} context tokens (loaded in {load_s:.1f}s)")

    t = time.perf_counter()
    state = prefill(model, tok, ids, chunk_size=512)
    prefill_s = time.perf_counter() - t

    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="kvforge-demo-"))
    path = tmp / "context.kv"
    t = time.perf_counter()
    state.save(path)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    loaded = KVState.load(path, model=model)
    load_state_s = time.perf_counter() - t

    # continue from the reloaded state: the context is never run through the model again
    from_state = generate(model, tok, question, max_new_tokens=max_new_tokens, state=loaded)
    # the same question the slow way: re-read the whole context first
    q_ids = tok(question, return_tensors="pt", add_special_tokens=False).input_ids
    t = time.perf_counter()
    with torch.inference_mode():
        full = generate(model, tok, torch.cat([ids, q_ids], 1), max_new_tokens=max_new_tokens)
    full_s = time.perf_counter() - t

    # the same round trip with kvforge's quantized cache (preset "safe"): smaller in memory and on disk
    from .quant import QuantizedKVCache

    t = time.perf_counter()
    qstate = prefill(model, tok, ids, cache=QuantizedKVCache.for_model(model, "safe"), chunk_size=512)
    qprefill_s = time.perf_counter() - t
    qpath = tmp / "context-safe.kv"
    qstate.save(qpath)
    qloaded = KVState.load(qpath, model=model)
    from_q = generate(model, tok, question, max_new_tokens=max_new_tokens, state=qloaded,
                      cache=QuantizedKVCache.for_model(model, "safe"))
    pairs = list(zip(from_q.token_ids, from_state.token_ids))
    q_match = sum(a == b for a, b in pairs) / max(1, len(pairs))
    q_first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)

    same = from_state.token_ids == full.token_ids[: len(from_state.token_ids)]
    table = Table(title="KV state round trip")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("context tokens", f"{state.num_tokens}"),
        ("KV bytes held", f"{format_bytes(state.nbytes)} ({state.nbytes / state.num_tokens:,.0f} B/token)"),
        ("file on disk", format_bytes(path.stat().st_size)),
        ("prefill", f"{prefill_s:.2f}s ({state.num_tokens / prefill_s:,.0f} tok/s)"),
        ("save / load (with checksum)", f"{save_s:.2f}s / {load_state_s:.2f}s"),
        ("first token, from saved state", f"{from_state.first_token_seconds:.3f}s"),
        ("first token, re-reading context", f"{full.first_token_seconds:.3f}s"),
        ("time-to-first-token speed-up", f"{full.first_token_seconds / max(1e-9, load_state_s + from_state.first_token_seconds):.1f}x (incl. load)"),
        ("decode speed (from state)", f"{from_state.tokens_per_second:.1f} tok/s"),
        ("tokens run through the model", f"{from_state.forwarded_tokens} (vs {full.forwarded_tokens})"),
        ("same greedy tokens as re-reading", "yes" if same else "NO (float differences between chunkings)"),
        ("quantized (safe): KV bytes held", f"{format_bytes(qstate.nbytes)} ({qstate.nbytes / qstate.num_tokens:,.0f} B/token, "
         f"{state.nbytes / qstate.nbytes:.1f}x smaller)"),
        ("quantized (safe): file on disk", format_bytes(qpath.stat().st_size)),
        ("quantized (safe): prefill / decode", f"{qprefill_s:.2f}s / {from_q.tokens_per_second:.1f} tok/s"),
        ("quantized (safe): same greedy tokens", "all" if q_first is None else
         f"first {q_first} of {len(pairs)}, then the texts differ ({100 * q_match:.0f}% positions equal)"),
    ]
    for r in rows:
        table.add_row(*r)
    console.print(table)
    console.print(f"[bold]continuation:[/] {question.strip()}{from_state.text}")
    console.print(f"saved state: {path}  ({full_s:.1f}s for the re-read path)")
    console.print(f"serve it (OpenAI-compatible, batched, with a shared prefix store): kvforge serve --model {model_name} "
                  "--cache kvforge-quant:preset=safe --port 8000, then point any OpenAI client at "
                  "http://127.0.0.1:8000/v1 (needs the serve extra: pip install 'kvforge[serve]')")
    return {"state_bytes": state.nbytes, "same": same, "file": str(path), "quant_bytes": qstate.nbytes,
            "quant_file_bytes": qpath.stat().st_size, "quant_match": q_match}
