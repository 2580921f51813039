"""``fastmu data stats`` and ``fastmu data preview``."""
from __future__ import annotations

import numpy as np
import pytest

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
    from fastmu.cli.data import MIN_SIZE
    from fastmu.data.remnant import _MIN_SIZE

    assert MIN_SIZE == _MIN_SIZE  # the parser's bound is the generator's
    with pytest.raises(SystemExit) as e:
        main(["data", "preview", "--out", str(tmp_path / "fig"), "--n", "10", "--size", "2"])
    assert e.value.code == 2 and "argument --size: must be >= 4" in capsys.readouterr().err
    assert not (tmp_path / "fig").exists()
    assert not (tmp_path / "fig").exists()  # refused before any figure is written


@pytest.mark.parametrize("argv, msg", [
    (["--m", "3"], "argument --m: must be >= 8, got 3"),
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--n", "0"], "argument --n: must be >= 1, got 0"),
])
def test_stats_argument_errors_name_the_option_and_the_command(capsys, argv, msg):
    with pytest.raises(SystemExit) as e:
        main(["data", "stats", *argv])
    assert e.value.code == 2
    assert f"fastmu data stats: error: {msg}" in capsys.readouterr().err


def test_min_channels_is_the_generator_s():
    from fastmu.cli.data import MIN_CHANNELS
    from fastmu.data import spectra

    assert spectra(1, m=MIN_CHANNELS, seed=0).shape == (1, MIN_CHANNELS, 4)
    with pytest.raises(ValueError, match=f">= {MIN_CHANNELS}"):
        spectra(1, m=MIN_CHANNELS - 1, seed=0)


def test_errors_name_the_data_subcommand_and_the_file_s_own_shape(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.ones((20, 50)))
    assert main(["data", "stats", "--spectra", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastmu data stats: error: --spectra") and "got shape (20, 50)" in err


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_preview_output_folder_is_checked_first(tmp_path, capsys, where):
    (tmp_path / "f").write_text("")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "sub"
    assert main(["data", "preview", "--out", str(out), "--n", "5", "--size", "8"]) == 2
    assert f"fastmu data preview: error: --out: {tmp_path / 'f'}" in capsys.readouterr().err


def test_stats_refuses_generator_options_with_a_file(tmp_path, capsys):
    A = np.random.default_rng(0).random((3, 20, 4))
    np.save(tmp_path / "a.npy", A)
    assert main(["data", "stats", "--spectra", str(tmp_path / "a.npy"), "--n", "5", "--m", "20"]) == 2
    assert "--n and --m shape the generated spectra; with --spectra the file's are used" in capsys.readouterr().err
    assert main(["data", "stats", "--spectra", str(tmp_path / "a.npy"), "--seed", "3"]) == 2
    assert "--seed shapes the generated spectra" in capsys.readouterr().err
    np.save(tmp_path / "empty.npy", A[:0])
    assert main(["data", "stats", "--spectra", str(tmp_path / "empty.npy")]) == 2
    assert f"--spectra {tmp_path / 'empty.npy'}: spectra must hold at least one matrix" in capsys.readouterr().err


def test_stats_names_what_a_spectra_npz_must_hold(tmp_path, capsys):
    np.savez(tmp_path / "two.npz", X=np.random.default_rng(0).random((2, 20, 4)), Y=np.ones((2, 20, 4)))
    assert main(["data", "stats", "--spectra", str(tmp_path / "two.npz")]) == 2
    err = capsys.readouterr().err
    assert "must hold an array named 'A', or only one array" in err and "key=" not in err
