"""A process forked after fastmu's CPU kernels ran gets a RuntimeError, not SIGTERM or a hang."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

# The parent runs `before` (or nothing), forks, and the child runs `call`; the child's exit
# code says what happened: 0 ran, 3 RuntimeError naming the start methods, 4 another error.
# SIGTERM (Numba's own guard) shows as -15.
_SCRIPT = textwrap.dedent("""
    import os, sys
    import numpy as np
    import torch
    import fastmu
    from fastmu.baselines import cd
    X = np.random.default_rng(0).random((2, 12, 256))
    # big enough for torch's CPU operations to go parallel (and so hang on the inherited OpenMP
    # runtime) if one ran before fastmu's check
    Xb = np.random.default_rng(1).random((65, 4096)).astype(np.float32)
    calls = {
        "mu": lambda: fastmu.mu(X, 3, n_iter=3, random_state=0),
        "cd": lambda: cd(X, 3, n_iter=3, random_state=0),
        "nmf": lambda: fastmu.NMF(3, max_iter=3, init="random", random_state=0).fit(X[0]),
        "nalmu": lambda: fastmu.NALMU(2, 12, 3)(torch.from_numpy(X).float()),
        "loss": lambda: fastmu.losses.unrolled_loss(
            [(torch.rand(2, 12, 3), torch.rand(2, 3, 256))], torch.rand(2, 12, 3), torch.rand(2, 3, 256)),
        # torch's CPU operations hang on the OpenMP runtime Numba's threads hold: refused as well
        "mu_torch": lambda: fastmu.mu(X, 3, n_iter=3, random_state=0, backend="torch"),
        "nalmu_torch": lambda: fastmu.NALMU(2, 12, 3, fused=False)(torch.from_numpy(X).float()),
        "dnmf": lambda: fastmu.baselines.DNMF(2, 12, 3, A_init=np.random.rand(12, 3))(torch.from_numpy(X).float()),
        "mu_tensor": lambda: fastmu.mu(torch.from_numpy(Xb), 4, n_iter=3, random_state=0),
        "cd_tensor": lambda: cd(torch.from_numpy(Xb), 4, n_iter=3, random_state=0),
        "nmf_tensor": lambda: fastmu.NMF(4, max_iter=3, init="random", random_state=0).fit(torch.from_numpy(Xb.T)),
        "nmf_cd_transform": lambda: NMF_CD.transform(np.tile(Xb.T, (4, 1))),
        "mix": lambda: fastmu.data.mix(np.ones((1, 65, 4)), np.ones((1, 4, 64, 64)), 60.0, seeds=[0]),
    }
    if sys.argv[1] == "loss":  # small enough for the serial kernel: no threads started
        calls["loss"]()
    if sys.argv[1] == "run":
        calls["mu"]()
        NMF_CD = fastmu.NMF(4, solver="cd", max_iter=3, init="random", random_state=0).fit(Xb.T)
    pid = os.fork()
    if pid == 0:
        import signal
        signal.alarm(60)  # a hang ends as SIGALRM (-14)
        try:
            calls[sys.argv[2]]()
            code = 0
        except RuntimeError as e:
            code = 3 if "spawn" in str(e) and "fork" in str(e) else 4
        except BaseException:
            code = 4
        os._exit(code)
    print("layer", __import__("numba").threading_layer() if sys.argv[1] == "run" else "-")
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) + 100)
""")


def _fork_child(parent: str, call: str, **env: str) -> tuple[int, str]:
    full = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", _SCRIPT, parent, call], env=full,
                       capture_output=True, text=True, timeout=240)
    return r.returncode - 100, r.stdout + r.stderr


@pytest.mark.parametrize("call", ["mu", "cd", "nmf", "nalmu", "loss", "mu_torch", "nalmu_torch", "dnmf",
                                  "mu_tensor", "cd_tensor", "nmf_tensor", "nmf_cd_transform", "mix"])
def test_forked_child_gets_a_clear_error_under_openmp(call):
    code, out = _fork_child("run", call)
    if "layer omp" not in out:
        pytest.skip(f"Numba chose another threading layer here: {out.strip()[:80]}")
    assert code == 3, out


def test_child_forked_before_any_run_works():
    code, out = _fork_child("idle", "mu")
    assert code == 0, out


def test_child_forked_after_serial_kernels_only_works():
    # the parent ran a kernel too small for threads: none started, so nothing to inherit
    code, out = _fork_child("loss", "mu")
    assert code == 0, out


def test_fork_safe_layer_is_not_refused():
    code, out = _fork_child("run", "mu", NUMBA_THREADING_LAYER="workqueue")
    assert "layer workqueue" in out, out
    assert code == 0, out


# Several Python threads call fastmu at once; each call's result must equal the one it gives
# alone. Exit code 0: all equal; 5: a difference. Numba's own guard aborts the process (-6).
_THREADS_SCRIPT = textwrap.dedent("""
    import sys
    from concurrent.futures import ThreadPoolExecutor
    import numpy as np
    import torch
    import fastmu
    from fastmu.baselines import cd

    rng = np.random.default_rng(0)
    Xs = [rng.random((2, 12, 300)) for _ in range(4)]

    def model(X):
        torch.manual_seed(0)
        net = fastmu.NALMU(3, 12, 3).double()
        A, S = net(torch.from_numpy(X))
        loss = fastmu.losses.unrolled_loss([(A, S)], torch.ones(2, 12, 3, dtype=torch.float64),
                                          torch.ones(2, 3, 300, dtype=torch.float64))
        loss.backward()
        return [A.detach().numpy(), S.detach().numpy(), net.theta.grad.numpy()]

    calls = {
        "mu": lambda X: fastmu.mu(X, 3, n_iter=200, random_state=0),
        "mu_f32_tol": lambda X: fastmu.mu(X.astype(np.float32), 4, n_iter=200, tol=1e-6, check_every=5,
                                          random_state=0),
        "cd": lambda X: cd(X, 3, n_iter=50, random_state=0),
        "nmf": lambda X: fastmu.NMF(3, max_iter=50, init="random", random_state=0).fit_transform(X[0]),
        "model": model,
    }
    fn = calls[sys.argv[1]]
    alone = [fn(X) for X in Xs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            together = list(pool.map(fn, Xs))
            for a, b in zip(alone, together):
                for u, v in zip(*(x if isinstance(x, (list, tuple)) else [x] for x in (a, b))):
                    if not np.array_equal(u, v):
                        sys.exit(5)
    print("layer", __import__("numba").threading_layer())
""")


@pytest.mark.parametrize("layer", ["workqueue", "default"])
@pytest.mark.parametrize("call", ["mu", "mu_f32_tol", "cd", "nmf", "model"])
def test_threads_calling_together_get_what_they_get_alone(call, layer):
    # workqueue ends the process when two threads enter parallel code at once: fastmu takes turns
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    r = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, call], env=env,
                       capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    if layer == "workqueue":
        assert "layer workqueue" in out, out
