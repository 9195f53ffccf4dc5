"""Which source layers feed each target layer."""

from __future__ import annotations

STRATEGIES = ("terminal", "uniform", "nearest", "all")


def layer_map(n_source: int, n_target: int, strategy: str = "nearest", k: int = 3) -> list[list[int]]:
    """Source layer indices for every target layer.

    terminal: the last layers aligned (C2C): target layer i <- source layer i + (n_source - n_target), the
        first layers of the deeper model clamped; uniform: one source layer at the same relative depth;
    nearest: the ``k`` source layers closest to that relative depth; all: every source layer.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if n_source < 1 or n_target < 1:
        raise ValueError("both models need at least one layer")
    out = []
    for i in range(n_target):
        rel = i / (n_target - 1) if n_target > 1 else 1.0
        centre = rel * (n_source - 1)
        if strategy == "terminal":
            out.append([min(max(i + n_source - n_target, 0), n_source - 1)])
        elif strategy == "uniform":
            out.append([round(centre)])
        elif strategy == "all":
            out.append(list(range(n_source)))
        else:
            order = sorted(range(n_source), key=lambda j: (abs(j - centre), j))
            out.append(sorted(order[: min(k, n_source)]))
    return out
