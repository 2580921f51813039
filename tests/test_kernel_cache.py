"""Where Numba can write neither beside fastmu nor in the user's cache folder (a read-only
install in a container), the CPU kernels still compile, cache and run."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid"), reason="the private cache folder is per uid (POSIX)")

# Numba's locators probe a folder by writing a file in it: every folder outside the temporary
# one reads as read-only here, as it would to a non-root user of a read-only file system.
_SCRIPT = textwrap.dedent("""
    import os, sys, tempfile, warnings
    import numpy as np
    from numba.core import caching

    tmp = tempfile.gettempdir()
    real = caching._CacheLocator.ensure_cache_path

    def read_only_outside_tmp(self):
        if not os.path.abspath(self.get_cache_path()).startswith(tmp + os.sep):
            raise PermissionError(13, "Read-only file system", self.get_cache_path())
        return real(self)

    caching._CacheLocator.ensure_cache_path = read_only_outside_tmp
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastmu
        X = np.random.default_rng(0).random((12, 64))
        A, S = fastmu.mu(X, 2, n_iter=5, random_state=0)
    print("finite", bool(np.isfinite(A).all() and np.isfinite(S).all()))
    print("warned", any("NUMBA_CACHE_DIR" in str(w.message) for w in caught))
    folder = os.path.join(tmp, f"fastmu-numba-cache-{os.getuid()}")
    print("cached", any(f.endswith(".nbi") for _, _, fs in os.walk(folder) for f in fs))
    # Numba re-reads its configuration from the environment when a NUMBA_* variable changed:
    # the folder must survive that, or the next kernel module to load would fail
    import numba
    os.environ["NUMBA_OPT"] = "2"
    numba.core.config.reload_config()
    print("kept", numba.config.CACHE_DIR == folder)
""")


def test_kernels_run_and_cache_where_numba_has_no_cache_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "finite True" in out and "warned True" in out and "cached True" in out and "kept True" in out, out


def test_a_chosen_cache_folder_is_left_alone(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "mine"))
    code = "import warnings; warnings.simplefilter('error'); import fastmu.kernels, numba; print(numba.config.CACHE_DIR)"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == str(tmp_path / "mine"), r.stdout + r.stderr


def _private_dir(tmp_path, monkeypatch):
    import tempfile

    from fastmu.kernels import _private_cache_dir

    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    return _private_cache_dir()


def test_the_private_folder_is_stable_and_only_this_user_s(tmp_path, monkeypatch):
    base = tmp_path / f"fastmu-numba-cache-{os.getuid()}"
    assert _private_dir(tmp_path, monkeypatch) == str(base) == _private_dir(tmp_path, monkeypatch)
    assert base.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("plant", ["symlink", "group_writable", "other_owner"])
def test_a_planted_folder_is_not_used(tmp_path, monkeypatch, plant):
    # Numba loads pickled code from the folder: one that someone else controls or could
    # re-point must give way to a fresh private folder
    base = tmp_path / f"fastmu-numba-cache-{os.getuid()}"
    if plant == "symlink":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        base.symlink_to(target)
    else:
        base.mkdir(mode=0o700)
        if plant == "group_writable":
            base.chmod(0o770)
        else:
            if os.getuid() != 0:
                pytest.skip("giving a folder to another user needs root")
            os.chown(base, 65534, 65534)
    got = _private_dir(tmp_path, monkeypatch)
    assert got != str(base) and os.path.basename(got).startswith("fastmu-numba-cache-")
    assert os.path.isdir(got) and not os.path.islink(got)
