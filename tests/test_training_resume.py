"""Training that goes on after an interruption: train(snapshot=, resume=), train_almu, the .part files
of run_paper and `fastmu train`, and atomic checkpoint writes."""
from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fastmu.cli import main
from fastmu.data import paper_sets
from fastmu.experiments import ExperimentConfig, partial_path, run_paper
from fastmu.training import History, build_model, load_model, save_model, train, train_almu


@pytest.fixture(scope="module")
def sets():
    return paper_sets("small", seed=5, size=8, n_train=12, n_test=3, kinds=("power_law",),
                      realistic_maps="remnant")


class Stop(Exception):
    """Stands for Ctrl-C: raised by on_epoch after some epochs."""


def _stop_after(n_calls):
    seen = []

    def on_epoch(e):
        seen.append(e)
        if len(seen) == n_calls:
            raise Stop

    return on_epoch


def _same(a, b):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=na)


def _interrupted_then_resumed(tmp_path, build, fit, stop_at):
    """Run ``fit`` until on_epoch call ``stop_at``, round-trip its last snapshot through a checkpoint,
    go on from it; return the resumed model and history."""
    model, kept = build(), {}

    def snapshot(state):
        save_model(model, tmp_path / "m.pt.part", history=hist.as_dicts(), resume=state)
        kept["n"] = kept.get("n", 0) + 1

    hist = History()
    with pytest.raises(Stop):
        fit(model, history=hist, snapshot=snapshot, on_epoch=_stop_after(stop_at))
    assert kept["n"] == stop_at  # the snapshot comes before on_epoch: the epoch is kept
    model, extra = load_model(tmp_path / "m.pt.part", dtype=torch.float64)
    hist = History.from_dicts(extra["history"])
    fit(model, history=hist, resume=extra["resume"])
    return model, hist


def test_resumed_nalmu_ends_where_the_uninterrupted_run_does(sets, tmp_path):
    def build():
        return build_model("nalmu", n_layers=3, m=65, n=4, dtype=torch.float64)

    def fit(model, **kw):
        return train(model, sets["train"], epochs=3, batch_size=5, lr=2e-2, seed=4, progress=False, **kw)

    whole = build()
    full = fit(whole)
    model, hist = _interrupted_then_resumed(tmp_path, build, fit, stop_at=1)
    _same(model, whole)
    assert [e.epoch for e in hist.epochs] == [1, 2, 3]
    assert [e.train_loss for e in hist.epochs] == [e.train_loss for e in full.epochs]


def test_a_finished_training_goes_on_for_more_epochs_as_one_longer_run(sets):
    def fit(model, epochs, **kw):
        return train(model, sets["train"], epochs=epochs, batch_size=5, lr=2e-2, progress=False, **kw)

    longer = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64)
    fit(longer, 4)
    model, states = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64), []
    hist = fit(model, 2, snapshot=states.append)
    fit(model, 4, history=hist, resume=states[-1])
    _same(model, longer)
    assert [e.epoch for e in hist.epochs] == [1, 2, 3, 4]
    # each state is the one of its epoch, not a view of Adam's moments that later steps move on
    moments = states[0]["optimizer"]["state"]
    again = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64)
    first = []
    fit(again, 1, snapshot=first.append)
    for i, m in moments.items():
        torch.testing.assert_close(m["exp_avg"], first[0]["optimizer"]["state"][i]["exp_avg"], rtol=0, atol=0)
    assert int(moments[0]["step"]) == 3  # 12 problems in batches of 5


@pytest.mark.parametrize("stop_at", [1, 2, 3])  # in the NALMU front, at its end, in the MLP stage
def test_resumed_almu_ends_where_the_uninterrupted_run_does(sets, tmp_path, stop_at):
    def build():
        torch.manual_seed(0)
        return build_model("almu", nalmu_layers=2, almu_layers=2, m=65, n=4, dtype=torch.float64)

    def fit(model, **kw):
        torch.manual_seed(1)
        return train_almu(model, sets["train"], epochs=(2, 2), lr=(2e-2, 2e-3), batch_size=6, progress=False,
                          **kw)

    whole = build()
    full = fit(whole)
    model, hist = _interrupted_then_resumed(tmp_path, build, fit, stop_at=stop_at)
    _same(model, whole)
    assert [(e.stage, e.epoch) for e in hist.epochs] == [(e.stage, e.epoch) for e in full.epochs]
    assert all(not p.requires_grad for p in model.front.parameters())


