"""The fastmu command line, run in-process as a user would."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

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
    assert "fastmu speedup" in capsys.readouterr().out


def test_cuda_without_gpu_is_a_clean_error(tmp_path, capsys, monkeypatch):
    import fastmu.solver as solver

    monkeypatch.setattr(solver, "cuda_available", lambda: False)
    np.save(tmp_path / "x.npy", np.ones((3, 4)))
    rc = main(["unmix", str(tmp_path / "x.npy"), "-n", "2", "--backend", "cuda", "--no-progress",
               "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    assert "no CUDA GPU" in capsys.readouterr().err


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
