"""``KVState.describe()``: a state's layers as rows (shape, bytes, key and value norms per KV head)."""

from __future__ import annotations

import math

from .models import size_vs_fp16


class Description:
    """``KVState.describe()``: per-layer rows, printable as a table."""

    def __init__(self, state, rows: list[dict]):  # state: the KVState described
        self.state = state
        self.rows = rows

    def to_dict(self) -> dict:
        s = self.state
        return {
            "model": s.model_name,
            "fingerprint": s.fingerprint,
            "tokens": s.num_tokens,
            "batch": s.batch_size,
            "nbytes": s.nbytes,
            "bytes_per_token": s.nbytes / max(1, s.num_tokens * s.batch_size),
            "fp16_bytes_per_token": self.fp16_bytes / max(1, s.num_tokens * s.batch_size),
            "layers": self.rows,
        }

    @property
    def fp16_bytes(self) -> int:
        """Bytes the same tokens take in a float16 cache (the size people compare KV caches with)."""
        return sum(r["fp16_bytes"] for r in self.rows)

    def __str__(self) -> str:
        s = self.state
        per = max(1, s.num_tokens * s.batch_size)
        lines = [
            f"{s.model_name or 'model'} [{s.fingerprint}]  tokens={s.num_tokens} batch={s.batch_size} "
            f"layers={len(s.layers)}  {format_bytes(s.nbytes)} ({s.nbytes / per:,.0f} B/token, "
            f"{size_vs_fp16(s.nbytes / per, self.fp16_bytes / per)})",
            f"{'layer':>5} {'type':<8} {'enc':<13} {'shape':<20} {'bytes':>10}  key norm / head    value norm / head",
        ]
        for r in self.rows:
            kn = " ".join(f"{x:.1f}" for x in r["key_norm"][:8])
            vn = " ".join(f"{x:.2f}" for x in r["value_norm"][:8])
            kind = "sliding" if r["type"] == "sliding_attention" else "full"
            lines.append(
                f"{r['layer']:>5} {kind:<8} {r['encoding']:<13} {'x'.join(map(str, r['shape'])):<20} "
                f"{format_bytes(r['bytes']):>10}  {kn:<18} {vn}"
            )
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    e = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**e:.1f} {['B', 'KiB', 'MiB', 'GiB'][e]}"
