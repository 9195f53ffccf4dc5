"""kvforge's vLLM connector: time to first token on a second vLLM instance, bytes stored, agreement, and
vLLM next to ``kvforge serve`` on the same model and machine.

One document prefix of ``--prefix-tokens`` tokens per text (``--texts``, several kinds of English), stored
through Redis (a throwaway ``redis-server`` on 127.0.0.1, one per storage spec):

* vLLM with no connector: the plain miss (every prompt prefilled), and the 64-token greedy continuations
  every stored run is compared with;
* per storage spec (``--caches``): instance 1 serves each document with question A and stores it; a new
  instance 2 serves each document with question B (a hit: its prefix is loaded from Redis), a fresh
  document (a miss, stored too), and the documents with question B again for ``--agree-tokens`` greedy
  tokens, compared position by position with the no-connector run (kvforge's agreement measure);
  bytes stored per token against vLLM's own KV dtype;
* ``kvforge serve`` with the same spec on the same Redis: the documents with question C are hits on the
  entries vLLM stored (interoperability), fresh documents are misses;
* throughput: ``--requests`` short prompts served by 1 and by ``--clients`` concurrent streaming clients
  against vLLM's OpenAI server (no connector) and ``kvforge serve`` (dynamic), generated tokens/s.

Time to first token is a request with ``max_tokens`` 1, one at a time; medians over the texts. vLLM runs
with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``enforce_eager`` and ``--vllm-threads`` OpenMP threads.

    make vllm-env && python benchmarks/vllm_connector.py          # ~17 min on 2 CPU cores

Each run writes a new folder under ``--out`` (default benchmarks/results): ``results.md``, ``results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")
sys.path.insert(0, str(Path(__file__).parent))

import httpx  # noqa: E402
from serve import Process, RedisServer, Server, run_load  # noqa: E402

from kvforge.integrations.vllm.offline import launch  # noqa: E402
from kvforge.models import load_skeleton, resolve  # noqa: E402
from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.serve import PrefixStore  # noqa: E402
from kvforge.specs import split_specs  # noqa: E402
from kvforge.texts import load_text, text_names  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ("\n\nQuestion: who speaks here?\nAnswer:", "\n\nQuestion: which names appear?\nAnswer:",
             "\n\nQuestion: what happens next?\nAnswer:")


class VLLMServer(Process):
    """vLLM's OpenAI server (no connector) in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, python: str, model_dir: str, name: str, threads: int):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": str(threads)}
        super().__init__(lambda port: [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                                       "--served-model-name", name, "--dtype", "float32", "--max-model-len", "4096",
                                       "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)],
                         env=env, timeout=600, what="vLLM's server")

    def stop(self) -> None:
        super().stop(timeout=60)


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of greedy positions where two runs picked the same token."""
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    return same / max(1, sum(min(len(ra), len(rb)) for ra, rb in zip(a, b)))


def med(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--caches", default="dynamic,kvforge-quant:preset=safe,kvforge-quant:key_bits=8,value_bits=4,"
                    "kvforge-quant:key_bits=8,value_bits=8", help="storage specs, comma-separated")
    ap.add_argument("--texts", default="kjv,fortunes,jargon,licenses", help="one document per text")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=32, help="requests per throughput run (0 skips them)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per throughput request")
    ap.add_argument("--vllm-threads", type=int, default=2)
    ap.add_argument("--vllm-python", default=os.environ.get("KVFORGE_VLLM_PYTHON", str(ROOT / ".venv-vllm/bin/python")))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    if not Path(args.vllm_python).exists():
        ap.error(f"{args.vllm_python} is missing: run `make vllm-env` (or pass --vllm-python)")
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "vllm_python")}
    specs, texts = split_specs(args.caches), text_names(args.texts)
    record = Results(args.out, folder_name(f"vllm-connector-{args.model}", settings, f"p{args.prefix_tokens}",
                                           f"{len(specs)}caches"), settings)
    from transformers import AutoTokenizer

    model_dir = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs, fresh, unseen = [], [], []  # stored by vLLM; vLLM's misses; kvforge serve's misses
    for name in texts:
        ids = tok(load_text(name, "eval"))["input_ids"]
        p = args.prefix_tokens
        if len(ids) < 4 * p:
            raise SystemExit(f"text {name} has {len(ids)} tokens; {4 * p} are needed")
        docs.append(ids[:p])
        fresh.append(ids[2 * p: 3 * p])
        unseen.append(ids[3 * p: 4 * p])
    qa, qb, qc = ([*tok(q)["input_ids"]] for q in QUESTIONS)
    warm = [docs[0][:64]]  # a short first request: one-off costs stay out of the timings
    n = len(docs)
    job = {"model": model_dir, "threads": args.vllm_threads, "max_model_len": args.prefix_tokens + 256}
    result = {"model": args.model, "texts": texts, "prefix_tokens": args.prefix_tokens, "specs": {}}

    print("== vLLM, no connector", flush=True)
    base = launch(args.vllm_python, {**job, "extra": None, "prompts": warm + [d + qa for d in docs] + [d + qb for d in docs],
                                     "max_tokens": [1] * (1 + n) + [args.agree_tokens] * n})
    plain = [r["seconds"] for r in base["results"][1: 1 + n]]
    reference = [r["tokens"] for r in base["results"][1 + n:]]
    result["plain_ttft"] = med(plain)
    print(f"  miss TTFT {med(plain):.3f} s (start-up {base['started_s']:.0f} s)", flush=True)
    skeleton = load_skeleton(model_dir)
    for spec in specs:
        print(f"== {spec}", flush=True)
        redis = RedisServer()
        try:
            extra = {"store": redis.url, "cache": spec}
            first = launch(args.vllm_python, {**job, "extra": extra, "prompts": warm + [d + qa for d in docs],
                                              "max_tokens": 1})
            second = launch(args.vllm_python, {
                **job, "extra": extra, "prompts": warm + [d + qb for d in docs] + [f + qb for f in fresh]
                + [d + qb for d in docs], "max_tokens": [1] * (1 + 2 * n) + [args.agree_tokens] * n})
            r2 = second["results"]
            hits, misses = r2[1: 1 + n], r2[1 + n: 1 + 2 * n]
            entries = PrefixStore(skeleton, spec, redis.url).entries()
            agree = [agreement([r["tokens"]], [ref]) for r, ref in zip(r2[1 + 2 * n:], reference)]
            row = {
                "store_miss_ttft": med([r["seconds"] for r in first["results"][1:]]),
                "hit_ttft": med([r["seconds"] for r in hits]), "miss_ttft": med([r["seconds"] for r in misses]),
                "hit_cached_tokens": med([r["cached_tokens"] for r in hits]),
                "miss_cached_tokens": med([r["cached_tokens"] for r in misses]),
                "agreement": agreement([r["tokens"] for r in r2[1 + 2 * n:]], reference),
                "agreement_per_text": dict(zip(texts, agree)),
                "bytes_per_token": sum(e["bytes"] for e in entries) / sum(e["tokens"] for e in entries),
                "connector": second["connector"],
            }
            row["hit_vs_miss"] = row["hit_ttft"] / row["miss_ttft"]
            print(f"  hit TTFT {row['hit_ttft']:.3f} s ({row['hit_cached_tokens']:.0f} cached), miss {row['miss_ttft']:.3f} s "
                  f"({100 * row['hit_vs_miss']:.0f}%), {row['bytes_per_token']:.0f} B/token, agreement "
                  f"{100 * row['agreement']:.1f}%", flush=True)
            row["kvforge_serve"] = serve_side(args.model, spec, redis.url, tok, docs, unseen, qc)
            print(f"  kvforge serve: hit {row['kvforge_serve']['hit_ttft']:.3f} s "
                  f"({row['kvforge_serve']['hit_cached_tokens']:.0f} cached), miss {row['kvforge_serve']['miss_ttft']:.3f} s",
                  flush=True)
        finally:
            redis.stop()
        result["specs"][spec] = row
        record.write_json("partial.json", result)

    cfg = skeleton.config.get_text_config()
    result["vllm_bytes_per_token"] = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    if args.requests:
        result["throughput"] = throughput(args, tok, model_dir)
    md = render(result, record.meta)
    print(md)
    record.write_table(md, **result)
    record.remove("partial.json")
    record.announce()
    return 0


def serve_side(model: str, spec: str, redis_url: str, tok, docs, fresh, question) -> dict:
    """``kvforge serve`` on the Redis store vLLM filled: TTFT of the documents (hits on vLLM's entries) and of
    documents nobody stored (misses)."""
    server = Server(model, spec, "--kv-store", redis_url)
    out = {"hit": [], "miss": []}

    async def go():
        async with httpx.AsyncClient(timeout=600) as client:
            await first_token(client, server.url, model, docs[0][:64])
            for kind, group in (("hit", docs), ("miss", fresh)):
                for ids in group:  # token ids as the prompt: the same tokens vLLM stored
                    out[kind].append(await first_token(client, server.url, model, ids + question))

    try:
        asyncio.run(go())
    finally:
        server.stop()
    return {f"{k}_ttft": med([t for t, _ in v]) for k, v in out.items()} | {
        f"{k}_cached_tokens": med([c for _, c in v]) for k, v in out.items()}


async def first_token(client: httpx.AsyncClient, url: str, model: str, ids: list[int]) -> tuple[float, int]:
    """Seconds to the first streamed choice of a one-token completion (the first token may be the end of
    text, whose chunk has no text) and the prompt tokens the server took from its store."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, cached = None, None
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"kvforge serve: {r.status_code} {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    if first is None or cached is None:
        raise RuntimeError("kvforge serve: the stream ended without a choice or usage")
    return first, cached


def throughput(args, tok, model_dir: str) -> dict:
    """Generated tokens/s of vLLM's OpenAI server and of ``kvforge serve`` (dynamic) on the same prompts."""
    text = load_text("fortunes", "eval")
    ids = tok(text)["input_ids"]
    prompts = [tok.decode(ids[i * 60: i * 60 + 48]) for i in range(args.requests)]
    out = {}
    for engine in ("vllm", "kvforge"):
        print(f"== throughput: {engine}", flush=True)
        server = (VLLMServer(args.vllm_python, model_dir, args.model, args.vllm_threads) if engine == "vllm"
                  else Server(args.model, "dynamic", "--no-store"))
        try:
            asyncio.run(run_load(server.url, args.model, prompts[:2], 2, 4))  # warm-up
            runs = [asyncio.run(run_load(server.url, args.model, prompts, c, args.max_tokens)) for c in (1, args.clients)]
        finally:
            server.stop()
        out[engine] = runs
        for r in runs:
            print(f"  {r['concurrency']:>2} clients: {r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f} s, "
                  f"failed {r['failed']}", flush=True)
    return out


def render(r: dict, meta: dict) -> str:
    s, m = meta["settings"], meta["machine"]
    worst = {spec: min(x["agreement_per_text"].items(), key=lambda kv: kv[1]) for spec, x in r["specs"].items()}
    lines = [f"# kvforge's vLLM connector on {r['model']} ({m['platform']}, {m['cpu_count']} CPUs, {meta['started']})",
             "", f"A {r['prefix_tokens']}-token document prefix from each of {', '.join(r['texts'])}; time to first "
             f"token (TTFT, median over the texts) on a second vLLM instance that loads the prefix from Redis. "
             f"Plain vLLM (no connector) prefills the same prompts in {r['plain_ttft']:.3f} s. Agreement: share "
             f"of {s['agree_tokens']} greedy tokens equal to plain vLLM's. vLLM's own KV cache (float32) holds "
             f"{r['vllm_bytes_per_token']:,} bytes per token.", "",
             "| storage | hit TTFT | miss TTFT (stores) | hit / miss | cached tokens on a hit | bytes/token | "
             "vs vLLM's KV | agreement | kvforge serve hit (on vLLM's entry) | kvforge serve miss |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, x in r["specs"].items():
        k = x["kvforge_serve"]
        lines.append(f"| {spec} | {x['hit_ttft']:.3f} s | {x['miss_ttft']:.3f} s | {100 * x['hit_vs_miss']:.0f}% | "
                     f"{x['hit_cached_tokens']:.0f} | {x['bytes_per_token']:,.0f} | "
                     f"{r['vllm_bytes_per_token'] / x['bytes_per_token']:.2f}x fewer | {100 * x['agreement']:.1f}% | "
                     f"{k['hit_ttft']:.3f} s ({k['hit_cached_tokens']:.0f} cached) | {k['miss_ttft']:.3f} s |")
    lines += ["", "Lowest agreement per storage: " + "; ".join(f"{spec}: {100 * v:.1f}% ({t})"
                                                        for spec, (t, v) in worst.items()) + "."]
    if r.get("throughput"):
        lines += ["", f"Throughput: {s['requests']} streaming completions of 48 prompt tokens and {s['max_tokens']} "
                  "greedy tokens each, one at a time and with concurrent clients (127.0.0.1).", "",
                  "| engine | clients | tokens/s | TTFT p50 | per token p50 | failed |", "|---|---:|---:|---:|---:|---:|"]
        for engine, runs in r["throughput"].items():
            for x in runs:
                lines.append(f"| {'vLLM (CPU build)' if engine == 'vllm' else 'kvforge serve'} | {x['concurrency']} | "
                             f"{x['tokens_per_s']:.1f} | {x['ttft_p50']:.2f} s | {1000 * x['per_token_p50']:.0f} ms | "
                             f"{x['failed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
