"""The ``kvforge`` command line: a thin layer over the library, one module per command group."""

from __future__ import annotations

import argparse
import sys

from . import core


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvforge", description="The KV cache of Hugging Face causal LMs as data: inspect, save, ship, evaluate."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    core.add_commands(sub)
    for mod in _optional_groups():
        mod.add_commands(sub)
    return parser


def _optional_groups():
    import importlib

    mods = []
    for name in ("kvforge.cli.evaluate", "kvforge.cli.quant", "kvforge.cli.translate", "kvforge.cli.mla", "kvforge.cli.serve"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    return mods


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kvforge: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, KeyError) as e:
        # one line, naming the problem; library errors carry their own explanation
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"kvforge {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
