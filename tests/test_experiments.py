"""fastmu.experiments and ``fastmu paper`` / ``fastmu train``: the paper's tables and figure, tiny."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fastmu
from fastmu.cli import main
from fastmu.experiments import (
    LEARNED,
    METHODS,
    ExperimentConfig,
    _solver_curve,
    format_table,
    iteration_checkpoints,
    make_sets,
    run_paper,
)

TINY = dict(size=8, n_train=8, n_test=3, nalmu_layers=4, dnmf_layers=2, snmf_layers=2, epochs=1,
            batch_size=4, mu_iters=30, cd_iters=20)


@pytest.mark.parametrize("n", [1, 2, 9, 10, 11, 999, 10_000])
def test_iteration_checkpoints(n):
    pts = iteration_checkpoints(n)
    assert pts[0] == 1 and pts[-1] == n
    assert all(b > a for a, b in zip(pts, pts[1:]))
    with pytest.raises(ValueError):
        iteration_checkpoints(0)


def test_chunked_solver_follows_the_same_iterates():
    # The curve restarts MU at each checkpoint from the last factors: the end
    # point must be the uninterrupted run's.
    data = make_sets(ExperimentConfig(**TINY))["test_simple"]
    X, A_t, S_t = data.batch(np.arange(3), dtype=torch.float64)
    X = X.clamp_min(0)
    S_t = S_t.reshape(3, 4, -1)

    def solve(X, n, **kw):
        return fastmu.mu(X, n, init="random", **kw)

    curve, (A, S), secs = _solver_curve(solve, X, 4, 57, A_t, S_t, seed=5)
    A1, S1 = solve(X, 4, n_iter=57, random_state=5)
    torch.testing.assert_close(A, A1, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(S, S1, rtol=1e-10, atol=1e-14)
    assert curve["x"][-1] == 57 and len(curve["cos_A"]) == len(curve["x"])
    assert secs > 0


def test_run_paper_writes_tables_figure_and_reloads_models(tmp_path):
    cfg = ExperimentConfig(**TINY)
    lines = []
    res = run_paper(cfg, tmp_path, progress=False, log=lines.append)
    d = json.loads((tmp_path / "results.json").read_text())
    for set_name in ("test_simple", "test_realistic"):
        assert set(d["scores"][set_name]) == set(METHODS)
        for kind in METHODS:
            s = d["scores"][set_name][kind]
            assert len(s["cos_A"]) == 3 and all(-1 <= v <= 1 for v in s["cos_A"] + s["cos_S"])
            c = d["curves"][set_name][kind]
            assert len(c["x"]) == len(c["cos_A"]) == len(c["cos_S"]) > 1
        assert d["curves"][set_name]["nalmu"]["x"] == [1, 2, 3, 4]
        assert d["curves"][set_name]["mu"]["x"][-1] == 30
    assert d["machine"]["device"] == "cpu" and "cpu" in d["machine"]
    t1 = (tmp_path / "table1.md").read_text()
    assert "Table I" in t1 and "MU (30 it.)" in t1 and "CD (20 it.)" in t1 and "NALMU (4 layers)" in t1 and "ALMU (2 + 2 layers)" in t1
    assert "Table II" in (tmp_path / "table2.md").read_text()
    assert (tmp_path / "fig2.png").stat().st_size > 10_000
    for kind in LEARNED:
        assert (tmp_path / "models" / f"{kind}.pt").exists()

    # a second run loads the checkpoints instead of training: same learned scores
    lines2 = []
    res2 = run_paper(cfg, tmp_path / "again", models_dir=tmp_path / "models", progress=False, log=lines2.append)
    assert sum("loaded" in ln for ln in lines2) == len(LEARNED)
    for kind in LEARNED:
        np.testing.assert_allclose(res2.scores["test_simple"][kind]["cos_A"],
                                   res.scores["test_simple"][kind]["cos_A"], rtol=1e-6)
    assert format_table(res2, "test_realistic").count("\n") == 3 + len(METHODS)


def test_config_errors():
    with pytest.raises(ValueError, match="methods"):
        ExperimentConfig(methods=("mu", "svd"))
    with pytest.raises(ValueError, match="mu_iters"):
        ExperimentConfig(mu_iters=0)
    with pytest.raises(ValueError, match="dtype"):
        ExperimentConfig(dtype="float16")
    with pytest.raises(ValueError, match="preset"):
        ExperimentConfig(preset="huge")
    with pytest.raises(ValueError, match="size"):
        ExperimentConfig(size=0)
    with pytest.raises(ValueError, match="ALMU"):
        ExperimentConfig(nalmu_layers=1)
    with pytest.raises(ValueError, match="device 'meta' holds no values"):
        ExperimentConfig(device="meta")
    with pytest.raises(ValueError, match="torch device such as"):
        ExperimentConfig(device="gpu")
    # refused up front, not after the training (the solvers' seeds must be below 2**32)
    for bad in (2**40, -1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an integer"):
            ExperimentConfig(seed=bad)
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="lr must be"):
            ExperimentConfig(lr=bad)
    with pytest.raises(ValueError, match="snr_db must be"):
        ExperimentConfig(snr_db=float("nan"))


@pytest.mark.parametrize("plant", ["models_file", "checkpoint_folder"])
def test_run_paper_refuses_unusable_model_paths_before_training(tmp_path, plant):
    if plant == "models_file":
        (tmp_path / "models").write_text("")
    else:
        (tmp_path / "models" / "nalmu.pt").mkdir(parents=True)
    trained = []
    with pytest.raises(ValueError, match="is a file, not a folder|is a folder, not a file"):
        run_paper(ExperimentConfig(**NALMU_ONLY), tmp_path, log=trained.append, progress=False)
    assert not any("trained" in line for line in trained)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible to torch")
@pytest.mark.parametrize("argv", [["train", "nalmu", "--device", "cuda", "--no-progress"],
                                  ["paper", "--device", "cuda:0", "--no-progress"],
                                  ["bench", "--suite", "nalmu", "--device", "cuda", "--quick"]])
def test_cuda_asked_for_without_one_is_a_clear_error(argv, capsys):
    # torch's own error here is an AssertionError from its lazy CUDA setup
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        ExperimentConfig(device="cuda", **TINY)
    assert main(argv) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_cli_train_then_paper_with_the_checkpoint(tmp_path, capsys):
    ck = tmp_path / "models" / "nalmu.pt"
    rc = main(["train", "nalmu", "--size", "8", "--n-train", "8", "--n-test", "3", "--layers", "3",
               "--epochs", "1", "--batch-size", "4", "--out", str(ck), "--no-progress"])
    assert rc == 0 and ck.exists()
    out = capsys.readouterr().out
    assert "held-out cos A" in out and "saved" in out
    rc = main(["paper", "--methods", "mu", "nalmu", "--size", "8", "--n-train", "8", "--n-test", "3",
               "--layers", "3", "--mu-iters", "10", "--out", str(tmp_path / "p"), "--models",
               str(tmp_path / "models"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NALMU: loaded" in out and "| MU (10 it.) |" in out and "Table II" in out
    # the checkpoint records how it was trained; the tables say where the paper run's settings differ
    from fastmu.training import load_model

    assert load_model(ck)[1]["trained_with"]["layers"] == 3
    assert "- NALMU: loaded from" in out and "epochs 1 (this run: 10), batch size 4 (this run: 25)" in out


def test_cli_errors(capsys):
    # argparse checks the range, so the message names the option typed, not ExperimentConfig's mu_iters
    with pytest.raises(SystemExit) as e:
        main(["paper", "--mu-iters", "0", "--no-progress"])
    assert e.value.code == 2
    assert "argument --mu-iters: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "resnet"])


def test_cli_methods_match_the_library():
    from fastmu.cli.paper import METHODS as CLI_METHODS

    assert CLI_METHODS == METHODS


def test_new_models_are_seeded_and_start_as_their_untrained_definition():
    cfg = ExperimentConfig(**TINY)
    train_set = make_sets(cfg)["train"]
    from fastmu.experiments import new_model

    for kind in LEARNED:
        a, b = new_model(kind, cfg, train_set), new_model(kind, cfg, train_set)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q), kind
        assert all(p.dtype == torch.float32 for p in a.parameters())
    other = new_model("almu", ExperimentConfig(**{**TINY, "seed": 1}), train_set)
    assert not torch.equal(other.mlps.weights[0], new_model("almu", cfg, train_set).mlps.weights[0])
    with pytest.raises(ValueError, match="kind"):
        new_model("mu", cfg, train_set)



# --- checkpoints reused by run_paper / fastmu paper ----------------------------------------------------------


NALMU_ONLY = dict(TINY, methods=("nalmu",))


def test_run_paper_retrains_a_stale_checkpoint_in_its_own_folder(tmp_path, capsys):
    lines = []
    run_paper(ExperimentConfig(**NALMU_ONLY, snr_db=-10.0), tmp_path, log=lines.append, progress=False)
    assert "NALMU epoch 1: loss" in "\n".join(lines)  # the kind once, not "NALMU nalmu epoch 1"

    # new settings into the same folder: not the old model under the new label
    lines = []
    res = run_paper(ExperimentConfig(**{**NALMU_ONLY, "nalmu_layers": 3}), tmp_path, log=lines.append,
                    progress=False)
    text = "\n".join(lines)
    assert "nalmu.pt differs: layers 4 (this run: 3), SNR (dB) -10.0 (this run: 60.0); training it anew" in text
    assert "loaded" not in text
    d = json.loads((tmp_path / "results.json").read_text())
    assert d["models"]["nalmu"]["layers"] == 3 and d["models"]["nalmu"]["trained_with"]["snr_db"] == 60.0
    assert d["curves"]["test_simple"]["nalmu"]["x"] == [1, 2, 3]

    # the same settings again: reused; progress=False without a log is quiet
    capsys.readouterr()
    res2 = run_paper(ExperimentConfig(**{**NALMU_ONLY, "nalmu_layers": 3}), tmp_path, progress=False)
    assert capsys.readouterr().out == ""
    assert res2.models["nalmu"]["source"] == "loaded"
    assert res2.scores["test_simple"]["nalmu"] == res.scores["test_simple"]["nalmu"]


def _rewrite_settings(path, **changes):
    """Rewrite a checkpoint's recorded training settings (a key set to None is removed)."""
    from fastmu.training import load_model, save_model

    model, extra = load_model(path)
    tw = dict(extra["trained_with"], **changes)
    extra["trained_with"] = {k: v for k, v in tw.items() if v is not None}
    save_model(model, path, **extra)