def test_resume_states_that_do_not_fit_are_refused(sets):
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    states = []
    train(model, sets["train"], epochs=1, batch_size=6, progress=False, snapshot=states.append)
    (state,) = states
    assert state["stage"] == "train" and state["epoch"] == 1
    kw = dict(epochs=2, batch_size=6, progress=False)
    with pytest.raises(ValueError, match="resume holds stage 'train', but this training is stage 'nalmu'"):
        train(model, sets["train"], stage="nalmu", resume=state, **kw)
    with pytest.raises(ValueError, match="resume is after epoch 3, but this training has 2 epochs"):
        train(model, sets["train"], resume={**state, "epoch": 3}, **kw)
    deeper = build_model("nalmu", n_layers=3, m=65, n=4)
    with pytest.raises(ValueError, match="optimizer state does not fit the model's trainable parameters"):
        train(deeper, sets["train"], resume=state, **kw)
    with pytest.raises(TypeError, match="resume must be the dict given to snapshot"):
        train(model, sets["train"], resume={"epoch": 1}, **kw)
    with pytest.raises(TypeError, match="snapshot must be callable"):
        train(model, sets["train"], snapshot="part.pt", **kw)
    almu = build_model("almu", nalmu_layers=1, almu_layers=1, m=65, n=4)
    with pytest.raises(ValueError, match="resume must hold ALMU's stage"):
        train_almu(almu, sets["train"], epochs=(1, 1), resume=state, progress=False)
    # a finished state goes on with no epoch left: nothing changes
    before = [p.detach().clone() for p in model.parameters()]
    hist = train(model, sets["train"], resume=state, epochs=1, batch_size=6, progress=False)
    assert hist.epochs == [] and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


TINY = dict(size=8, n_train=8, n_test=3, nalmu_layers=3, epochs=2, batch_size=4, mu_iters=10,
            methods=("nalmu",))


