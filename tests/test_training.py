"""fastmu.training: the training loop, ALMU's two stages, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastmu.data import paper_sets
from fastmu.training import (
    EpochLog,
    build_model,
    load_model,
    model_kind,
    predict,
    save_model,
    train,
    train_almu,
    validate,
)


@pytest.fixture(scope="module")
def sets():
    # tiny but real: generated spectra, natural-image maps 16×16, 60 dB
    return paper_sets("small", seed=3, size=16, n_train=24, n_test=8)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_training_improves_held_out_scores(sets):
    model = build_model("nalmu", n_layers=12, m=65, n=4)
    before = validate(model, sets["test_simple"])
    hist = train(model, sets["train"], epochs=6, batch_size=8, lr=3e-2, val_set=sets["test_simple"],
                 progress=False)
    assert len(hist.epochs) == 6 and all(isinstance(e, EpochLog) for e in hist.epochs)
    assert hist.epochs[-1].train_loss < hist.epochs[0].train_loss
    after = validate(model, sets["test_simple"])
    # untrained NALMU is MU from a constant start; training must separate better on unseen problems
    assert after[0] > before[0] + 0.05, (before, after)
    assert hist.best_val is not None and math.isfinite(hist.best_val)


def test_training_is_reproducible(sets):
    runs = []
    for _ in range(2):
        model = build_model("nalmu", n_layers=4, m=65, n=4, dtype=torch.float64)
        train(model, sets["train"], epochs=2, batch_size=8, seed=11, progress=False)
        runs.append(_params(model))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_seed_changes_batch_order(sets):
    out = []
    for seed in (0, 1):
        model = build_model("nalmu", n_layers=3, m=65, n=4, dtype=torch.float64)
        train(model, sets["train"], epochs=1, batch_size=8, seed=seed, progress=False)
        out.append(model.theta.detach().clone())
    assert not torch.equal(out[0], out[1])


def test_almu_two_stages_freeze_the_front(sets):
    model = build_model("almu", nalmu_layers=3, almu_layers=3, m=65, n=4)
    seen = []
    hist = train_almu(model, sets["train"], epochs=(2, 2), batch_size=8, progress=False,
                      on_epoch=lambda e: seen.append((e.stage, _params(model.front)[0], _params(model.mlps))))
    assert [e.stage for e in hist.epochs] == ["almu front"] * 2 + ["almu mlps"] * 2
    # stage 1 moves the front and not the MLPs; stage 2 the reverse
    assert not torch.equal(seen[0][1], seen[1][1])
    for a, b in zip(seen[0][2], seen[1][2]):
        assert torch.equal(a, b)
    assert torch.equal(seen[1][1], seen[3][1])
    assert any(not torch.equal(a, b) for a, b in zip(seen[1][2], seen[3][2]))


@pytest.mark.parametrize("kind,kwargs", [
    ("nalmu", dict(n_layers=3)),
    ("almu", dict(nalmu_layers=2, almu_layers=2, hidden=(7, 5))),
])
def test_checkpoint_round_trip(tmp_path, sets, kind, kwargs):
    model = build_model(kind, m=65, n=4, **kwargs)
    train(model if kind == "nalmu" else model.front, sets["train"], epochs=1, batch_size=8, progress=False)
    path = save_model(model, tmp_path / "sub" / f"{kind}.pt", note="hello", history=[{"a": 1.0}])
    loaded, extra = load_model(path)
    assert model_kind(loaded) == kind and extra == {"note": "hello", "history": [{"a": 1.0}]}
    X = sets["test_simple"].batch([0, 1])[0].clamp_min(0)  # the noise leaves negatives; the models refuse them
    with torch.no_grad():
        for a, b in zip(model(X), loaded(X)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded64, _ = load_model(path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded64.parameters())


def test_predict_returns_truth_and_every_layer(sets):
    model = build_model("nalmu", n_layers=3, m=65, n=4)
    outs, A, S = predict(model, sets["test_simple"], batch_size=3, return_all=True)
    assert len(outs) == 3 and all(len(o) == 3 for o in outs)
    assert A.shape == (8, 65, 4) and S.shape == (8, 4, 256)


def test_nan_loss_is_reported_and_not_applied(sets):
    class Broken(torch.nn.Module):
        m = 65

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, X, return_all=False):
            A = torch.full((X.shape[0], 65, 4), float("nan")) * self.w
            S = torch.ones(X.shape[0], 4, X.shape[-1]) * self.w
            return [(A, S)] if return_all else (A, S)

    model = Broken()
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train(model, sets["train"], epochs=1, batch_size=8, progress=False)
    assert float(model.w.detach()) == 1.0


@pytest.mark.parametrize("with_val", [False, True])
def test_a_last_step_that_breaks_the_model_is_reported(sets, with_val):
    # lr = 1e30: the one step sets θ to about ±1e30, W = exp(θ) overflows and the
    # model outputs NaN. No later step's loss sees it, so train() must look itself.
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    n = len(sets["train"])
    kw = dict(val_set=sets["test_simple"]) if with_val else {}
    match = "on the validation set" if with_val else "the last step left a model"
    with pytest.raises(FloatingPointError, match=match):
        train(model, sets["train"], epochs=1, batch_size=n, lr=1e30, progress=False, **kw)


def test_bad_arguments(sets, tmp_path):
    model = build_model("nalmu", n_layers=2, m=65, n=4)
    with pytest.raises(ValueError, match="epochs"):
        train(model, sets["train"], epochs=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        train(model, sets["train"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, sets["train"], lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="lr"):
        train(model, sets["train"], lr=float("nan"), progress=False)
    with pytest.raises(TypeError, match="MixtureSet"):
        train(model, np.zeros((3, 65, 10)), progress=False)
    with pytest.raises(ValueError, match="m = 12"):
        train(build_model("nalmu", n_layers=2, m=12, n=4), sets["train"], progress=False)
    with pytest.raises(TypeError, match="ALMU"):
        train_almu(model, sets["train"], progress=False)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, sets["train"], progress=False)
    with pytest.raises(ValueError, match="kind"):
        build_model("transformer")
    with pytest.raises(ValueError, match="build_model"):
        save_model(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    torch.save({"a": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastmu model checkpoint"):
        load_model(tmp_path / "other.pt")


# --------------------------------------------------------------------------- audit fixes


@pytest.fixture(scope="module")
def tiny():
    return paper_sets("small", seed=4, m=8, size=4, n_train=4, n_test=2, realistic_maps="remnant")


def test_checkpoints_of_numpy_and_tensor_arguments_load(tmp_path):
    # NumPy scalars (np.float64 is a float subclass but pickles as a NumPy object) and 0-d
    # tensors used to make checkpoints that the weights-only load refused
    cases = [
        (dict(kind="nalmu", n_layers=np.int64(2), m=4, n=3), {}),
        (dict(kind="nalmu", n_layers=2, m=torch.tensor(4), n=3, eps=np.float64(1e-12)), {}),
        (dict(kind="almu", nalmu_layers=1, almu_layers=np.int32(1), m=4, n=3, hidden=np.array([5])),
         dict(best=np.float64(0.5), arr=np.arange(3), pair=(1, np.int32(2)), nested={"a": [np.float32(1.5)]})),
    ]
    for i, (kw, extra) in enumerate(cases):
        model = build_model(**kw)
        path = save_model(model, tmp_path / f"{i}.pt", **extra)
        loaded, got = load_model(path)
        assert type(loaded) is type(model) and loaded.m == 4 and type(loaded.m) is int
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
            assert torch.equal(a, b)
    assert got["best"] == 0.5 and type(got["best"]) is float
    assert torch.equal(got["arr"], torch.arange(3)) and got["pair"] == (1, 2) and got["nested"] == {"a": [1.5]}
    assert loaded.hidden == (5,)


def test_save_refuses_what_load_could_not_read(tmp_path):
    class Thing:
        pass

    model = build_model("nalmu", n_layers=2, m=4, n=3)
    for bad in (Thing(), [1, Thing()], lambda: 1):
        with pytest.raises(ValueError, match="extra 'bad'"):
            save_model(model, tmp_path / "x.pt", bad=bad)
    assert not (tmp_path / "x.pt").exists()


def test_load_refuses_files_that_are_not_checkpoints(tmp_path):
    good = save_model(build_model("nalmu", n_layers=2, m=4, n=3), tmp_path / "good.pt")
    (tmp_path / "text.pt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    raw = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    torch.save({"format": "fastmu-model-1", "kind": "nalmu", "kwargs": {}}, tmp_path / "nostate.pt")
    ckpt = torch.load(good, weights_only=True)
    ckpt["kind"] = "almu"
    torch.save(ckpt, tmp_path / "relabelled.pt")
    torch.save(dict(torch.load(good, weights_only=True), extra="notes"), tmp_path / "badextra.pt")
    for name in ("text", "empty", "cut", "module", "nostate", "relabelled", "badextra"):
        with pytest.raises(ValueError, match=f"{name}.pt is not a fastmu model checkpoint"):
            load_model(tmp_path / f"{name}.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="float32 or float64"):
        load_model(good, dtype=torch.int64)
    with pytest.raises(ValueError, match="device must be a torch device"):
        load_model(good, device="nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_model(good, device="cuda")


def test_train_checks_its_arguments_before_the_first_step(tiny):
    model = build_model("nalmu", n_layers=2, m=8, n=4)
    before = _params(model)
    bad = [
        (dict(seed=None), TypeError, "seed must be an integer"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(val_set=[1, 2]), TypeError, "val_set must be a fastmu.data.MixtureSet"),
        (dict(on_epoch=3), TypeError, "on_epoch must be callable"),
        (dict(loss_layers=2), TypeError, "loss_layers must be a slice"),
        (dict(epochs=1.0), ValueError, "epochs must be a positive integer"),
        (dict(batch_size=True), ValueError, "batch_size must be a positive integer"),
        (dict(loss_layers=slice(5, None)), ValueError, r"loss_layers=slice\(5, None, None\) selects none of the "
                                                        r"model's 2 layers"),
    ]
    for kw, err, match in bad:
        with pytest.raises(err, match=match):
            train(model, tiny["train"], progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    hist = train(model, tiny["train"], epochs=np.int64(1), batch_size=np.int32(2), seed=np.int64(1),
                 progress=False)
    assert len(hist.epochs) == 1


def test_train_almu_arguments(tiny):
    torch.manual_seed(0)
    model = build_model("almu", nalmu_layers=1, almu_layers=1, m=8, n=4, hidden=4)
    before = _params(model)
    for kw, err, match in (
        (dict(epochs=3), TypeError, r"epochs must be a pair \(stage 1, stage 2\)"),
        (dict(lr=1e-2), TypeError, "lr must be a pair"),
        (dict(epochs=(1.7, 1)), ValueError, "epochs must be a positive integer, got 1.7"),
        (dict(epochs=(1, 1.7)), ValueError, "epochs must be a positive integer, got 1.7"),
        (dict(loss_layers=slice(1, None)), TypeError, "train_almu sets loss_layers itself"),
    ):
        with pytest.raises(err, match=match):
            train_almu(model, tiny["train"], progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))  # nothing ran
    hist = train_almu(model, tiny["train"], epochs=(1, np.int64(1)), batch_size=4, progress=False)
    assert [e.stage for e in hist.epochs] == ["almu front", "almu mlps"]


def test_a_model_broken_before_training_reports_its_own_error(tiny):
    model = build_model("nalmu", n_layers=2, m=8, n=4)
    with torch.no_grad():
        model.theta[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NALMU's output .*theta"):
        train(model, tiny["train"], epochs=1, batch_size=2, progress=False)


def test_evaluation_and_checkpoint_arguments_are_checked(tiny, tmp_path):
    model = build_model("nalmu", n_layers=2, m=8, n=4)
    for f in (predict, validate):
        with pytest.raises(TypeError, match="data must be a fastmu.data.MixtureSet, got Tensor"):
            f(model, torch.rand(3, 8, 16))
        with pytest.raises(ValueError, match="batch_size"):
            f(model, tiny["train"], batch_size=0)
        with pytest.raises(ValueError, match="n = 3 components but data has 4"):
            f(build_model("nalmu", n_layers=2, m=8, n=3), tiny["train"])
    with pytest.raises(ValueError, match="n = 3 components but the training set has 4"):
        train(build_model("nalmu", n_layers=2, m=8, n=3), tiny["train"], progress=False)
    with pytest.raises(IsADirectoryError, match="is a folder; give the checkpoint a file name"):
        save_model(model, tmp_path)


def test_a_file_that_is_no_checkpoint_is_named_so(tmp_path):
    # "invalid load key": bytes that are neither a torch archive nor a pickle (JSON, an image)
    from fastmu.training import load_model

    f = tmp_path / "results.pt"
    f.write_text('{"config": {}}')
    with pytest.raises(ValueError, match="neither a torch archive nor a pickle"):
        load_model(f)
