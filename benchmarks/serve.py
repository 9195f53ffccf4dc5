"""``kvforge serve`` under bounded load on 127.0.0.1: batching throughput, latency, prefix reuse, a soak.

For each cache spec a server is started (``kvforge serve`` in a subprocess) and driven by streaming
clients (``/v1/completions``, greedy, ``max_tokens`` new tokens each):

* throughput: the same ``--requests`` prompts served by 1 client at a time (one at a time: the baseline),
  then by 4 and 16 concurrent clients; aggregate generated tokens/s, p50/p95 time to first token (TTFT)
  and per-token latency (a request's (last - first token time) / (tokens - 1)). The prompts are shorter
  than the prefix store's minimum, so the store plays no part here;
* prefix reuse: TTFT of a request whose ``--prefix-tokens``-token prefix is in the store (a second question
  about the same document) against a miss (a document not seen before), median of ``--prefix-trials``;
* pinned prefixes after a restart (directory and Redis stores): TTFT of a prefix pinned through
  ``POST /v1/kv/prefixes`` under one ``cache_salt``, after the server restarts, against the same prefix under
  another salt (a miss: salts never share) and a document never stored;
* soak (every spec, ``--soak-seconds`` each, 0 skips): 16 clients send requests back to back against a
  server with ``--max-kv-bytes``; requests sent, completed, failed, the server's peak KV bytes held, and
  its RSS sampled every 10 s (tabled, and plotted in ``soak_rss.png``): growth is counted after
  ``--soak-warmup`` seconds (default 120), when the allocator and caches have had their first fill.

    python benchmarks/serve.py                                  # ~15 min on 2 CPU cores
    python benchmarks/serve.py --requests 8 --soak-seconds 30   # a quick look

Each run writes a new folder under ``--out`` (default benchmarks/results), named after its settings and never
overwritten (``kvforge.results``): ``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("KVFORGE_QUIET", "1")

import httpx  # noqa: E402

from kvforge.results import Results, folder_name  # noqa: E402
from kvforge.specs import split_specs  # noqa: E402
from kvforge.texts import load_text  # noqa: E402

QUANT = "kvforge-quant:preset=balanced"


# ------------------------------------------------------------------------------------------ the server
class Process:
    """An HTTP server in a subprocess on a free port of 127.0.0.1, up once ``/health`` answers 200.

    ``command(port)`` gives its command line; ``env`` its environment (default: this one's)."""

    def __init__(self, command, env: dict | None = None, timeout: float = 300, what: str = "the server"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(command(self.port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{what} did not start: {self.proc.stdout.read()[-3000:]}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Server(Process):
    """``kvforge serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, model: str, cache: str, *extra: str):
        super().__init__(lambda port: [sys.executable, "-m", "kvforge", "serve", "--model", model, "--cache", cache,
                                       "--host", "127.0.0.1", "--port", str(port), *extra])

    def rss(self) -> int:
        """Resident memory of the server process, bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def metric(self, name: str) -> float:
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

# ------------------------------------------------------------------------------------------ clients
async def stream_one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                     salt: str | None = None) -> dict:
    """One streaming completion: TTFT, per-token latency, tokens, cached prompt tokens, or the error."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if salt is not None:
        body["cache_salt"] = salt
    t0 = time.perf_counter()
    first = last = None
    tokens, cached, done = 0, 0, False
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "error": r.text[:200]}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    first = first or now
                    last = now
    except httpx.HTTPError as e:
        return {"ok": False, "status": 0, "error": f"{type(e).__name__}: {e}"}
    if not done or first is None:
        return {"ok": False, "status": 200, "error": "the stream ended without [DONE] or text"}
    per_token = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return {"ok": True, "ttft": first - t0, "per_token": per_token, "tokens": tokens, "seconds": last - t0,
            "cached_tokens": cached}


async def run_load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Serve ``prompts`` with ``concurrency`` clients pulling from one queue."""
    queue = list(prompts)
    results = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker():
            while queue:
                results.append(await stream_one(client, url, model, queue.pop(0), max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "failed": len(results) - len(ok), "tokens": tokens,
        "seconds": wall, "tokens_per_s": tokens / wall,
        "ttft_p50": pct([r["ttft"] for r in ok], 50), "ttft_p95": pct([r["ttft"] for r in ok], 95),
        "per_token_p50": pct([r["per_token"] for r in ok], 50), "per_token_p95": pct([r["per_token"] for r in ok], 95),
    }


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def prefix_ttft(url: str, model: str, docs: list[str], max_tokens: int = 4) -> dict:
    """TTFT of a miss (a new document) and of a hit (a second question about the same document)."""
    miss, hit = [], []
    async with httpx.AsyncClient(timeout=600) as client:
        for doc in docs:
            r = await stream_one(client, url, model, doc + "\n\nQuestion: what is this about?\nAnswer:", max_tokens)
            miss.append(r["ttft"])
            r = await stream_one(client, url, model, doc + "\n\nQuestion: which names appear?\nAnswer:", max_tokens)
            hit.append(r["ttft"])
    return {"miss_ttft": statistics.median(miss), "hit_ttft": statistics.median(hit), "miss_all": miss, "hit_all": hit}


def pinned_after_restart(model: str, spec: str, store: str, docs: list[str], fresh: list[str], extra: list[str],
                         max_tokens: int = 4) -> dict:
    """TTFT of a pinned prefix after a server restart (``store``: a directory or redis://), against a miss (a
    document never stored) and against the same document under another ``cache_salt`` (must be a miss too).

    The prefixes are stored and pinned through ``POST /v1/kv/prefixes`` under salt ``tenant-a``; the server is
    stopped and a new one started on the same store before any request is timed."""
    question = "\n\nQuestion: which names appear?\nAnswer:"
    server = Server(model, spec, "--kv-store", store, *extra)
    try:
        for doc in docs:
            r = httpx.post(server.url + "/v1/kv/prefixes", json={"model": model, "prompt": doc, "cache_salt": "tenant-a"},
                           timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"POST /v1/kv/prefixes: {r.status_code} {r.text[:300]}")
    finally:
        server.stop()
    server = Server(model, spec, "--kv-store", store, *extra)
    out: dict[str, list] = {"hit": [], "other_salt": [], "miss": []}

    async def go():
        async with httpx.AsyncClient(timeout=600) as client:
            await stream_one(client, server.url, model, fresh[-1][:200], 2, salt="warm-up")
            for doc, new in zip(docs, fresh):
                for kind, prompt, salt in (("hit", doc, "tenant-a"), ("other_salt", doc, "tenant-b"),
                                           ("miss", new, "tenant-a")):
                    r = await stream_one(client, server.url, model, prompt + question, max_tokens, salt=salt)
                    if not r["ok"]:
                        raise RuntimeError(f"{kind} request failed: {r}")
                    out[kind].append((r["ttft"], r["cached_tokens"]))

    try:
        asyncio.run(go())
    finally:
        server.stop()
    res = {"store": store.split(":")[0] if store.startswith("redis") else "directory"}
    for kind, rows in out.items():
        res[f"{kind}_ttft"] = statistics.median(t for t, _ in rows)
        res[f"{kind}_cached_tokens"] = statistics.median(c for _, c in rows)
    return res


class RedisServer:
    """A throwaway ``redis-server`` on a free port of 127.0.0.1, no persistence."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.time() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.1)
        self.url = f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


async def soak(server: Server, model: str, prompts: list[str], clients: int, seconds: float, max_tokens: int,
               warmup: float = 120, every: float = 10) -> dict:
    """``clients`` streaming clients back to back for ``seconds``; the server's RSS sampled every ``every`` s.
    Growth: RSS at the end against RSS after ``warmup`` s (the allocator's and caches' first fill)."""
    sent = completed = failed = 0
    errors: dict[str, int] = {}
    t_start = time.perf_counter()
    stop_at = t_start + seconds
    peak_rss, baseline = 0, server.rss()
    samples: list[tuple[float, int, int]] = []  # (seconds, rss, requests completed)
    sampling = True

    def sample():
        nonlocal peak_rss
        last = -every
        while sampling:
            rss = server.rss()
            peak_rss = max(peak_rss, rss)
            t = time.perf_counter() - t_start
            if t - last >= every:
                samples.append((round(t, 1), rss, completed))
                last = t
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 2)) as client:
        async def worker(i: int):
            nonlocal sent, completed, failed
            k = i
            while time.perf_counter() < stop_at:
                sent += 1
                r = await stream_one(client, server.url, model, prompts[k % len(prompts)], max_tokens)
                k += clients
                if r["ok"]:
                    completed += 1
                else:
                    failed += 1
                    key = f"{r['status']}: {r['error'][:80]}"
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    sampling = False
    sampler.join()
    samples.append((round(time.perf_counter() - t_start, 1), server.rss(), completed))
    after = [x for x in samples if x[0] >= warmup]
    growth = after[-1][1] - after[0][1] if len(after) > 1 else None
    per_1k = None
    if len(after) > 1 and after[-1][2] > after[0][2]:
        per_1k = 1000 * growth / (after[-1][2] - after[0][2])
    return {"clients": clients, "seconds": wall, "sent": sent, "completed": completed, "failed": failed,
            "lost": sent - completed - failed, "errors": errors, "baseline_rss": baseline, "peak_rss": peak_rss,
            "peak_kv_bytes": server.metric("kvforge_kv_bytes_peak"), "warmup": warmup, "rss_samples": samples,
            "growth_after_warmup": growth, "growth_per_1k_requests": per_1k}


# ------------------------------------------------------------------------------------------ main
def make_prompts(tokenizer, text: str, n: int, tokens: int, offset: int = 0) -> list[str]:
    """``n`` distinct prompts of ``tokens`` tokens, cut from ``text``."""
    ids = tokenizer(text[offset : offset + n * tokens * 8]).input_ids
    return [tokenizer.decode(ids[i * tokens : (i + 1) * tokens]) for i in range(n)]


def mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--caches", default=f"dynamic,{QUANT}", help="comma-separated cache specs")
    ap.add_argument("--requests", type=int, default=16, help="requests per throughput run")
    ap.add_argument("--prompt-tokens", type=int, default=48, help="prompt length of the throughput runs")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--prefix-trials", type=int, default=3)
    ap.add_argument("--soak-seconds", type=float, default=300)
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--soak-warmup", type=float, default=120, help="seconds of soak before RSS growth is counted")
    ap.add_argument("--max-kv-bytes", default="64M", help="the soak server's --max-kv-bytes")
    ap.add_argument("--server-threads", type=int, default=None, help="the servers' torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    threads = ["--threads", str(args.server_threads)] if args.server_threads else []
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    name = folder_name(f"serve-{args.model}", settings, f"{len(split_specs(args.caches))}caches",
                      f"r{args.requests}x{args.prompt_tokens}+{args.max_tokens}",
                      "c" + args.concurrency.replace(",", "-"), f"soak{args.soak_seconds:g}s")
    record = Results(args.out, name, settings)

    from transformers import AutoTokenizer

    from kvforge.cli.serve import _bytes
    from kvforge.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(args.model))
    text = load_text("pydoc", "eval")
    prompts = make_prompts(tok, text, args.requests, args.prompt_tokens)
    docs = make_prompts(tok, text, args.prefix_trials, args.prefix_tokens, offset=len(text) // 3)
    fresh = make_prompts(tok, text, args.prefix_trials, args.prefix_tokens, offset=2 * len(text) // 3)
    levels = [int(c) for c in args.concurrency.split(",")]
    specs = split_specs(args.caches)
    budget = _bytes(args.max_kv_bytes)
    result = {"model": args.model, "runs": {}, "prefix": {}, "pinned": {}, "soak": None}

    for spec in specs:
        print(f"== {spec}", flush=True)
        server = Server(args.model, spec, *threads)
        try:
            asyncio.run(run_load(server.url, args.model, prompts[:2], 2, 4))  # warm-up
            runs = []
            for c in levels:
                r = asyncio.run(run_load(server.url, args.model, prompts, c, args.max_tokens))
                runs.append(r)
                print(f"  {c:>2} clients: {r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.2f}s "
                      f"p95 {r['ttft_p95']:.2f}s, per token p50 {1000 * r['per_token_p50']:.0f} ms, failed {r['failed']}",
                      flush=True)
            result["runs"][spec] = runs
            p = asyncio.run(prefix_ttft(server.url, args.model, docs))
            p["prompt_tokens"] = args.prefix_tokens
            result["prefix"][spec] = p
            print(f"  prefix {args.prefix_tokens} tokens: hit TTFT {p['hit_ttft']:.3f}s, miss {p['miss_ttft']:.3f}s "
                  f"({100 * p['hit_ttft'] / p['miss_ttft']:.0f}%)", flush=True)
        finally:
            server.stop()
        if args.prefix_trials > 0:
            result["pinned"][spec] = []
            redis = RedisServer()
            try:
                with tempfile.TemporaryDirectory() as folder:
                    for store in (folder, redis.url):
                        q = pinned_after_restart(args.model, spec, store, docs, fresh, threads)
                        result["pinned"][spec].append(q)
                        print(f"  pinned {args.prefix_tokens} tokens after a restart ({q['store']}): hit TTFT "
                              f"{q['hit_ttft']:.3f}s ({q['hit_cached_tokens']:.0f} cached), other salt "
                              f"{q['other_salt_ttft']:.3f}s ({q['other_salt_cached_tokens']:.0f} cached), miss "
                              f"{q['miss_ttft']:.3f}s", flush=True)
            finally:
                redis.stop()

    result["soak"] = []
    for spec in specs if args.soak_seconds > 0 else []:
        print(f"== soak: {args.soak_clients} clients for {args.soak_seconds:.0f}s, {spec}, --max-kv-bytes {args.max_kv_bytes}",
              flush=True)
        server = Server(args.model, spec, "--max-kv-bytes", str(budget), *threads)
        try:
            asyncio.run(run_load(server.url, args.model, prompts[:2], 2, 4))
            s = asyncio.run(soak(server, args.model, prompts, args.soak_clients, args.soak_seconds, args.max_tokens,
                                 warmup=args.soak_warmup))
        finally:
            server.stop()
        s.update(spec=spec, max_kv_bytes=budget)
        result["soak"].append(s)
        print(f"  sent {s['sent']}, completed {s['completed']}, failed {s['failed']}, peak KV {mib(s['peak_kv_bytes'])}, "
              f"RSS {mib(s['baseline_rss'])} -> peak {mib(s['peak_rss'])}, after warm-up "
              f"{mib(s['growth_after_warmup'] or 0)}", flush=True)
        record.write_json("partial.json", result)
    if result["soak"]:
        from kvforge.plots import plot_lines

        plot_lines({"server RSS during the soak": {k["spec"]: [(t, rss / 2**20) for t, rss, _ in k["rss_samples"]]
                                                   for k in result["soak"]}},
                   record.path("soak_rss.png"), xlabel="seconds", ylabel="resident MiB", logx=False)

    md = render(result, record.meta)
    print(md)
    record.write_table(md, **result)
    record.remove("partial.json")
    record.announce()
    return 0


def render(r: dict, meta: dict) -> str:
    """The tables of one run's results ``r`` (``meta``: its :func:`kvforge.results.metadata`)."""
    s, m = meta["settings"], meta["machine"]
    lines = [f"# kvforge serve on {r['model']} ({m['platform']}, {m['cpu_count']} CPUs, {meta['started']})", "",
             f"{s['requests']} streaming completions of {s['prompt_tokens']} prompt tokens and up to {s['max_tokens']} "
             "greedy tokens each; 1 client = the same requests served one at a time.", "",
             "| cache | clients | tokens/s | vs one at a time | TTFT p50 | TTFT p95 | per token p50 | per token p95 | failed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for spec, runs in r["runs"].items():
        base = runs[0]["tokens_per_s"]
        for x in runs:
            lines.append(f"| {spec} | {x['concurrency']} | {x['tokens_per_s']:.1f} | {x['tokens_per_s'] / base:.2f}x | "
                         f"{x['ttft_p50']:.2f} s | {x['ttft_p95']:.2f} s | {1000 * x['per_token_p50']:.0f} ms | "
                         f"{1000 * x['per_token_p95']:.0f} ms | {x['failed']} |")
    if r["prefix"]:
        lines += ["", f"Time to first token with a {s['prefix_tokens']}-token document prefix (median of "
                  f"{s['prefix_trials']}):", "", "| cache | miss | hit (prefix in the store) | hit / miss |",
                  "|---|---:|---:|---:|"]
        for spec, p in r["prefix"].items():
            lines.append(f"| {spec} | {p['miss_ttft']:.3f} s | {p['hit_ttft']:.3f} s | "
                         f"{100 * p['hit_ttft'] / p['miss_ttft']:.1f}% |")
    if r.get("pinned"):
        lines += ["", f"A {s['prefix_tokens']}-token prefix stored and pinned through `POST /v1/kv/prefixes` (salt "
                  "`tenant-a`), then the server restarted on the same store; time to first token (median of "
                  f"{s['prefix_trials']}) and prompt tokens reported as cached:", "",
                  "| cache | store | pinned hit, same salt | same prefix, another salt | miss (never stored) | hit / miss |",
                  "|---|---|---:|---:|---:|---:|"]
        for spec, rows in r["pinned"].items():
            for q in rows:
                lines.append(f"| {spec} | {q['store']} | {q['hit_ttft']:.3f} s ({q['hit_cached_tokens']:.0f} cached) | "
                             f"{q['other_salt_ttft']:.3f} s ({q['other_salt_cached_tokens']:.0f} cached) | "
                             f"{q['miss_ttft']:.3f} s ({q['miss_cached_tokens']:.0f} cached) | "
                             f"{100 * q['hit_ttft'] / q['miss_ttft']:.1f}% |")
    for k in r["soak"] or []:
        after = [x for x in k["rss_samples"] if x[0] >= k["warmup"]]
        lines += ["", f"Soak: {k['clients']} clients for {k['seconds']:.0f} s, {k['spec']}, --max-kv-bytes "
                  f"{mib(k['max_kv_bytes'])}; RSS sampled every 10 s (`soak_rss.png`), growth counted after "
                  f"{k['warmup']:.0f} s of warm-up:", "",
                  "| sent | completed | failed | lost | peak KV bytes held | RSS at start | RSS after warm-up | RSS at end "
                  "| growth after warm-up | per 1k requests |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {k['sent']} | {k['completed']} | {k['failed']} | {k['lost']} | {mib(k['peak_kv_bytes'])} | "
                  f"{mib(k['baseline_rss'])} | {mib(after[0][1]) if after else '-'} | {mib(k['rss_samples'][-1][1])} | "
                  f"{mib(k['growth_after_warmup']) if k['growth_after_warmup'] is not None else '-'} | "
                  f"{mib(k['growth_per_1k_requests']) if k['growth_per_1k_requests'] is not None else '-'} |"]
        if k["errors"]:
            lines += ["", "Errors: " + "; ".join(f"{n}x {e}" for e, n in k["errors"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
