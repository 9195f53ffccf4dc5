"""Results folders: ``results.json``, a markdown table and PNG plots (the folder and the metadata come
from :mod:`kvforge.results`)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..results import Results  # noqa: E402


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def markdown_table(rows: list[dict]) -> str:
    """One line per cache; ΔPPL and time are against the ``dynamic`` row of the same run, bytes against a
    float16 cache of the same model ("vs fp16": 2.00x = half its bytes; a float32 ``dynamic`` is 0.50x)."""
    base = next((r for r in rows if r["cache"] == "dynamic" and "ppl" in r), None)
    head = ("| cache | PPL | ΔPPL | NLL | tokens | agree | first div | KL | needle | B/token | vs fp16 | "
            "s/token | time vs dynamic |")
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['cache']} | {'skipped' if 'skipped' in r else 'error'}: {why} |" + " |" * 11)
            continue
        p, a, n = r.get("ppl"), r.get("agree"), r.get("needle")
        size = speed = None
        if p and base:
            speed = p["seconds_per_token"] / base["ppl"]["seconds_per_token"]
        if p and p.get("fp16_bytes_per_token") and p["bytes_per_token"]:
            size = p["fp16_bytes_per_token"] / p["bytes_per_token"]  # > 1: smaller than a float16 cache
        rel = p.get("rel_change") if p else None
        lines.append(
            "| " + " | ".join([
                r["cache"],
                _fmt(p and p["ppl"], ".3f"),
                "-" if rel is None else f"{100 * rel:+.2f}%",
                _fmt(p and p["nll"], ".4f"),
                _fmt(p and p["tokens"], "d"),
                "-" if not a else f"{100 * a['match_rate']:.1f}%",
                "-" if not a else f"{a['mean_first_divergence']:.1f}",
                "-" if not a else f"{a['mean_kl']:.4f}",
                "-" if not n else f"{100 * n['mean_accuracy']:.0f}%",
                _fmt(p and p["bytes_per_token"], ",.0f"),
                "-" if size is None else f"{size:.2f}x",
                "-" if not p else f"{1000 * p['seconds_per_token']:.1f} ms",
                "-" if speed is None else f"{speed:.2f}x",
            ]) + " |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per cache over the texts of a run: ΔPPL per text, the mean and the worst (largest) change,
    and the bytes per token held at the run's size point."""
    out: dict[str, dict] = {}
    for r in rows:
        e = out.setdefault(r["cache"], {"cache": r["cache"], "rel_change": {}, "size": None})
        if "size" in r:
            e["size"] = r["size"]
        if "ppl" in r and r["ppl"].get("rel_change") is not None:
            e["rel_change"][r.get("text", "")] = r["ppl"]["rel_change"]
    for e in out.values():
        ch = e["rel_change"]
        e["mean_rel_change"] = sum(ch.values()) / len(ch) if ch else None
        e["worst_text"] = max(ch, key=ch.get) if ch else None
        e["worst_rel_change"] = ch[e["worst_text"]] if ch else None
    return list(out.values())


def summary_table(summary: list[dict]) -> str:
    """ΔPPL of every cache on every text, with the mean, the worst case and the size against float16."""
    texts = list(dict.fromkeys(t for e in summary for t in e["rel_change"]))
    size = next((e["size"] for e in summary if e["size"]), None)
    at = f" at {size['tokens']:,} tokens" if size else ""
    lines = ["| cache | " + " | ".join(f"ΔPPL {t}" for t in texts) + f" | mean | worst | vs fp16{at} |",
             "|" + "|".join(["---"] * (len(texts) + 4)) + "|"]
    pct = lambda x: "-" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
    for e in summary:
        z = e["size"]
        ratio = "-" if not z else f"{z['fp16_bytes_per_token'] / z['bytes_per_token']:.2f}x"
        worst = "-" if e["worst_text"] is None else f"{pct(e['worst_rel_change'])} ({e['worst_text']})"
        lines.append(f"| {e['cache']} | " + " | ".join(pct(e["rel_change"].get(t)) for t in texts)
                     + f" | {pct(e['mean_rel_change'])} | {worst} | {ratio} |")
    return "\n".join(lines)


