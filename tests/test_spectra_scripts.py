"""The four standalone scripts and the installed `nanosil spectrum | compare | sum` behind three of them: --help,
real runs producing files, one-line errors with exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import units

from spectra.constants import KM_MOL_PER_E2_AMU, SPEED_OF_LIGHT_CM_PER_FS
from spectra.io import write_dipoles_npz
from spectra.spectrum import read_spectrum

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared" / "data"
SCRIPTS = ("ir_spectrum.py", "harmonic_ir.py", "compare_spectra.py", "sum_spectra.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(script, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def nanosil(*args, cwd=None):
    """The installed console script (what a user without a checkout runs)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    return subprocess.run([str(Path(sys.executable).parent / "nanosil"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def harmonic_mode_dipoles(wavenumber, dmu_dq, temperature, n_steps, dt=0.5, phase=0.0):
    """Dipoles (e·Å) of one classical harmonic mode with energy k_B T."""
    t = np.arange(n_steps) * dt
    w = 2 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * wavenumber
    amp = np.sqrt(2 * units.kB * temperature * units.fs**2) / w
    return (amp * np.cos(w * t + phase))[:, None] * np.asarray(dmu_dq)[None, :]


def write_ipi_extras(path: Path, dipoles_au: np.ndarray, stride: int = 1):
    """i-PI's extras layout (as checked against a real i-PI run in test_spectra_io)."""
    with open(path, "w") as fh:
        for k, d in enumerate(dipoles_au):
            fh.write(f" #EXTRAS(dipole)# Step:  {k * stride:10d} \n")
            fh.write(" ".join(f"{x:16.8e}" for x in d) + "\n")


def write_ipi_members(path: Path, members_au: np.ndarray, stride: int = 1):
    """i-PI's layout of the ``dipole_members`` extras (n_members x 3): one line per member after each header."""
    with open(path, "w") as fh:
        for k in range(members_au.shape[1]):
            fh.write(f" #EXTRAS(dipole_members)# Step:  {k * stride:10d} \n")
            fh.write("\n".join(" ".join(f"{x:16.8e}" for x in d) for d in members_au[:, k]) + "\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout and "--plot" in proc.stdout


def test_ir_spectrum_csv_absolute_band_and_runs(tmp_path):
    temperature, nu = 350.0, 950.0
    dmu = np.array([0.25, 0.1, -0.05])
    intensity = float(dmu @ dmu) * KM_MOL_PER_E2_AMU
    n = 32000  # 16 ps at 0.5 fs
    write_dipoles_npz(tmp_path / "run1.npz", harmonic_mode_dipoles(nu, dmu, temperature, n))
    # second run in i-PI format (e·Bohr), stride 2 at 0.25 fs = the same 0.5 fs between frames, other phase,
    # with a weak extra mode so the runs differ
    second = harmonic_mode_dipoles(nu, dmu, temperature, n, phase=1.0) + harmonic_mode_dipoles(
        1500.0, [0.0, 0.05, 0.0], temperature, n)
    write_ipi_extras(tmp_path / "run2.dipole_0", second / units.Bohr, stride=2)
    out = tmp_path / "spec.csv"
    proc = run("ir_spectrum.py", tmp_path / "run1.npz", tmp_path / "run2.dipole_0", "--timestep", 0.25,
               "--temperature", temperature, "--format", "auto", "--out", out, "--plot", tmp_path / "spec.png")
    # run1.npz has no step numbers: with --timestep 0.25 its frames would be 0.25 fs apart, unlike run2
    assert_one_line_error(proc, "different frame intervals")
    write_dipoles_npz(tmp_path / "run1.npz", harmonic_mode_dipoles(nu, dmu, temperature, n), steps=np.arange(n) * 2)
    proc = run("ir_spectrum.py", tmp_path / "run1.npz", tmp_path / "run2.dipole_0", "--timestep", 0.25,
               "--temperature", temperature, "--out", out, "--plot", tmp_path / "spec.png")
    assert proc.returncode == 0, proc.stderr
    assert "run 2/2" in proc.stdout
    header = out.read_text().splitlines()[0]
    assert header == "wavenumber_cm-1,wavelength_um,intensity,stderr"
    spec = read_spectrum(out)
    assert spec.wavenumber[0] == 0.0 and np.all(np.diff(spec.wavenumber) > 0)
    assert spec.wavenumber[1] == pytest.approx(2.036, abs=1e-3)
    # the weak 1500 cm^-1 mode is in one run only: mean = half, with a standard error
    band = spec.integral(nu - 250, nu + 250)
    assert band == pytest.approx(intensity, rel=0.02)
    assert spec.stderr[np.argmin(np.abs(spec.wavenumber - 1500))] > 0
    assert (tmp_path / "spec.png").read_bytes()[:8] == PNG_MAGIC
    # one run: stderr is 0
    proc = run("ir_spectrum.py", tmp_path / "run1.npz", "--timestep", 0.25, "--temperature", temperature,
               "--out", tmp_path / "one.csv", "--max-wavenumber", 4000)
    assert proc.returncode == 0, proc.stderr
    one = read_spectrum(tmp_path / "one.csv")
    assert np.all(one.stderr == 0) and one.wavenumber[-1] <= 4000
    assert one.integral(nu - 250, nu + 250) == pytest.approx(intensity, rel=0.02)


def test_ir_spectrum_committee_band(tmp_path):
    """Two runs, each with a 3-member dipole committee (member k = s_k x dipole): both bands, labelled."""
    temperature, nu, n = 350.0, 950.0, 24000  # 12 ps at 0.5 fs
    scales = np.array([1.0, 1.2, 0.8])
    dipoles, members = [], []
    for k, phase in enumerate((0.0, 1.0)):
        mu = harmonic_mode_dipoles(nu, [0.25, 0.1, -0.05], temperature, n, phase=phase) + harmonic_mode_dipoles(
            1500.0, [0.0, 0.05 * k, 0.0], temperature, n)  # the runs differ: a stderr band
        dipoles.append(tmp_path / f"run{k}.dipole_0")
        members.append(tmp_path / f"run{k}.dipole_members_0")
        write_ipi_extras(dipoles[-1], mu / units.Bohr)
        write_ipi_members(members[-1], scales[:, None, None] * mu[None] / units.Bohr)
    base = ["--timestep", 0.5, "--temperature", temperature, "--discard-ps", 1.0, "--max-wavenumber", 3000]
    out, png = tmp_path / "both.csv", tmp_path / "both.png"
    proc = run("ir_spectrum.py", *dipoles, *base, "--committee-band", *members, "--out", out, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert "committee band of 3 dipole members" in proc.stdout and "committee 2/2" in proc.stdout
    assert out.read_text().splitlines()[0] == "wavenumber_cm-1,wavelength_um,intensity,stderr,std_committee"
    spec = read_spectrum(out)
    assert spec.stderr.max() > 0  # runs band
    # member k's spectrum is s_k^2 times the dipole's in both runs: std = std(s^2) x intensity
    peak = spec.intensity.max()
    np.testing.assert_allclose(spec.std_committee, np.std(scales**2, ddof=1) * spec.intensity,
                               rtol=1e-5, atol=1e-9 * peak)
    assert spec.intensity.min() >= 0  # the default window
    assert png.read_bytes()[:8] == PNG_MAGIC
    # the compare script still reads the five-column CSV
    assert run("compare_spectra.py", out, out).returncode == 0

    errs = ["--out", tmp_path / "x.csv"]
    assert_one_line_error(run("ir_spectrum.py", *dipoles, *base, "--committee-band", members[0], *errs),
                          "--committee-band: 1 member file(s) for 2 dipole file(s)")
    strided = tmp_path / "strided.dipole_members_0"
    write_ipi_members(strided, scales[:, None, None] * np.ones((1, n, 3)), stride=2)
    assert_one_line_error(run("ir_spectrum.py", dipoles[0], *base, "--committee-band", strided, *errs),
                          str(strided), "1 fs apart", str(dipoles[0]), "0.5 fs")
    assert_one_line_error(run("ir_spectrum.py", dipoles[0], *base, "--committee-band", dipoles[1], *errs),
                          str(dipoles[1]), "expected 'dipole_members'")
    assert_one_line_error(run("ir_spectrum.py", members[0], *base, *errs), str(members[0]), "--committee-band")
    assert not (tmp_path / "x.csv").exists()


def test_ir_spectrum_bad_input(tmp_path):
    base = ["--timestep", 0.5, "--temperature", 300, "--out", tmp_path / "x.csv"]
    empty = tmp_path / "empty.dipole_0"
    empty.write_text("")
    assert_one_line_error(run("ir_spectrum.py", empty, *base), str(empty), "empty file")

    trunc = tmp_path / "trunc.dipole_0"
    write_ipi_extras(trunc, np.ones((20, 3)))
    trunc.write_text(trunc.read_text()[:-30])
    assert_one_line_error(run("ir_spectrum.py", trunc, *base), str(trunc), "line 40", "truncated")

    short = tmp_path / "short.dipole_0"
    write_ipi_extras(short, np.random.default_rng(0).normal(size=(12000, 3)))  # 6 ps: 1 ps after 5 ps
    assert_one_line_error(run("ir_spectrum.py", short, *base), str(short), "fewer than the correlation depth")

    nan = tmp_path / "nan.txt"
    rows = np.ones((50, 3))
    rows[7, 1] = np.nan
    np.savetxt(nan, rows)
    assert_one_line_error(run("ir_spectrum.py", nan, *base), str(nan), "line 8", "NaN")

    cols = tmp_path / "cols.txt"
    cols.write_text("1 2 3\n1 2 3 4\n")
    assert_one_line_error(run("ir_spectrum.py", cols, *base), str(cols), "line 2", "expected 3 numbers, found 4")

    ipi_cols = tmp_path / "cols.dipole_0"
    write_ipi_extras(ipi_cols, np.ones((20, 3)))
    ipi_cols.write_text(ipi_cols.read_text().replace("1.00000000e+00\n", "1.00000000e+00 1.0\n", 1))
    assert_one_line_error(run("ir_spectrum.py", ipi_cols, *base), str(ipi_cols), "line 2", "expected 3 numbers, found 4")

    # a time step that does not match: frames of two runs at different intervals, both files named
    fine, coarse = tmp_path / "fine.dipole_0", tmp_path / "coarse.dipole_0"
    write_ipi_extras(fine, np.zeros((30, 3)), stride=1)
    write_ipi_extras(coarse, np.zeros((30, 3)), stride=2)
    assert_one_line_error(run("ir_spectrum.py", fine, coarse, *base, "--discard-ps", 0, "--depth-fs", 2),
                          "different frame intervals", f"{fine}: 0.5 fs", f"{coarse}: 1 fs")

    assert_one_line_error(run("ir_spectrum.py", tmp_path / "nope.dipole_0", *base), "nope.dipole_0", "no such file")
    # argparse errors: one line too
    assert_one_line_error(run("ir_spectrum.py", cols, "--out", "x.csv"), "--timestep")
    assert_one_line_error(run("ir_spectrum.py", cols, *base, "--units", "nm"), "--units")
    assert not (tmp_path / "x.csv").exists()


def test_harmonic_ir_xtb_on_p1(tmp_path):
    p1 = SHARED / "structures" / "pyroxene_N01_GM.xyz"
    if not p1.exists():
        pytest.skip(f"reference structure not found: {p1}")
    pytest.importorskip("tblite")
    proc = run("harmonic_ir.py", p1, "--calculator", "xtb", "--relax", 0.005, "--out", tmp_path / "P1",
               "--plot", tmp_path / "P1.png")
    assert proc.returncode == 0, proc.stderr
    modes = np.loadtxt(tmp_path / "P1_modes.txt")
    assert modes.shape == (15, 2)
    vib = modes[np.argsort(np.abs(modes[:, 0]))[6:]]
    assert np.all(vib[:, 0] > 50) and np.all(vib[:, 1] >= 0) and vib[:, 1].max() > 10
    spec = read_spectrum(tmp_path / "P1_spectrum.csv")
    assert len(spec.wavenumber) == 1024 and spec.wavenumber[-1] == 4000.0
    strongest = vib[np.argmax(vib[:, 1])]
    k = np.argmin(np.abs(spec.wavenumber - strongest[0]))
    assert spec.intensity[k] == pytest.approx(strongest[1], rel=0.05)  # height = intensity (grid spacing 3.9)
    assert (tmp_path / "P1.png").read_bytes()[:8] == PNG_MAGIC


def test_harmonic_ir_bad_input(tmp_path):
    assert_one_line_error(run("harmonic_ir.py", tmp_path / "none.xyz", "--calculator", "xtb", "--out", tmp_path / "x"),
                          "none.xyz", "no such file")
    garbage = tmp_path / "garbage.xyz"
    garbage.write_text("this is not\na structure\n")
    assert_one_line_error(run("harmonic_ir.py", garbage, "--calculator", "xtb", "--out", tmp_path / "x"),
                          "garbage.xyz", "cannot read structure")
    p1 = tmp_path / "p1.xyz"
    p1.write_text("2\n\nMg 0 0 0\nO 1.8 0 0\n")
    assert_one_line_error(run("harmonic_ir.py", p1, "--calculator", "ml", "--out", tmp_path / "x"), "--models")


def test_compare_spectra_script(tmp_path):
    table = SHARED / "orca_P2" / "harmonic_ir_from_orca_out.txt"
    paper = SHARED / "paper_ir" / "P2" / "dft_harmonic.npy"
    if not table.exists() or not paper.exists():
        pytest.skip(f"reference data not found under {SHARED}")
    import json

    proc = run("compare_spectra.py", table, paper, "--json", tmp_path / "c.json", "--plot", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((tmp_path / "c.json").read_text())
    assert figures["kind"] == "spectrum" and figures["mae"] < 0.001 and figures["cosine_similarity"] > 0.999999
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    shifted = tmp_path / "shifted.txt"
    data = np.loadtxt(table)
    np.savetxt(shifted, np.column_stack([data[:, 0] + 3.0, data[:, 1] * 1.1]))
    proc = run("compare_spectra.py", table, shifted, "--json", tmp_path / "h.json")
    assert proc.returncode == 0, proc.stderr
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["kind"] == "harmonic" and h["n_modes"] == 24
    assert h["frequency_mae_cm-1"] == pytest.approx(3.0, abs=1e-6)
    assert h["intensity_mae_km_mol"] == pytest.approx(0.1 * data[:, 1].mean(), rel=1e-3)
    assert "frequency_mae_cm-1" in proc.stdout
    bad = tmp_path / "bad.txt"
    bad.write_text("100 1\n200 2 3\n")
    assert_one_line_error(run("compare_spectra.py", table, bad, "--kind", "harmonic"), "bad.txt", "line 2")


def test_sum_spectra_script(tmp_path):
    from spectra.broadening import broaden
    from spectra.spectrum import write_spectrum_csv

    grid = np.linspace(0, 2000, 2001)
    write_spectrum_csv(tmp_path / "P1.csv", broaden([1000.0], [100.0], grid, fwhm=20, normalization="area"))
    write_spectrum_csv(tmp_path / "P2.csv", broaden([1050.0], [300.0], grid, fwhm=20, normalization="area"))
    proc = run("sum_spectra.py", tmp_path / "P1.csv", tmp_path / "P2.csv", "--formula-unit", "MgSiO3",
               "--sizes", 1, 2, "--weights", "mass", "--distribution", 1, 1, "--out", tmp_path / "sum.txt",
               "--csv", tmp_path / "sum.csv", "--plot", tmp_path / "sum.png")
    assert proc.returncode == 0, proc.stderr
    table = np.loadtxt(tmp_path / "sum.txt")
    assert table.shape[1] == 6
    # equal mass fractions of P1 (100.4 amu) and P2 (200.8 amu): number fractions 2/3 and 1/3
    area = np.trapezoid(table[:, 2], table[:, 0])
    assert area == pytest.approx(2 / 3 * 100 + 1 / 3 * 300, rel=1e-3)
    m1 = 24.305 + 28.085 + 3 * 15.999
    mean_mass_g = (2 / 3 * m1 + 1 / 3 * 2 * m1) * units._amu * 1e3
    np.testing.assert_allclose(table[:, 5], table[:, 4] / mean_mass_g, rtol=1e-5)
    assert read_spectrum(tmp_path / "sum.csv").integral() == pytest.approx(area, rel=1e-6)
    assert (tmp_path / "sum.png").read_bytes()[:8] == PNG_MAGIC
    assert_one_line_error(run("sum_spectra.py", tmp_path / "P1.csv", "--formula-unit", "MgSiO3", "--sizes", 1, 2,
                              "--out", tmp_path / "x.txt"), "2 sizes for 1 spectra")
    assert_one_line_error(run("sum_spectra.py", tmp_path / "P1.csv", "--masses", 100, "--weights", "number",
                              "--out", tmp_path / "x.txt"), "need a size distribution")
    assert_one_line_error(run("sum_spectra.py", tmp_path / "missing.csv", "--masses", 100, "--out", tmp_path / "x.txt"),
                          "missing.csv", "no such file")


def test_harmonic_ir_ml_model_uses_autograd(tmp_path):
    pytest.importorskip("driver.calculator", reason="driver.calculator (NanosilCalculator) not available")
    from driver.models.committee import ModelConfig, build_committee, save_committee

    p1 = SHARED / "structures" / "pyroxene_N01_GM.xyz"
    if not p1.exists():
        pytest.skip(f"reference structure not found: {p1}")
    save_committee(build_committee(ModelConfig(), n_members=1, n_dipole=1, seed=0), tmp_path / "models")
    proc = run("harmonic_ir.py", p1, "--calculator", "ml", "--models", tmp_path / "models", "--out", tmp_path / "P1ml")
    assert proc.returncode == 0, proc.stderr
    assert "(autograd)" in proc.stdout
    assert "harmonic IR (autograd)" in (tmp_path / "P1ml_modes.txt").read_text()
    assert np.loadtxt(tmp_path / "P1ml_modes.txt").shape == (15, 2)
    assert_one_line_error(run("harmonic_ir.py", p1, "--calculator", "ml", "--models", tmp_path / "nothing",
                              "--out", tmp_path / "x"), "nothing")


# ------------------------------------------------------------------------------------------ installed subcommands
@pytest.mark.parametrize("command", ["spectrum", "compare", "sum"])
def test_nanosil_subcommand_help(command):
    proc = nanosil(command, "--help")
    assert proc.returncode == 0 and f"usage: nanosil {command}" in proc.stdout and "--plot" in proc.stdout
    assert command in nanosil("--help").stdout


def test_nanosil_spectrum(tmp_path):
    """`nanosil spectrum` = scripts/ir_spectrum.py: absolute band area, committee band, PNG, one-line errors."""
    temperature, nu, n = 300.0, 800.0, 16000  # 8 ps at 0.5 fs
    dmu = np.array([0.2, -0.1, 0.05])
    mu = harmonic_mode_dipoles(nu, dmu, temperature, n)
    write_ipi_extras(tmp_path / "run.dipole_0", mu / units.Bohr)
    write_ipi_members(tmp_path / "run.dipole_members_0", np.array([1.0, 1.1])[:, None, None] * mu[None] / units.Bohr)
    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    proc = nanosil("spectrum", tmp_path / "run.dipole_0", "--timestep", 0.5, "--temperature", temperature,
                   "--discard-ps", 1, "--max-wavenumber", 2000, "--committee-band", tmp_path / "run.dipole_members_0",
                   "--out", out, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert "committee band of 2 dipole members" in proc.stdout
    spec = read_spectrum(out)
    assert spec.integral(nu - 250, nu + 250) == pytest.approx(float(dmu @ dmu) * KM_MOL_PER_E2_AMU, rel=0.02)
    assert spec.std_committee is not None and spec.std_committee.max() > 0 and spec.intensity.min() >= 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    # the same CSV as the script's
    assert run("ir_spectrum.py", tmp_path / "run.dipole_0", "--timestep", 0.5, "--temperature", temperature,
               "--discard-ps", 1, "--max-wavenumber", 2000, "--committee-band", tmp_path / "run.dipole_members_0",
               "--out", tmp_path / "script.csv").returncode == 0
    assert (tmp_path / "script.csv").read_text() == out.read_text()
    bad = ["--timestep", 0.5, "--temperature", temperature, "--out", tmp_path / "x.csv"]
    assert_one_line_error(nanosil("spectrum", tmp_path / "nope.dipole_0", *bad), "nanosil spectrum: error:",
                          "nope.dipole_0", "no such file")
    assert_one_line_error(nanosil("spectrum", tmp_path / "run.dipole_members_0", *bad), "run.dipole_members_0")
    assert_one_line_error(nanosil("spectrum", tmp_path / "run.dipole_0", "--timestep", 0.5, "--temperature",
                                  temperature, "--out", tmp_path), "nanosil spectrum: error:", f"--out {tmp_path} is a folder")
    assert_one_line_error(nanosil("spectrum", tmp_path / "run.dipole_0", "--out", "x.csv"), "--timestep")
    assert not (tmp_path / "x.csv").exists()


def test_nanosil_compare(tmp_path):
    import json

    from spectra.broadening import broaden
    from spectra.spectrum import write_spectrum_csv

    grid = np.linspace(0, 2000, 2001)
    write_spectrum_csv(tmp_path / "a.csv", broaden([1000.0], [100.0], grid, fwhm=20, normalization="area"))
    write_spectrum_csv(tmp_path / "b.csv", broaden([1010.0], [100.0], grid, fwhm=20, normalization="area"))
    np.savetxt(tmp_path / "ha.txt", [[500.0, 10.0], [1000.0, 100.0]])
    np.savetxt(tmp_path / "hb.txt", [[504.0, 12.0], [1002.0, 90.0]])
    proc = nanosil("compare", tmp_path / "a.csv", tmp_path / "b.csv", "--json", tmp_path / "c.json",
                   "--plot", tmp_path / "c.png")
    assert proc.returncode == 0, proc.stderr
    figures = json.loads((tmp_path / "c.json").read_text())
    assert figures["kind"] == "spectrum" and figures["max_peak_a_cm-1"] == pytest.approx(1000.0)
    assert figures["max_peak_b_cm-1"] == pytest.approx(1010.0) and figures["area_a"] == pytest.approx(100.0, rel=1e-3)
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    proc = nanosil("compare", tmp_path / "ha.txt", tmp_path / "hb.txt", "--kind", "harmonic", "--json", tmp_path / "h.json")
    assert proc.returncode == 0, proc.stderr
    h = json.loads((tmp_path / "h.json").read_text())
    assert h["kind"] == "harmonic" and h["frequency_mae_cm-1"] == pytest.approx(3.0)
    assert_one_line_error(nanosil("compare", tmp_path / "a.csv", tmp_path / "b.csv", "--range", 10, 5),
                          "nanosil compare: error:", "empty range")
    assert_one_line_error(nanosil("compare", tmp_path / "a.csv", tmp_path / "missing.csv"), "missing.csv")


def test_nanosil_sum(tmp_path):
    from spectra.broadening import broaden
    from spectra.spectrum import write_spectrum_csv

    grid = np.linspace(0, 2000, 2001)
    write_spectrum_csv(tmp_path / "P1.csv", broaden([1000.0], [100.0], grid, fwhm=20, normalization="area"))
    write_spectrum_csv(tmp_path / "P2.csv", broaden([1050.0], [300.0], grid, fwhm=20, normalization="area"))
    proc = nanosil("sum", tmp_path / "P1.csv", tmp_path / "P2.csv", "--formula-unit", "MgSiO3", "--sizes", 1, 2,
                   "--out", tmp_path / "sum.txt", "--csv", tmp_path / "sum.csv", "--plot", tmp_path / "sum.png")
    assert proc.returncode == 0, proc.stderr
    table = np.loadtxt(tmp_path / "sum.txt")
    assert table.shape[1] == 6
    assert np.trapezoid(table[:, 2], table[:, 0]) == pytest.approx(0.5 * 100 + 0.5 * 300, rel=1e-3)  # equal weights
    assert (tmp_path / "sum.png").read_bytes()[:8] == PNG_MAGIC
    assert read_spectrum(tmp_path / "sum.csv").integral() == pytest.approx(200.0, rel=1e-3)
    assert_one_line_error(nanosil("sum", tmp_path / "P1.csv", "--formula-unit", "MgSiO3", "--sizes", 1, 2,
                                  "--out", tmp_path / "x.txt"), "nanosil sum: error:", "2 sizes for 1 spectra")
    assert_one_line_error(nanosil("sum", tmp_path / "P1.csv", "--out", tmp_path / "x.txt"), "--formula-unit")
