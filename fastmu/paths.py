"""Checks of input and output paths, made before the work that reads or writes them.

They create nothing: a folder that does not exist yet is checked by probing
the nearest one that does, so that a run of minutes does not end on an
unwritable path. Used by the command line and by
:func:`fastmu.experiments.run_paper`.
"""
from __future__ import annotations

import tempfile
from pathlib import Path


def check_output_file(target: Path, option: str) -> None:
    """Raise ValueError unless ``target`` can be written as a file (its folder may still be missing)."""
    if target.is_dir():
        raise ValueError(f"{option} {target} is a folder; give a file name")
    if target.exists():
        try:  # append mode creates and changes nothing, but fails where writing would
            with open(target, "ab"):
                pass
        except OSError as exc:
            raise ValueError(f"{option} {target} cannot be written ({exc.strerror})") from None
    check_output_folder(target.parent, option)
    if target.is_symlink():  # checkpoints are written beside the file a link points to, then renamed
        check_output_folder(target.resolve().parent, option)


def check_output_folder(folder: Path, option: str) -> None:
    """Raise ValueError unless ``folder`` is, or can be created as, a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = f"{folder} cannot be made: {existing}" if existing != folder else f"{folder}"
        raise ValueError(f"{option}: {what} is a file, not a folder")
    try:  # os.access says yes to root even on /sys: try it
        with tempfile.TemporaryFile(dir=existing, prefix=".fastmu-probe-"):
            pass
    except OSError as exc:
        raise ValueError(f"{option}: cannot write in {existing} ({exc.strerror or exc})") from None


def check_input_file(source: Path, option: str = "") -> None:
    """Raise FileNotFoundError/ValueError unless ``source`` is an existing file."""
    where = f"{option} " if option else ""
    if not source.exists():
        raise FileNotFoundError(f"{where}{source} does not exist")
    if source.is_dir():
        raise ValueError(f"{where}{source} is a folder, not a file")


def figure_path(target: Path, option: str = "--figure") -> Path:
    """The file a figure is written to, checked: a supported format, a writable place.

    A name without a suffix gets ``.png`` (what matplotlib would write anyway,
    silently), so the caller can report the real name.
    """
    if target.is_dir() or target.name in ("", ".", ".."):  # "." and ".." have no name to add .png to
        raise ValueError(f"{option} {target} is a folder; give a file name such as {target / 'figure.png'}")
    if not target.suffix:
        target = target.with_name(target.name + ".png")
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ImportError(f"{option} needs matplotlib (pip install matplotlib, or fastmu's data extra)") from None
    supported = FigureCanvasBase.get_supported_filetypes()
    fmt = target.suffix[1:].lower()
    if fmt not in supported:
        raise ValueError(f"{option} {target}: matplotlib cannot write .{fmt} files; use one of "
                         + ", ".join(f".{k}" for k in sorted(supported)))
    check_output_file(target, option)
    return target
