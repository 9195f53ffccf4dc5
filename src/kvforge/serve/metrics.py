"""Counters, gauges and histograms, written in the Prometheus text format (``GET /metrics``)."""

from __future__ import annotations

import threading

_HELP = {
    "requests_total": ("counter", "Requests by outcome (ok, error, cancelled, rejected, invalid)."),
    "generated_tokens_total": ("counter", "Tokens generated."),
    "prompt_tokens_total": ("counter", "Prompt tokens of admitted requests."),
    "prefill_tokens_total": ("counter", "Prompt tokens run through the model (prefix-store hits skip theirs)."),
    "prefill_passes_total": ("counter", "Prefill forward passes."),
    "prefill_rows_total": ("counter", "Prompt chunks read by prefill passes (rows / passes = mean batch size)."),
    "decode_steps_total": ("counter", "Batched decode forward passes."),
    "decode_rows_total": ("counter", "Requests served by decode passes (rows / steps = mean batch size)."),
    "prefix_hits_total": ("counter", "Requests that started from a stored prefix."),
    "prefix_misses_total": ("counter", "Requests that found no stored prefix."),
    "prefix_hit_tokens_total": ("counter", "Prompt tokens taken from the prefix store."),
    "prefix_store_errors_total": ("counter", "Prefix-store calls that failed (served as misses)."),
    "time_to_first_token_seconds": ("histogram", "Seconds from admission request to the first generated token."),
    "kv_bytes_held": ("gauge", "Bytes held by the KV caches of requests in flight."),
    "kv_bytes_peak": ("gauge", "The most bytes the KV caches of requests in flight held at once."),
    "kv_bytes_budget": ("gauge", "The --max-kv-bytes budget (0: none)."),
    "prefix_store_bytes": ("gauge", "Bytes held by the prefix store."),
    "prefix_store_entries": ("gauge", "Entries in the prefix store."),
    "requests_running": ("gauge", "Requests admitted (reading their prompt or generating)."),
    "requests_waiting": ("gauge", "Requests waiting for KV memory."),
}
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Thread-safe metrics named in ``_HELP``, prefixed ``kvforge_`` on output."""

    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple], float] = {}
        self._hist: dict[str, list] = {}  # name -> [bucket counts, sum, count]

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            h = self._hist.setdefault(name, [[0] * len(_BUCKETS), 0.0, 0])
            for i, b in enumerate(_BUCKETS):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def get(self, name: str, **labels) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            values = dict(self._values)
            hist = {k: (list(v[0]), v[1], v[2]) for k, v in self._hist.items()}
        for name, (kind, doc) in _HELP.items():
            full = f"kvforge_{name}"
            lines += [f"# HELP {full} {doc}", f"# TYPE {full} {kind}"]
            if kind == "histogram":
                counts, total, count = hist.get(name, ([0] * len(_BUCKETS), 0.0, 0))
                lines += [f'{full}_bucket{{le="{b}"}} {c}' for b, c in zip(_BUCKETS, counts)]
                lines += [f'{full}_bucket{{le="+Inf"}} {count}', f"{full}_sum {total:.6f}", f"{full}_count {count}"]
                continue
            series = [(labels, v) for (n, labels), v in values.items() if n == name]
            for labels, v in series or [((), 0)]:
                tag = "{" + ",".join(f'{k}="{val}"' for k, val in labels) + "}" if labels else ""
                lines.append(f"{full}{tag} {int(v) if float(v).is_integer() else v}")
        return "\n".join(lines) + "\n"
