"""Argument types and output-path checks shared by the sub-commands.

Range checks live in argparse type functions rather than in the library
because argparse's messages name the option the user typed (``argument
--layers: ...``), while the library's name its parameters (``nalmu_layers``).

The path checks (:mod:`fastmu.paths`, re-exported here) run before any
work, so that a run of minutes does not end on an unwritable path.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

from fastmu.paths import check_input_file, check_output_file, check_output_folder, figure_path

__all__ = ["MAX_SEED", "check_input_file", "check_output_file", "check_output_folder", "figure_path",
           "add_set_options", "finite_float", "int_at_least", "non_negative_float", "path", "positive_float", "seed"]

#: the largest seed every command accepts: NumPy's RandomState (MU's random start) takes 0 … 2**32 - 1
MAX_SEED = 2**32 - 1


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a seed, 0 … 2**32 - 1."""
    value = int_at_least(0)(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most 2**32 - 1 = {MAX_SEED}, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite float > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite float."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def path(text: str) -> Path:
    """An argparse type: a non-empty path (``Path('')`` would silently be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the path is empty")
    return Path(text)


def add_set_options(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``paper`` share: the sets' seed and sizes, the device and dtype."""
    p.add_argument("--seed", type=seed, default=0, help="seed of the sets and of the training (default 0)")
    p.add_argument("--size", type=int_at_least(2), default=None,
                   help="map side, at least 2 (t = size²), overriding the preset's")
    p.add_argument("--n-train", type=int_at_least(1), default=None, help="training problems, overriding the preset's")
    p.add_argument("--n-test", type=int_at_least(1), default=None,
                   help="problems per test set, overriding the preset's")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="default float32")
