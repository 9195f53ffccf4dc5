"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_norms(description, path: str | Path) -> Path:
    """Heatmaps of mean key and value L2 norm per layer (rows) and KV head (columns)."""
    rows = description.rows
    keys = [r["key_norm"] for r in rows]
    vals = [r["value_norm"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, max(3, 0.25 * len(rows) + 1.5)))
    for ax, data, title in ((axes[0], keys, "key norm"), (axes[1], vals, "value norm")):
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(rows)), [str(r["layer"]) + ("s" if r["type"] == "sliding_attention" else "") for r in rows])
        ax.set_xticks(range(len(data[0]) if data else 0))
        fig.colorbar(im, ax=ax)
    name = description.state.model_name or description.state.fingerprint
    fig.suptitle(f"{name}: {description.state.num_tokens} tokens (s = sliding layer)")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_demo_summary(results, path: str | Path, model_name: str = "") -> Path:
    """``kvforge demo``'s summary: KV bytes per token of each step's cache next to its float16 baseline, with
    each step's quality (agreement, perplexity change, speed) written on its bar."""
    rows = [r for r in results if r.bytes_per_token is not None]
    fig, ax = plt.subplots(figsize=(8, 0.8 * max(2, len(rows)) + 1.2))
    y = list(range(len(rows)))
    ax.barh([i + 0.2 for i in y], [r.fp16_bytes_per_token for r in rows], height=0.4, color="#bbbbbb",
            label="fp16 cache of the same model")
    ax.barh([i - 0.2 for i in y], [r.bytes_per_token for r in rows], height=0.4, color="#3b75af",
            label="this step's cache")
    for i, r in zip(y, rows):
        ax.text(r.bytes_per_token, i - 0.2, f"  {r.bytes_per_token:,.0f} B  {r.quality}", va="center", fontsize=8)
    ax.set_yticks(y, [r.step for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("KV bytes per token")
    ax.set_title(f"kvforge demo{' on ' + model_name if model_name else ''}: bytes per token and quality per step")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlim(0, 1.45 * max([r.bytes_per_token for r in rows] + [r.fp16_bytes_per_token for r in rows] + [1]))
    return _save(fig, path)


def plot_lines(panels: dict[str, dict[str, list[tuple[float, float]]]], path: str | Path, *, xlabel: str, ylabel: str,
               title: str = "", logx: bool = True) -> Path:
    """One panel per key of ``panels``, one line per series ``{label: [(x, y), ...]}`` (a benchmark's
    curve, e.g. decode ms/token against context length)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for label, points in series.items():
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=label)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