def write_report(res: Results, rows: list[dict]) -> Path:
    """``results.json`` (the run's metadata, settings, rows per cache and text, and the summary over texts),
    ``results.md`` and the plots into the run's new folder; returns the folder."""
    summary = summarize(rows)
    res.write_json("results.json", {"results": rows, "summary": summary})
    meta, s = res.meta, res.meta["settings"]
    texts = list(dict.fromkeys(r.get("text", s["text"]) for r in rows))
    md = [
        f"# kvforge bench: {s['model']}",
        "",
        f"Perplexity is decode-faithful: {s['windows']} windows of each text ({s['split']} split), "
        f"each prefilled with {s['context']} tokens then scored on the next {s['score']} in chunks of {s['chunk']} "
        "through the cache. ΔPPL, bytes and time are relative to `dynamic` on the same text in this run. Agreement: "
        f"greedy match over {s['agree_tokens']} tokens on {s['agree_prompts']} prompts, KL teacher-forced. "
        f"Needle: lengths {s['needle_lengths']}, depths {s['needle_depths']}, {s['needle_trials']} trial(s) each.",
        "",
        "## Over the texts: " + ", ".join(texts),
        "",
        summary_table(summary),
    ]
    for t in texts:
        md += ["", f"## {t}", "", markdown_table([r for r in rows if r.get("text", s["text"]) == t])]
    md += ["", f"kvforge {meta['kvforge']}, torch {meta['torch']}, transformers {meta['transformers']}, "
           f"{meta['threads']} threads, started {meta['started']}; `{meta['command']}`"]
    res.write_text("results.md", "\n".join(md))
    plot_quality_vs_bytes(summary, rows, res.path("quality_vs_bytes.png"))
    if any("needle" in r for r in rows):
        plot_needle([r for r in rows if "needle" in r and r.get("text") == texts[0]], res.path("needle_heatmap.png"))
    return res.folder


def plot_quality_vs_bytes(summary: list[dict], rows: list[dict], path: Path) -> None:
    """Mean ΔPPL over the texts against bytes per token held, with a bar from the best to the worst text."""
    held = {r["cache"]: r["ppl"]["bytes_per_token"] for r in rows if "ppl" in r}
    pts = []
    for e in summary:
        if not e["rel_change"] or e["cache"] not in held:
            continue
        x = e["size"]["bytes_per_token"] if e["size"] else held[e["cache"]]
        ch = [100 * v for v in e["rel_change"].values()]
        pts.append((e["cache"], x, 100 * e["mean_rel_change"], min(ch), max(ch)))
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, x, y, lo, hi in pts:
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o", capsize=3, ms=5)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    size = next((e["size"] for e in summary if e["size"]), None)
    ax.set_xlabel("KV cache bytes per token held" + (f" at {size['tokens']:,} tokens" if size else ""))
    n = max(len(e["rel_change"]) for e in summary)
    ax.set_ylabel("perplexity change vs dynamic (%)" + (f"\nmean of {n} texts, bar: best to worst" if n > 1 else ""))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title("quality vs memory (decode-faithful perplexity)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_needle(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 1, 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        n = r["needle"]
        im = ax.imshow(n["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_title(r["cache"], fontsize=8)
        ax.set_xticks(range(len(n["depths"])), [f"{d:.0%}" for d in n["depths"]], fontsize=7)
        ax.set_yticks(range(len(n["lengths"])), [str(x) for x in n["lengths"]], fontsize=7)
        ax.set_xlabel("depth")
        ax.set_ylabel("context tokens")
        for i, row in enumerate(n["accuracy"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle("needle retrieval accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_needle_result(result, path: Path) -> Path:
    """Heatmap of one :class:`NeedleResult`."""
    plot_needle([{"cache": result.cache, "needle": result.to_dict()}], Path(path))
    return Path(path)
