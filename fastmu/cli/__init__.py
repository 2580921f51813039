"""The ``fastmu`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``;
modules are imported here, but each imports its heavy dependencies (torch,
Numba, matplotlib) only inside the function that runs the command, so that
``fastmu --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: sub-command modules, in the order ``fastmu --help`` lists them
_COMMAND_MODULES = ("unmix", "train", "paper", "bench", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmu",
        description="Fast multiplicative-update NMF and deep-unrolled MU (NALMU, ALMU).",
    )
    from fastmu import __version__

    parser.add_argument("--version", action="version", version=f"fastmu {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"fastmu.cli.{name}")
        except ModuleNotFoundError as exc:  # a sub-command not shipped in this build
            if exc.name == f"fastmu.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as exc:
        print(f"fastmu {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
