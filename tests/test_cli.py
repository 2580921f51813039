"""The fastmu command line, run in-process as a user would."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

import fastmu
from fastmu.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("unmix", "bench", "data"):
        assert cmd in out


def test_unmix_npy_with_truth(tmp_path, capsys):
    rng = np.random.default_rng(0)
    A, S = rng.random((12, 3)), rng.random((3, 200)) ** 4
    np.save(tmp_path / "X.npy", A @ S)
    np.savez(tmp_path / "truth.npz", A=A, S=S)
    out = tmp_path / "res.npz"
    rc = main(["unmix", str(tmp_path / "X.npy"), "-n", "3", "--iters", "800", "--dtype", "float64",
               "--truth", str(tmp_path / "truth.npz"), "--out", str(out), "--no-progress"])
    assert rc == 0
    res = np.load(out)
    assert res["A"].shape == (12, 3) and res["S"].shape == (3, 200)
    assert res["score_cos_A"] > 0.95
    assert "mean cosine" in capsys.readouterr().out


def test_unmix_penalty_options_reach_the_solver(tmp_path, capsys):
    """--l1-S etc. run fastmu.mu's penalised updates: the saved factors are the reference's."""
    from fastmu.penalty import Penalty
    from fastmu.reference import mu_numpy

    rng = np.random.default_rng(1)
    X = rng.random((10, 3)) @ rng.random((3, 80))
    np.save(tmp_path / "X.npy", X)
    out = tmp_path / "res.npz"
    rc = main(["unmix", str(tmp_path / "X.npy"), "-n", "3", "--iters", "25", "--dtype", "float64",
               "--l1-S", "0.05", "--l2-A", "0.2", "--out", str(out), "--no-progress"])
    assert rc == 0
    A0, S0 = fastmu.mu(X, 3, n_iter=0, random_state=0)
    A, S = mu_numpy(X[None], A0[None], S0[None], 25, penalty=Penalty(l2_A=0.2, l1_S=0.05))
    res = np.load(out)
    np.testing.assert_allclose(res["A"], A[0], rtol=1e-10)
    np.testing.assert_allclose(res["S"], S[0], rtol=1e-10, atol=1e-14)
    with pytest.raises(SystemExit):
        main(["unmix", str(tmp_path / "X.npy"), "-n", "3", "--l1-A", "-1"])
    assert "--l1-A" in capsys.readouterr().err


@pytest.mark.parametrize("S_truth, msg", [
    ("transposed", r"S has shape \(200, 3\); X and -n 3 need \(3, 200\)"),
    ("nan", "S contains NaN"),
])
def test_unmix_truth_that_does_not_fit_is_refused_before_the_run(tmp_path, capsys, S_truth, msg):
    # a (t, n) S of the right size used to be reshaped to (n, t) and scored wrong;
    # a NaN truth printed cos 0 and exited 0
    rng = np.random.default_rng(0)
    A, S = rng.random((12, 3)), rng.random((3, 200))
    np.save(tmp_path / "X.npy", A @ S)
    S_t = S.T.copy() if S_truth == "transposed" else np.where(np.arange(200) == 5, np.nan, S)
    np.savez(tmp_path / "truth.npz", A=A, S=S_t)
    rc = main(["unmix", str(tmp_path / "X.npy"), "-n", "3", "--truth", str(tmp_path / "truth.npz"),
               "--out", str(tmp_path / "r.npz"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and re.search(msg, captured.err) and "iterations in" not in captured.out
    assert not (tmp_path / "r.npz").exists()


def test_unmix_nndsvd_starts(tmp_path):
    """--init takes every NNDSVD start; nndsvdar's fill follows --seed, nndsvd's zeros stay zero."""
    import fastmu

    X = np.random.default_rng(0).random((8, 60))
    np.save(tmp_path / "X.npy", X)
    res = {}
    for init, seed in (("nndsvd", 0), ("nndsvda", 0), ("nndsvdar", 0), ("nndsvdar", 1)):
        out = tmp_path / f"{init}{seed}.npz"
        assert main(["unmix", str(tmp_path / "X.npy"), "-n", "3", "--iters", "20", "--init", init, "--seed",
                     str(seed), "--dtype", "float64", "--out", str(out), "--no-progress"]) == 0
        res[init, seed] = np.load(out)
        A, S = fastmu.mu(X, 3, n_iter=20, init=init, random_state=seed)
        np.testing.assert_array_equal(res[init, seed]["A"], A)
        np.testing.assert_array_equal(res[init, seed]["S"], S)
    assert (res["nndsvd", 0]["A"] == 0).any() and (res["nndsvda", 0]["A"] > 0).all()
    assert not np.array_equal(res["nndsvdar", 0]["A"], res["nndsvdar", 1]["A"])


def test_unmix_cube_truth_may_be_maps(tmp_path):
    rng = np.random.default_rng(2)
    A, maps = rng.random((10, 2)), rng.random((2, 6, 7))
    cube = np.einsum("mk,khw->hwm", A, maps)
    np.savez(tmp_path / "cube.npz", X=cube, A=A, S=maps)
    assert main(["unmix", str(tmp_path / "cube.npz"), "--key", "X", "--layout", "hwm", "-n", "2", "--iters", "300",
                 "--truth", str(tmp_path / "cube.npz"), "--out", str(tmp_path / "r.npz"), "--no-progress"]) == 0
    assert np.load(tmp_path / "r.npz")["score_cos_A"] > 0.9


def test_unmix_out_without_suffix_names_the_file_it_writes(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).random((5, 30)))
    assert main(["unmix", str(tmp_path / "X.npy"), "-n", "2", "--iters", "3", "--out", str(tmp_path / "res"),
                 "--no-progress"]) == 0
    assert (tmp_path / "res.npz").exists()
    assert f"saved {tmp_path / 'res.npz'}" in capsys.readouterr().out


def test_unmix_figure_of_a_batch_is_refused_before_the_run(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).random((2, 5, 30)))
    assert main(["unmix", str(tmp_path / "X.npy"), "-n", "2", "--figure", str(tmp_path / "f.png"),
                 "--no-progress"]) == 2
    assert "--figure draws one problem" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_unmix_file_that_is_not_numpy_is_named(tmp_path, capsys, suffix):
    (tmp_path / f"X{suffix}").write_bytes(b"not an array")
    assert main(["unmix", str(tmp_path / f"X{suffix}"), "-n", "2", "--no-progress"]) == 2
    assert f"is not a NumPy {suffix} file" in capsys.readouterr().err


def test_unmix_cube_layout(tmp_path):
    rng = np.random.default_rng(1)
    cube = rng.random((6, 7, 10))  # rows, cols, bands
    np.savez(tmp_path / "cube.npz", X=cube)
    out = tmp_path / "r.npz"
    assert main(["unmix", str(tmp_path / "cube.npz"), "--layout", "hwm", "-n", "2", "--iters", "5",
                 "--out", str(out), "--no-progress"]) == 0
    res = np.load(out)
    assert res["A"].shape == (10, 2) and res["S_maps"].shape == (2, 6, 7)


def test_unmix_demo_runs(tmp_path):
    out = tmp_path / "demo.npz"
    fig = tmp_path / "demo.png"
    assert main(["unmix", "--demo", "--iters", "50", "--out", str(out), "--figure", str(fig), "--no-progress"]) == 0
    assert np.load(out)["S_maps"].shape == (4, 128, 128)
    assert fig.stat().st_size > 10_000


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["unmix"], "give an input"),
        (["unmix", "missing.npy", "-n", "2"], "does not exist"),
        (["unmix", "{bad}", "-n", "2"], "must be non-negative"),
        (["unmix", "{x}"], "n-components is required"),
        (["unmix", "{x}", "-n", "2", "--layout", "hwm"], "expects a 3-D array"),
    ],
)
def test_unmix_errors(tmp_path, capsys, argv, msg):
    np.save(tmp_path / "bad.npy", -np.ones((3, 4)))
    np.save(tmp_path / "x.npy", np.ones((3, 4)))
    argv = [a.replace("{bad}", str(tmp_path / "bad.npy")).replace("{x}", str(tmp_path / "x.npy")) for a in argv]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["paper", "tall"])
def test_bench_quick_writes_json(tmp_path, capsys, workload):
    out = tmp_path / "b.json"
    assert main(["bench", "--workload", workload, "--iters", "3", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    peers = {r["peer"] for r in res["results"]}
    assert {"fastmu", "numpy", "torch"} <= peers
    assert list(res["workloads"]) == [workload]
    assert res["machine"]["cpu"] and res["machine"]["packages"]["numpy"]
    # the tall X runs on its transpose, and X as given is timed beside it
    assert res["cpu_transposed"] == {workload: workload == "tall"}
    assert ("fastmu-untransposed" in peers) == (workload == "tall")
    out = capsys.readouterr().out
    assert "fastmu speedup" in out and ("(on Xᵀ)" in out) == (workload == "tall")


def test_bench_says_when_scikit_learn_is_missing(monkeypatch):
    import builtins

    from fastmu.benchmarks.mu_cpu import run_workload

    real = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.warns(RuntimeWarning, match="without its sklearn peer"):
        rows = run_workload("paper", n_iter=2, repeats=1, progress=False, peers=("sklearn",))
    assert [r.peer for r in rows] == ["fastmu"]


def test_every_timed_cpu_run_starts_after_a_rest(monkeypatch):
    # a peer right after NumPy's or scikit-learn's run shared the cores with OpenBLAS's spinning threads
    import time

    from fastmu.benchmarks import machine
    from fastmu.benchmarks.mu_cpu import run_workload

    events = []
    monkeypatch.setattr(machine, "settle", lambda seconds=machine.SETTLE_S: events.append("rest"))
    real = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: events.append("clock") or real())
    rows = run_workload("tall", n_iter=2, repeats=2, progress=False)
    starts = [i for i in range(1, len(events)) if events[i] == "clock" and events[i - 1] == "rest"]
    assert len(starts) == 2 * len(rows) and events.count("rest") == 2 * len(rows)  # one rest per timed run
    assert [r.peer for r in rows][:1] == ["fastmu"]


def test_cuda_without_gpu_is_a_clean_error(tmp_path, capsys, monkeypatch):
    import fastmu.dispatch as dispatch
    import fastmu.solver as solver

    monkeypatch.setattr(solver, "cuda_available", lambda: False)
    monkeypatch.setattr(dispatch, "cuda_available", lambda: False)
    np.save(tmp_path / "x.npy", np.ones((3, 4)))
    rc = main(["unmix", str(tmp_path / "x.npy"), "-n", "2", "--backend", "cuda", "--no-progress",
               "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--backend cuda: no CUDA GPU" in err and "use --backend cpu" in err


def test_unmix_names_the_remedy_for_x_s_scale_and_normalise_applies_it(tmp_path, capsys):
    rng = np.random.default_rng(1)
    X = rng.random((12, 3)) @ rng.random((3, 300))
    np.save(tmp_path / "tiny.npy", X * 1e-11)
    np.save(tmp_path / "huge.npy", (X * 1e36).astype(np.float32))
    out = tmp_path / "res.npz"
    common = ["-n", "3", "--iters", "300", "--out", str(out), "--no-progress"]

    assert main(["unmix", str(tmp_path / "tiny.npy"), *common]) == 0
    err = capsys.readouterr().err
    assert err.startswith("fastmu unmix: warning: X has mean") and err.rstrip().endswith("--normalise does that.")
    assert float(np.load(out)["residual"]) > 0.5  # the factors vanished, as warned

    assert main(["unmix", str(tmp_path / "tiny.npy"), "--normalise", *common]) == 0
    assert capsys.readouterr().err == ""
    res = np.load(out)
    assert float(res["residual"]) < 0.05
    assert np.linalg.norm(X * 1e-11 - res["A"] @ res["S"]) / np.linalg.norm(X * 1e-11) < 0.05  # A scaled back

    assert main(["unmix", str(tmp_path / "huge.npy"), *common]) == 2
    err = capsys.readouterr().err
    assert "error: MU overflowed float32" in err and "--normalise does that." in err
    assert main(["unmix", str(tmp_path / "huge.npy"), "--normalise", *common]) == 0
    assert float(np.load(out)["residual"]) < 0.05


# --- the audit of the CLI: wrong output, tracebacks, messages ---------------------------------------------------


def _x(tmp_path, dtype=float, shape=(12, 3, 60), seed=0):
    """A rank-3 X = A S (as `dtype`) and its truth in tmp_path: X.npy, truth.npz."""
    rng = np.random.default_rng(seed)
    m, n, t = shape
    A, S = rng.random((m, n)), rng.random((n, t)) ** 2
    X = A @ S
    X = (X > np.median(X)) if dtype is bool else (X * 10).astype(dtype) if np.dtype(dtype).kind == "i" else X
    np.save(tmp_path / "X.npy", X)
    np.savez(tmp_path / "truth.npz", A=A, S=S)
    return tmp_path / "X.npy"


@pytest.mark.parametrize("dtype, args, want", [(np.int64, [], np.float64), (bool, [], np.float64),
                                               (np.int64, ["--dtype", "float32"], np.float32)])
def test_unmix_factors_are_floating_whatever_x_is(tmp_path, dtype, args, want):
    # the truth path used to cast the factors to X's dtype (int64, bool); --dtype was ignored for integers
    x = _x(tmp_path, dtype)
    out = tmp_path / "r.npz"
    assert main(["unmix", str(x), "-n", "3", "--iters", "5", "--truth", str(tmp_path / "truth.npz"), *args,
                 "--out", str(out), "--no-progress"]) == 0
    res = np.load(out)
    assert res["A"].dtype == want and res["S"].dtype == want


def test_unmix_reports_and_saves_the_iterations_run(tmp_path, capsys):
    out = tmp_path / "r.npz"
    assert main(["unmix", str(_x(tmp_path)), "-n", "3", "--iters", "3000", "--tol", "1e-2", "--out", str(out),
                 "--no-progress"]) == 0
    n_iter = int(np.load(out)["n_iter"])
    assert 0 < n_iter < 3000 and n_iter % 10 == 0  # tol is checked every 10 iterations
    assert f"{n_iter} iterations (stopped early by --tol; --iters 3000)" in capsys.readouterr().out


def _paths(tmp_path):
    (tmp_path / "adir.npz").mkdir()
    (tmp_path / "figdir.png").mkdir()
    (tmp_path / "afile").write_text("")
    return {"{t}": str(tmp_path)}


@pytest.mark.parametrize("extra, msg", [
    (["--out", "{t}/adir.npz"], "--out {t}/adir.npz is a folder"),
    (["--out", "{t}/afile/o.npz"], "--out: {t}/afile is a file, not a folder"),
    (["--figure", "{t}/figdir.png"], "--figure {t}/figdir.png is a folder"),
    (["--figure", "{t}"], "--figure {t} is a folder; give a file name such as {t}/figure.png"),
    (["--figure", "{t}/.."], "--figure {t}/.. is a folder"),
    (["--figure", "{t}/f.xyz"], "matplotlib cannot write .xyz files; use one of"),
    (["--figure", "{t}/afile/f.png"], "--figure: {t}/afile is a file, not a folder"),
])
def test_unmix_output_paths_are_checked_before_the_run(tmp_path, capsys, extra, msg):
    subst = _paths(tmp_path)
    extra = [a.replace("{t}", subst["{t}"]) for a in extra]
    x = _x(tmp_path)
    rc = main(["unmix", str(x), "-n", "3", "--iters", "5", "--no-progress", *extra]
              + ([] if "--out" in extra else ["--out", str(tmp_path / "r.npz")]))
    captured = capsys.readouterr()
    assert rc == 2 and msg.replace("{t}", str(tmp_path)) in captured.err
    assert "iterations in" not in captured.out and not (tmp_path / "r.npz").exists()


def test_unwritable_output_folder_is_one_line_before_the_run(tmp_path, capsys, monkeypatch):
    # a read-only place (/sys, a folder without write permission): simulated, as root may write anywhere else
    from fastmu import paths

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", refuse)
    assert main(["unmix", str(_x(tmp_path)), "-n", "3", "--out", str(tmp_path / "r.npz"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"fastmu unmix: error: --out: cannot write in {tmp_path} (Permission denied)\n"
    assert "iterations in" not in captured.out


def test_unmix_input_that_is_a_folder(tmp_path, capsys):
    (tmp_path / "d.npy").mkdir()
    assert main(["unmix", str(tmp_path / "d.npy"), "-n", "2"]) == 2
    assert f"{tmp_path / 'd.npy'} is a folder, not a file" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["--out", ""], "argument --out: the path is empty"),
    (["--figure", ""], "argument --figure: the path is empty"),
    (["--seed", "-3", "--init", "nndsvda"], "argument --seed: must be >= 0, got -3"),
    (["-n", "0"], "argument -n/--n-components: must be >= 1, got 0"),
])
def test_unmix_argument_errors_name_the_option(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(["unmix", str(_x(tmp_path)), *(["-n", "3"] if "-n" not in argv else []), *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_unmix_figure_without_suffix_names_the_file_it_writes(tmp_path, capsys):
    np.save(tmp_path / "X.npy", np.random.default_rng(0).random((5, 30)))
    assert main(["unmix", str(tmp_path / "X.npy"), "-n", "2", "--iters", "2", "--out", str(tmp_path / "r.npz"),
                 "--figure", str(tmp_path / "fig"), "--no-progress"]) == 0
    assert (tmp_path / "fig.png").exists() and f"saved {tmp_path / 'fig.png'}\n" in capsys.readouterr().out


@pytest.mark.parametrize("exc, rc, msg", [(MemoryError("Unable to allocate 298. GiB"), 2,
                                           "fastmu unmix: error: not enough memory (Unable to allocate 298. GiB)"),
                                          (KeyboardInterrupt(), 130, "fastmu unmix: interrupted")])
def test_memory_error_and_ctrl_c_are_one_line(tmp_path, capsys, monkeypatch, exc, rc, msg):
    import fastmu.solver

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(fastmu.solver, "solve", fail)
    assert main(["unmix", str(_x(tmp_path)), "-n", "3", "--out", str(tmp_path / "r.npz"), "--no-progress"]) == rc
    assert capsys.readouterr().err == msg + "\n"


def test_os_errors_are_one_line(tmp_path, capsys, monkeypatch):
    # whatever the up-front checks miss (a disk that fills up, a race) still ends in one line, not a traceback
    def fail(*args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", "somewhere.npz")

    x = _x(tmp_path)
    monkeypatch.setattr(np, "savez", fail)
    assert main(["unmix", str(x), "-n", "3", "--iters", "2", "--out", str(tmp_path / "r.npz"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == "fastmu unmix: error: Is a directory: somewhere.npz\n"


@pytest.mark.parametrize("argv, msg", [
    (["--demo", "-n", "3"], "the demo scene has 4 components"),
    (["--demo", "--truth", "{t}/truth.npz"], "--truth does not apply to --demo"),
    (["--demo", "--layout", "hwm", "--key", "X"], "--key, --layout do not apply to --demo"),
    (["{t}/X.npy", "-n", "3", "--key", "X"], "--key names an array inside an .npz"),
    (["{t}/X.npy", "-n", "3", "--truth-keys", "A", "S"], "give --truth too"),
    (["{t}/k.npz", "-n", "3", "--key", "nope"], "has no array 'nope' (given with --key); its arrays: foo, bar"),
    (["{t}/k.npz", "-n", "3"], "holds foo, bar; name the array with --key"),
    (["{t}/X.npy", "-n", "3", "--truth", "{t}/k.npz"],
     "has no array 'A' (its arrays: foo, bar); name them with --truth-keys A_KEY S_KEY"),
    (["{t}/X.npy", "-n", "3", "--truth", "{t}/X.npy"], "expected an .npz holding the true A and S"),
])
def test_unmix_options_that_would_be_ignored_or_misread(tmp_path, capsys, argv, msg):
    _x(tmp_path)
    np.savez(tmp_path / "k.npz", foo=np.ones((3, 4)), bar=np.ones((3, 4)))
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    assert main(["unmix", *argv, "--out", str(tmp_path / "r.npz"), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert msg in captured.err and "iterations in" not in captured.out and "demo scene" not in captured.out


def test_unmix_options_have_help():
    from fastmu.cli import build_parser

    unmix = build_parser()._subparsers._group_actions[0].choices["unmix"]
    missing = [a.dest for a in unmix._actions if not a.help]
    assert missing == []
    assert "3-D array without --layout is a batch" in unmix.format_help()


@pytest.mark.parametrize("argv, msg", [
    (["--suite", "nalmu", "--iters", "3"], "--iters applies to the mu suite only"),
    (["--suite", "nalmu", "--workload", "tall"], "--workload applies to the mu suite only"),
    (["--device", "cuda", "--workload", "tall"], "--workload picks CPU workloads"),
    (["--out", "{t}/afile/b.json"], "--out: {t}/afile is a file, not a folder"),
])
def test_bench_refuses_options_it_would_ignore_and_bad_outputs_up_front(tmp_path, capsys, argv, msg):
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    assert main(["bench", "--quick", *argv]) == 2
    assert msg.replace("{t}", str(tmp_path)) in capsys.readouterr().err


@pytest.mark.parametrize("scale, why", [(1e300, "largest value"), (1e-50, "smallest non-zero value")])
def test_unmix_float64_values_float32_cannot_hold(tmp_path, capsys, scale, why):
    # the default float32 cast would turn them into inf or 0 (and factorise those)
    rng = np.random.default_rng(0)
    X = rng.random((10, 3)) @ rng.random((3, 60))
    np.save(tmp_path / "x.npy", X / X.max() * scale)
    out = tmp_path / "r.npz"
    assert main(["unmix", str(tmp_path / "x.npy"), "-n", "3", "--iters", "30", "--no-progress",
                 "--normalise", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"running in float64: X's {why}" in captured.out
    r = np.load(out)
    assert r["A"].dtype == np.float64 and 0 < float(r["residual"]) < 0.5
    assert np.isfinite(r["A"]).all() and np.abs(r["A"] @ r["S"]).max() > 0.1 * scale
    assert main(["unmix", str(tmp_path / "x.npy"), "-n", "3", "--dtype", "float32", "--no-progress",
                 "--out", str(out)]) == 2
    assert "--dtype float32 cannot hold X; use --dtype float64" in capsys.readouterr().err


def test_unmix_out_that_is_the_input_is_refused(tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, X=np.random.default_rng(0).random((10, 40)))
    before = x.read_bytes()
    for out in (str(x), str(tmp_path / "x")):  # ".npz" is added to a name without one
        assert main(["unmix", str(x), "-n", "3", "--no-progress", "--out", out]) == 2
        assert "is the input file itself" in capsys.readouterr().err
    assert x.read_bytes() == before


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--debug", "unmix", str(tmp_path / "missing.npy"), "-n", "3"])
    assert main(["unmix", str(tmp_path / "missing.npy"), "-n", "3"]) == 2


@pytest.mark.parametrize("argv, usage", [(["unmix", "x.npy", "-n", "3", "--bogus"], "usage: fastmu unmix"),
                                         (["data", "stats", "--bogus"], "usage: fastmu data stats")])
def test_an_unknown_option_shows_the_command_s_usage(capsys, argv, usage):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and "unrecognized arguments: --bogus" in err