def test_run_paper_goes_on_from_the_epoch_it_was_stopped_at(tmp_path):
    cfg = ExperimentConfig(**TINY)
    whole = run_paper(cfg, tmp_path / "whole", progress=False, log=None)

    def stop_at_epoch_1(line):
        if line.startswith("NALMU epoch 1"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_paper(cfg, tmp_path / "p", progress=False, log=stop_at_epoch_1)
    part = tmp_path / "p" / "models" / "nalmu.pt.part"
    assert part.is_file() and not (tmp_path / "p" / "models" / "nalmu.pt").exists()
    assert load_model(part)[1]["resume"]["epoch"] == 1
    lines = []
    res = run_paper(cfg, tmp_path / "p", progress=False, log=lines.append)
    text = "\n".join(lines)
    assert f"NALMU: going on from {part}, after nalmu epoch 1" in text
    assert "NALMU epoch 1:" not in text and "NALMU epoch 2:" in text
    assert not part.exists()
    _same(load_model(tmp_path / "p" / "models" / "nalmu.pt")[0],
          load_model(tmp_path / "whole" / "models" / "nalmu.pt")[0])
    assert res.scores == whole.scores
    assert len(res.training["nalmu"]["history"]) == 2


def test_a_part_file_of_other_settings_is_replaced(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_paper(ExperimentConfig(**{**TINY, "lr": 0.05}), tmp_path, progress=False,
                  log=lambda line: (_ for _ in ()).throw(KeyboardInterrupt) if "epoch 1" in line else None)
    part = tmp_path / "models" / "nalmu.pt.part"
    assert part.is_file()
    lines = []
    run_paper(ExperimentConfig(**TINY), tmp_path, progress=False, log=lines.append)
    text = "\n".join(lines)
    assert (f"NALMU: {part} was left by a training with other settings (lr 0.05 (this run: 0.01)); "
            "it will be replaced") in text
    assert "NALMU epoch 1:" in text and not part.exists()
    assert load_model(tmp_path / "models" / "nalmu.pt")[1]["trained_with"]["lr"] == 0.01

    part.write_text("half a file")  # a part that cannot be read is replaced too
    (tmp_path / "models" / "nalmu.pt").unlink()
    lines = []
    run_paper(ExperimentConfig(**TINY), tmp_path, progress=False, log=lines.append)
    assert "is not a fastmu model checkpoint" in "\n".join(lines) and not part.exists()


def test_a_part_path_that_is_a_folder_is_refused_before_training(tmp_path):
    (tmp_path / "models" / "nalmu.pt.part").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"nalmu.pt.part is a folder, not a file"):
        run_paper(ExperimentConfig(**TINY), tmp_path, progress=False, log=None)


def test_cli_train_goes_on_after_ctrl_c(tmp_path, capsys, monkeypatch):
    import fastmu.experiments as ex

    argv = ["train", "almu", "--size", "8", "--n-train", "8", "--n-test", "3", "--layers", "2", "--epochs", "2",
            "--batch-size", "4", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "whole.pt")]) == 0
    capsys.readouterr()

    real = ex.fit_model

    def interrupted(*args, on_epoch=None, **kw):
        return real(*args, on_epoch=_stop_after(3), **kw)  # in ALMU's second stage

    out = tmp_path / "m.pt"
    monkeypatch.setattr(ex, "fit_model", lambda *a, **k: _ctrl_c(interrupted, *a, **k))
    assert main(argv + ["--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"interrupted; the epochs done are kept in {out}.part: the same command goes on from there" in err
    assert partial_path(out).is_file() and not out.exists()
    monkeypatch.setattr(ex, "fit_model", real)
    assert main(argv + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"going on from {partial_path(out)}, after almu mlps epoch 1" in text
    assert "almu mlps epoch 2" in text and "almu front epoch" not in text
    assert not partial_path(out).exists()
    _same(load_model(out)[0], load_model(tmp_path / "whole.pt")[0])
    assert len(load_model(out)[1]["history"]) == 4


def _ctrl_c(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Stop:
        raise KeyboardInterrupt from None


def test_an_interrupted_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    path = save_model(model, tmp_path / "m.pt", note="first")
    real = torch.save

    def half_then_stop(obj, f, *a, **k):
        if isinstance(f, io.BytesIO):  # save_model's check that the extras load back: let it through
            return real(obj, f, *a, **k)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, path, note="second")
    monkeypatch.setattr(torch, "save", real)
    assert load_model(path)[1]["note"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left


def test_saving_through_a_link_replaces_the_file_it_points_to(tmp_path):
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    target = save_model(model, tmp_path / "real.pt", note="first")
    (tmp_path / "link.pt").symlink_to(target)
    save_model(model, tmp_path / "link.pt", note="second")
    assert (tmp_path / "link.pt").is_symlink() and load_model(target)[1]["note"] == "second"
    assert json.dumps(load_model(tmp_path / "link.pt")[1]) == '{"note": "second"}'


def test_a_replaced_checkpoint_keeps_its_permissions(tmp_path):
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    path = save_model(model, tmp_path / "m.pt")
    os.chmod(path, 0o600)
    save_model(model, path, note="again")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_resume_leaves_the_state_as_it_was_and_takes_this_calls_rate(sets):
    def fit(model, **kw):
        return train(model, sets["train"], batch_size=5, progress=False, **kw)

    model, states = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64), []
    fit(model, epochs=1, lr=2e-2, snapshot=states.append)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (state,) = states
    step = int(state["optimizer"]["state"][0]["step"])
    twice = []
    for _ in range(2):  # two resumes from one state: both start from it
        m = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64)
        m.load_state_dict(saved)
        fit(m, epochs=2, lr=2e-2, resume=state)
        twice.append(m)
    assert int(state["optimizer"]["state"][0]["step"]) == step
    _same(*twice)
    # the rate given here, not the saved one
    slow = build_model("nalmu", n_layers=2, m=65, n=4, dtype=torch.float64)
    slow.load_state_dict(saved)
    fit(slow, epochs=2, lr=1e-9, resume=state)
    for k, v in slow.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=1e-6, atol=1e-9)
    assert any(not torch.equal(v, saved[k]) for k, v in twice[0].state_dict().items())


def _stopped_run(out, cfg):
    with pytest.raises(KeyboardInterrupt):
        run_paper(cfg, out, progress=False,
                  log=lambda line: (_ for _ in ()).throw(KeyboardInterrupt) if "epoch 1" in line else None)
    return out / "models" / "nalmu.pt.part"


def _rewrite(path, **changes):
    model, extra = load_model(path)
    save_model(model, path, **{**extra, **changes})


@pytest.mark.parametrize("change, said", [
    (dict(resume={"epoch": 1}), "holds no training state fastmu can go on from"),
    (dict(history=[{"stage": "nalmu"}]), "holds no training state fastmu can go on from"),
    (dict(resume={"stage": "nalmu", "epoch": 9, "optimizer": {}}), "cannot go on from"),
    (dict(resume={"stage": "nalmu", "epoch": 1, "optimizer": {"state": {}, "param_groups": []}}),
     "cannot go on from"),
])
def test_a_part_file_that_cannot_be_gone_on_from_is_replaced(tmp_path, change, said):
    cfg = ExperimentConfig(**TINY)
    part = _stopped_run(tmp_path, cfg)
    _rewrite(part, **change)
    lines = []
    res = run_paper(cfg, tmp_path, progress=False, log=lines.append)
    text = "\n".join(lines)
    assert f"NALMU: " in text and said in text and "it will be replaced" in text
    assert "NALMU epoch 1:" in text and "NALMU epoch 2:" in text and not part.exists()
    assert res.models["nalmu"]["source"] == "trained"
    whole = run_paper(cfg, tmp_path / "whole", progress=False, log=None)
    assert res.scores == whole.scores


def test_another_preset_at_the_same_sizes_is_another_training(tmp_path):
    # a small preset grown to these sizes has the same shapes as the paper preset cut down, not its noise
    small = ExperimentConfig(**{**TINY, "preset": "small"})
    paper = ExperimentConfig(**{**TINY, "preset": "paper"})
    run_paper(small, tmp_path, progress=False, log=None)
    lines = []
    res = run_paper(paper, tmp_path, progress=False, log=lines.append)
    assert "preset small (this run: paper); training it anew" in "\n".join(lines)
    assert res.models["nalmu"]["source"] == "trained"


def test_the_part_file_of_a_finished_checkpoint_is_removed_when_it_is_loaded(tmp_path):
    cfg = ExperimentConfig(**TINY)
    part = _stopped_run(tmp_path, cfg)
    kept = part.read_bytes()
    run_paper(cfg, tmp_path, progress=False, log=None)
    part.write_bytes(kept)  # as if stopped between writing the checkpoint and removing the .part
    res = run_paper(cfg, tmp_path, progress=False, log=None)
    assert res.models["nalmu"]["source"] == "loaded" and not part.exists()


def test_a_part_file_from_another_device_says_so(tmp_path):
    cfg = ExperimentConfig(**TINY)
    part = _stopped_run(tmp_path, cfg)
    assert load_model(part)[1]["device"] == "cpu"
    _rewrite(part, device="cuda")
    lines = []
    run_paper(cfg, tmp_path, progress=False, log=lines.append)
    assert "after nalmu epoch 1 (its epochs ran on cuda, these run on cpu)" in "\n".join(lines)


def test_fit_resumable_and_mixture_sets_refuse_what_they_cannot_take(sets, tmp_path):
    from fastmu.data import MixtureSet
    from fastmu.experiments import fit_resumable

    cfg = ExperimentConfig(**TINY)
    with pytest.raises(TypeError, match="fit_resumable sets history, resume itself"):
        fit_resumable("nalmu", cfg, sets["train"], tmp_path / "m.pt", history=History(), resume=None)
    tr = sets["train"]
    with pytest.raises(TypeError, match="map_kinds must be a sequence of kind names"):
        MixtureSet(tr.A, tr.map_set(0)[None], 60.0, [1], map_kinds="photo")


def test_an_out_link_into_a_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys,
                                                                                     monkeypatch):
    from fastmu import paths

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "m.pt").write_bytes(b"")
    (tmp_path / "m.pt").symlink_to(tmp_path / "ro" / "m.pt")
    real = paths.tempfile.TemporaryFile

    def read_only_there(*args, dir=None, **kwargs):  # root may write anywhere: simulated
        if dir is not None and Path(dir) == tmp_path / "ro":
            raise PermissionError(13, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", read_only_there)
    rc = main(["train", "nalmu", "--size", "8", "--n-train", "4", "--n-test", "2", "--layers", "2", "--epochs", "1",
               "--out", str(tmp_path / "m.pt"), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and f"--out: cannot write in {tmp_path / 'ro'} (Permission denied)" in captured.err
    assert "epoch" not in captured.out