def test_checkpoints_record_the_training_maps_and_other_maps_are_another_model(tmp_path):
    from fastmu.training import load_model

    cfg = ExperimentConfig(**NALMU_ONLY)
    kinds = list(make_sets(cfg)["train"].map_kinds)
    assert kinds in (["photo", "dead_leaves", "power_law"], ["dead_leaves", "power_law"])
    run_paper(cfg, tmp_path, progress=False, log=None)
    ck = tmp_path / "models" / "nalmu.pt"
    assert load_model(ck)[1]["trained_with"]["train_maps"] == kinds

    # made with other maps (scikit-image absent, say): in its own folder it is trained anew
    _rewrite_settings(ck, train_maps=["power_law"])
    lines = []
    res = run_paper(cfg, tmp_path, progress=False, log=lines.append)
    assert f"training maps ['power_law'] (this run: {kinds}); training it anew" in "\n".join(lines)
    assert res.models["nalmu"]["source"] == "trained"

    # in a folder the caller gave it is used, and the tables say how it differs
    _rewrite_settings(ck, train_maps=["power_law"])
    res = run_paper(cfg, tmp_path / "b", models_dir=tmp_path / "models", progress=False, log=None)
    assert res.models["nalmu"]["source"] == "loaded"
    assert f"trained with other settings: training maps ['power_law'] (this run: {kinds})" in format_table(
        res, "test_simple")


