"""`nanosil harmonic --models DIR`: the ML committee's harmonic IR spectrum (exact derivatives), the same
numbers as spectra.harmonic.harmonic_autograd, with one-line errors for what cannot work."""
from __future__ import annotations

import subprocess

import numpy as np
import torch
from ase.io import read

from conftest import BIN, CHILD_ENV, cluster, untrained_committee


def _nanosil(*args):
    return subprocess.run([str(BIN / "nanosil"), *map(str, args)], capture_output=True, text=True,
                          env=CHILD_ENV, timeout=300)


def test_ml_harmonic_matches_autograd_and_writes_the_files(tmp_path):
    from driver.calculator import NanosilCalculator
    from spectra.harmonic import harmonic_autograd

    models = untrained_committee(tmp_path / "m")
    p1 = cluster("pyroxene_N01_GM.xyz")
    run = _nanosil("harmonic", p1, "--models", models, "--out", tmp_path / "out")
    assert run.returncode == 0, run.stderr
    rows = np.loadtxt(tmp_path / "out" / "harmonic.csv", delimiter=",", skiprows=1)
    expected = harmonic_autograd(read(p1), NanosilCalculator(str(models), dtype=torch.float64))
    np.testing.assert_allclose(rows[:, 1], expected.frequencies, atol=1e-3)
    np.testing.assert_allclose(rows[:, 2], expected.intensities, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "spectrum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "with the committee" in run.stdout and "exact derivatives" in run.stdout


def test_ml_harmonic_bad_input_is_one_line(tmp_path):
    from driver.models.committee import ModelConfig, build_committee, save_committee

    p1 = cluster("pyroxene_N01_GM.xyz")
    models = untrained_committee(tmp_path / "m")
    both = _nanosil("harmonic", p1, "--models", models, "--backend", "xtb", "--out", tmp_path / "o")
    nodip = tmp_path / "nodip"
    save_committee(build_committee(ModelConfig(hidden=(8, 8)), n_members=2, n_dipole=0), nodip)
    no_dipole = _nanosil("harmonic", p1, "--models", nodip, "--out", tmp_path / "o")
    missing = _nanosil("harmonic", p1, "--models", tmp_path / "nothing", "--out", tmp_path / "o")
    for run, words in [(both, "not both"), (no_dipole, "no dipole model"), (missing, "nothing")]:
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
        assert words in run.stderr
