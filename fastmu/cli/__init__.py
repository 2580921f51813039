"""The ``fastmu`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``;
modules are imported here, but each imports its heavy dependencies (torch,
Numba, matplotlib) only inside the function that runs the command, so that
``fastmu --help`` stays instant.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from typing import Any, Iterator, Sequence

#: sub-command modules, in the order ``fastmu --help`` lists them
_COMMAND_MODULES = ("unmix", "train", "paper", "bench", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastmu",
        description="Fast multiplicative-update NMF and deep-unrolled MU (NALMU, ALMU).",
    )
    from fastmu import __version__

    parser.add_argument("--version", action="version", version=f"fastmu {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show Python's full traceback instead of one line (for bug reports)")
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


def _innermost(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)sub-command parser ``args`` was parsed by, so that its errors show its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None))
            if chosen is not None:
                return _innermost(chosen, args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the command's parser: its usage line, not fastmu's
        _innermost(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    # "data stats" rather than "data": the sub-command the user typed
    name = getattr(args, "command_name", args.command)
    # a command can name its own remedy for X's scale (unmix: --normalise)
    hint = getattr(args, "scale_hint", "")
    try:
        with warnings.catch_warnings(), _reader_may_leave() as out:
            warnings.showwarning = _show_warning(name, hint, warnings.showwarning)
            rc = args.func(args)
        if out.broken:  # the reader (`| head`) left: the files were written, the rest of the log not
            _silence_stdout()
    except KeyboardInterrupt:
        note = getattr(args, "interrupt_note", "")  # what the command leaves behind
        print(f"fastmu {name}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C
    except MemoryError as exc:
        if args.debug:
            raise
        print(f"fastmu {name}: error: not enough memory ({exc or 'the allocation failed'})", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError, RuntimeError, ImportError, FloatingPointError) as exc:
        if args.debug:
            raise
        # FileNotFoundError is an OSError; the others (a folder given as a file, a read-only place)
        # have no message of their own beyond strerror and the file name
        extra = f" {hint}" if hint and isinstance(exc, FloatingPointError) else ""
        print(f"fastmu {name}: error: {_one_line(exc)}{extra}", file=sys.stderr)
        return 2
    return int(rc or 0)


class _PipeOut:
    """``sys.stdout`` that outlives its reader: once the pipe is closed (``fastmu paper ... | head``)
    writes are dropped, so the command goes on to write its files instead of dying mid-run."""

    def __init__(self, stream: Any) -> None:
        self._stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self.broken = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _reader_may_leave() -> Iterator[_PipeOut]:
    saved = sys.stdout
    sys.stdout = out = _PipeOut(saved)
    try:
        yield out
    finally:
        sys.stdout = saved


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so that the interpreter's final flush of a closed pipe is quiet."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test's capture)
        pass


def _one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (an OSError as "what: file"), so the error stays one line."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename}"
    else:
        text = str(exc)
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(exc).__name__


def _show_warning(command: str, hint: str, default: Any) -> Any:
    """fastmu's warnings about the user's data (:class:`fastmu.ScaleWarning`) as
    ``fastmu CMD: warning: …`` with the command's remedy, without a source line; others as usual."""
    from fastmu.validation import ScaleWarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, ScaleWarning):
            print(f"fastmu {command}: warning: {message}{' ' + hint if hint else ''}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