def test_a_checkpoint_from_before_the_maps_were_recorded_is_reused_and_said_so(tmp_path):
    cfg = ExperimentConfig(**NALMU_ONLY)
    first = run_paper(cfg, tmp_path, progress=False, log=None)
    ck = tmp_path / "models" / "nalmu.pt"
    _rewrite_settings(ck, train_maps=None)
    lines = []
    res = run_paper(cfg, tmp_path, progress=False, log=lines.append)
    assert res.models["nalmu"]["source"] == "loaded"
    assert res.scores["test_simple"]["nalmu"] == first.scores["test_simple"]["nalmu"]
    said = "which does not record its training maps (saved before fastmu recorded them)"
    assert said in "\n".join(lines) and said in format_table(res, "test_simple")
    # beside a setting that does differ, both are said
    _rewrite_settings(ck, epochs=7)
    res = run_paper(cfg, tmp_path / "b", models_dir=tmp_path / "models", progress=False, log=None)
    assert ("trained with other settings: epochs 7 (this run: 1); it does not record its training maps"
            in res.models["nalmu"]["note"])


def test_models_dir_checkpoints_are_checked_before_any_training(tmp_path):
    cfg = ExperimentConfig(**NALMU_ONLY)
    run_paper(cfg, tmp_path / "a", progress=False, log=None)
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "a" / "models" / "nalmu.pt").rename(mine / "dnmf.pt")  # a NALMU under DNMF's name
    lines = []
    with pytest.raises(ValueError, match=r"dnmf.pt is not the DNMF this run asks for: kind nalmu \(this run: dnmf\)"):
        run_paper(ExperimentConfig(**{**TINY, "methods": ("nalmu", "dnmf")}), tmp_path / "b", models_dir=mine,
                  log=lines.append, progress=False)
    assert not any("epoch" in ln for ln in lines)  # refused before NALMU was trained

    (mine / "nalmu.pt").write_text("junk\n")
    with pytest.raises(ValueError, match="nalmu.pt is not a .*checkpoint") as e:
        run_paper(cfg, tmp_path / "b", models_dir=mine, progress=False)
    assert "\n" not in str(e.value)
    assert (mine / "nalmu.pt").read_text() == "junk\n"  # the user's folder is never overwritten


