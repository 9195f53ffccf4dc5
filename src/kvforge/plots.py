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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
