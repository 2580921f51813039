"""Counting the torch (aten) ops a piece of code dispatches: a host-cost measure for GPU paths.

On a GPU each op costs host time (dispatch, and a launch for most), so the op
count of a training step is a device-independent measure of its host work.
"""
from __future__ import annotations

from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AtenOpCounter"]


class AtenOpCounter(TorchDispatchMode):
    """``with AtenOpCounter() as c: ...`` counts the aten ops dispatched inside, below
    autograd (a backward's ops included): ``c.ops``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))