def test_models_dir_checkpoint_without_settings_is_used_and_said_so(tmp_path, capsys):
    # an older checkpoint (or one saved by hand) records no training settings: kind, m, n, depth must match
    from fastmu.experiments import new_model
    from fastmu.training import save_model

    cfg = ExperimentConfig(**NALMU_ONLY)
    save_model(new_model("nalmu", cfg, make_sets(cfg)["train"]), tmp_path / "m" / "fastmu-nalmu.pt")
    rc = main(["paper", "--methods", "nalmu", "--size", "8", "--n-train", "8", "--n-test", "3", "--layers", "4",
               "--out", str(tmp_path / "p"), "--models", str(tmp_path / "m"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "NALMU: loaded from" in out and "which records no training settings" in out
    assert "| NALMU (4 layers) |" in out
    d = json.loads((tmp_path / "p" / "results.json").read_text())
    assert d["models"]["nalmu"]["source"] == "loaded" and d["models"]["nalmu"]["trained_with"] is None

    assert main(["paper", "--methods", "nalmu", "--size", "8", "--n-train", "8", "--n-test", "3", "--layers", "5",
                 "--out", str(tmp_path / "p"), "--models", str(tmp_path / "m"), "--no-progress"]) == 2
    assert "layers 4 (this run: 5)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["paper", "--out", "{f}"], "--out: {f} is a file, not a folder"),
    (["paper", "--models", "{f}"], "--models {f} is a file, not a folder"),
    (["paper", "--methods", "almu", "--layers", "1"], "--layers must be >= 2 with ALMU"),
    (["train", "nalmu", "--out", "{f}/m.pt"], "--out: {f} is a file, not a folder"),
    (["train", "almu", "--layers", "1"], "--layers must be >= 2 for ALMU"),
    (["paper", "--methods", "mu", "--epochs", "3", "--layers", "5", "--cd-iters", "5"],
     "--epochs, --layers, --cd-iters: not used by --methods mu; drop them"),
    (["paper", "--methods", "mu", "cd", "--models", "{f}"], "--models: not used by --methods mu cd"),
    (["paper", "--methods", "nalmu", "--dnmf-layers", "4"], "--dnmf-layers: not used by --methods nalmu; drop it"),
    (["paper", "--methods", "mu", "--batch-size", "7"], "--batch-size: not used by --methods mu; drop it"),
])
def test_cli_paper_and_train_refuse_before_the_work(tmp_path, capsys, argv, msg):
    f = tmp_path / "afile"
    f.write_text("")
    argv = [a.replace("{f}", str(f)) for a in argv]
    assert main([*argv, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert msg.replace("{f}", str(f)) in captured.err and "sets:" not in captured.out


@pytest.mark.parametrize("argv, msg", [(["train", "nalmu", "--layers", "0"], "argument --layers: must be >= 1"),
                                       (["paper", "--seed", "-1"], "argument --seed: must be >= 0"),
                                       (["paper", "--lr", "0"], "argument --lr: must be > 0")])
def test_cli_range_errors_name_the_option(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_real_training_spectra_without_the_reference_file_say_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMU_SHARED_DATA", str(tmp_path))  # a reference-data folder without the file
    with pytest.raises(FileNotFoundError, match="--train-spectra real\\) need chandra_mixing_matrices.npz"):
        make_sets(ExperimentConfig(**dict(TINY, train_spectra="real")))


def test_ctrl_c_in_train_says_where_the_epochs_done_are(tmp_path, capsys, monkeypatch):
    import fastmu.experiments

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastmu.experiments, "fit_model", interrupted)
    out = tmp_path / "m.pt"
    rc = main(["train", "nalmu", "--layers", "2", "--size", "8", "--n-train", "4", "--n-test", "2",
               "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 130 and not out.exists() and not (tmp_path / "m.pt.part").exists()  # stopped before an epoch
    assert capsys.readouterr().err == (f"fastmu train: interrupted; the epochs done are kept in {out}.part: "
                                       "the same command goes on from there\n")


def test_a_reader_that_leaves_does_not_stop_the_run(tmp_path, monkeypatch):
    # `fastmu paper ... | head -1`: the pipe closes after a line; the run must still write its files
    import sys

    class ClosedPipe:
        lines = 0

        def write(self, text):
            ClosedPipe.lines += 1
            if ClosedPipe.lines > 1:
                raise BrokenPipeError(32, "Broken pipe")
            return len(text)

        def flush(self):
            pass

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    out = tmp_path / "p"
    rc = main(["paper", "--methods", "mu", "--mu-iters", "20", "--size", "8", "--n-test", "2", "--out", str(out),
               "--no-progress"])
    assert rc == 0 and ClosedPipe.lines > 1
    assert {"results.json", "table1.md", "table2.md"} <= {f.name for f in out.iterdir()}
