"""``fastmu data stats`` and ``fastmu data preview``."""
from __future__ import annotations

import numpy as np

from fastmu.cli import main


def test_stats_generated(capsys):
    assert main(["data", "stats", "--n", "40", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "angle_to_mean_sync" in out and "cond_median" in out and "generated" in out


def test_stats_given_file(tmp_path, capsys):
    from fastmu.data import spectra

    np.savez(tmp_path / "mine.npz", A=spectra(20, seed=2))
    assert main(["data", "stats", "--spectra", str(tmp_path / "mine.npz"),
                 "--reference", str(tmp_path / "mine.npz")]) == 0
    out = capsys.readouterr().out
    assert "mine" in out and "real" in out


def test_stats_bad_file(tmp_path, capsys):
    np.save(tmp_path / "bad.npy", -np.ones((3, 20, 4)))
    assert main(["data", "stats", "--spectra", str(tmp_path / "bad.npy")]) == 2
    assert "negative" in capsys.readouterr().err


def test_preview_writes_pngs(tmp_path):
    out = tmp_path / "fig"
    assert main(["data", "preview", "--out", str(out), "--n", "30", "--size", "32"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["maps.png", "spectra.png"]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_preview_size_too_small_for_remnant(tmp_path, capsys):
    assert main(["data", "preview", "--out", str(tmp_path / "fig"), "--n", "10", "--size", "2"]) == 2
    assert "--size must be at least 4" in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()  # refused before any figure is written
