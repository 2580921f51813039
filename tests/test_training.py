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
