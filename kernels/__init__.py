"""fastmu.kernels: the fused kernels (pure array code, no torch).

- :mod:`fastmu.kernels.cpu` — Numba parallel CPU kernels.
- :mod:`fastmu.kernels.cuda` — Numba CUDA kernels (imported only on demand).

Nothing here is imported by ``import fastmu``.
"""

import numpy as _np

# numba-cuda <= 0.30 registers an overload for ``np.row_stack`` when it first
# compiles a kernel; NumPy 2.5 removed that alias (deprecated since 2.0), so
# every CUDA compilation failed with AttributeError. Restore the alias (it was
# exactly ``np.vstack``) before any kernel is compiled.
if not hasattr(_np, "row_stack"):
    _np.row_stack = _np.vstack


def _private_cache_dir() -> str:
    """A folder of this user's own for Numba's compiled kernels: stable across runs where the
    system's temporary folder allows, else a fresh one."""
    import os
    import stat
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None:
        base = os.path.join(tempfile.gettempdir(), f"fastmu-numba-cache-{uid}")
        try:
            os.makedirs(base, mode=0o700, exist_ok=True)
            # Numba loads pickled code from here: only a real folder (not a symlink, which its
            # owner could re-point) of this user's, that no one else can write
            st = os.lstat(base)
            if (stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022
                    and os.access(base, os.W_OK)):
                return base
        except OSError:
            pass
    return tempfile.mkdtemp(prefix="fastmu-numba-cache-")


def _ensure_kernel_cache() -> None:
    """Give Numba somewhere to cache the CPU kernels (``cache=True``) where it has nowhere.

    Numba writes them beside this package (``__pycache__``) or in the user's
    cache folder (``~/.cache/numba``); where it can write neither (a read-only
    install run by a user without a writable home, as in many containers) it
    raises "cannot cache function" at the first kernel import. There the
    kernels are cached in a private folder under the system's temporary
    folder instead, with a warning that ``NUMBA_CACHE_DIR`` chooses another.
    """
    import os
    import warnings

    import numba

    if numba.config.CACHE_DIR or numba.config.DISABLE_JIT:
        return  # the user chose a folder; or nothing is compiled
    try:
        from numba.core.caching import CacheImpl

        def probe() -> None:
            pass

        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu.py")
        if any(loc.from_function(probe, here) is not None for loc in CacheImpl._locator_classes):
            return
    except Exception:  # Numba's internals moved: leave caching to Numba
        return
    try:
        folder = _private_cache_dir()
    except OSError as e:
        raise RuntimeError(
            "Numba has nowhere to write fastmu's compiled kernels: neither beside the package, nor in "
            f"the user's cache folder, nor in the temporary folder ({e}). Set NUMBA_CACHE_DIR to a "
            "writable folder") from None
    # The environment too: Numba re-reads its configuration from it (at a compilation, when a
    # NUMBA_* variable has changed), and worker processes inherit it. It is process-wide: other
    # cache=True functions of this process are cached there as well.
    os.environ["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR = folder
    warnings.warn(
        "Numba cannot write compiled kernels beside fastmu or in the user's cache folder; fastmu "
        f"set NUMBA_CACHE_DIR={folder} for this process. Set NUMBA_CACHE_DIR to choose the folder",
        RuntimeWarning, stacklevel=2)


_ensure_kernel_cache()
