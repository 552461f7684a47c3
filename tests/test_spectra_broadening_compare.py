"""Broadened harmonic spectra (the paper's P2 figure data), comparisons, spectrum files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spectra.broadening import PAPER_GRID, broaden
from spectra.compare import compare_harmonic, compare_spectra, peak_positions, read_comparable
from spectra.harmonic import HarmonicIR, read_harmonic
from spectra.spectrum import CSV_COLUMNS, Spectrum, read_spectrum, write_spectrum_csv

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def shared(*parts) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


def test_orca_p2_broadened_reproduces_paper_harmonic_spectrum():
    """ORCA P2 frequencies/intensities, Gaussians FWHM 10 cm^-1 on linspace(0, 4000, 1024), peak = intensity."""
    modes = read_harmonic(shared("orca_P2", "harmonic_ir_from_orca_out.txt"))
    paper = np.load(shared("paper_ir", "P2", "dft_harmonic.npy"))
    ours = broaden(modes.frequencies, modes.intensities, fwhm=10.0, shape="gaussian", normalization="height")
    np.testing.assert_array_equal(ours.wavenumber, PAPER_GRID)
    np.testing.assert_allclose(ours.wavenumber, paper[:, 0], rtol=0, atol=1e-9)
    # the text table rounds intensities to 0.01 km/mol and frequencies to 0.01 cm^-1
    assert np.max(np.abs(ours.intensity - paper[:, 1])) < 0.01
    assert np.max(np.abs(ours.intensity - paper[:, 1])) / paper[:, 1].max() < 2e-5
    # a width taken as sigma instead of FWHM would be far off
    wrong = broaden(modes.frequencies, modes.intensities, fwhm=10.0 * 2.3548)
    assert np.max(np.abs(wrong.intensity - paper[:, 1])) > 100


def test_line_shapes_and_normalisations():
    grid = np.linspace(0, 2000, 20001)
    f, i = np.array([500.0, 1200.0]), np.array([100.0, 40.0])
    for shape in ("gaussian", "lorentzian"):
        h = broaden(f, i, grid, fwhm=12.0, shape=shape, normalization="height")
        k = np.searchsorted(grid, 500.0)
        assert h.intensity[k] == pytest.approx(100.0, rel=1e-3)
        half = grid[(grid > 450) & (grid < 550)][h.intensity[(grid > 450) & (grid < 550)] >= 50.0]
        assert half.max() - half.min() == pytest.approx(12.0, abs=0.2)
        a = broaden(f, i, grid, fwhm=12.0, shape=shape, normalization="area")
        tol = 1e-4 if shape == "gaussian" else 0.02  # Lorentzian tails beyond the grid
        assert a.integral() == pytest.approx(140.0, rel=tol)
    # imaginary (negative) modes are left out
    assert broaden([-300.0], [50.0], grid).intensity.max() == 0.0
    with pytest.raises(ValueError, match="line shape"):
        broaden(f, i, grid, shape="voigt")


def test_compare_harmonic_sets():
    rng = np.random.default_rng(0)
    freqs = np.sort(rng.uniform(100, 1200, 24))
    ints = rng.uniform(0, 300, 24)
    a = HarmonicIR(freqs, ints)
    b = HarmonicIR(freqs[::-1] + 2.0, ints[::-1] + 5.0)  # order does not matter
    s = compare_harmonic(a, b)
    assert s["n_modes"] == 24
    assert s["frequency_mae_cm-1"] == pytest.approx(2.0) and s["frequency_rmse_cm-1"] == pytest.approx(2.0)
    assert s["intensity_mae_km_mol"] == pytest.approx(5.0)
    # a 3N set with its six near-zero (even imaginary) modes
    full = HarmonicIR(np.concatenate([[-8.0, -1.0, 0.0, 0.5, 3.0, 11.0], freqs]), np.concatenate([np.zeros(6), ints]))
    assert compare_harmonic(a, full)["frequency_mae_cm-1"] == pytest.approx(0.0, abs=1e-12)
    assert compare_harmonic(full, full, n_atoms=10)["n_modes"] == 24
    with pytest.raises(ValueError, match="cannot be matched"):
        compare_harmonic(a, HarmonicIR(freqs[:20], ints[:20]))


def test_compare_paper_p5_isomer_sets():
    """The paper's P5 isomer files hold DFT and ML harmonic sets: MAEs are small (paper: < 2.5 cm^-1 for most)."""
    data = np.load(shared("paper_ir", "P5", "isomer_I_harmonic.npy"))
    dft, ml = HarmonicIR(data[:, 0], data[:, 1]), HarmonicIR(data[:, 2], data[:, 3])
    s = compare_harmonic(dft, ml)
    assert s["n_modes"] == len(data)
    assert 0 < s["frequency_mae_cm-1"] < 2.5 and s["frequency_rmse_cm-1"] >= s["frequency_mae_cm-1"]
    assert 0 < s["intensity_mae_km_mol"] < 60


def test_compare_spectra_and_normalisation():
    grid = np.linspace(0, 2000, 2001)
    a = broaden([700.0, 1000.0], [100.0, 200.0], grid, fwhm=20)
    b = broaden([705.0, 1000.0], [50.0, 100.0], grid, fwhm=20)
    same = compare_spectra(a, a)
    assert same["mae"] == 0.0 and same["cosine_similarity"] == pytest.approx(1.0)
    raw = compare_spectra(a, b)
    scaled = compare_spectra(a, b, normalize="max")
    assert raw["mae"] > 10 * scaled["mae"]
    assert scaled["max_peak_a_cm-1"] == 1000.0 and scaled["max_peak_b_cm-1"] == 1000.0
    np.testing.assert_allclose(peak_positions(b, n=2), [705.0, 1000.0])
    with pytest.raises(ValueError, match="do not overlap"):
        compare_spectra(a, Spectrum(grid + 5000, a.intensity))


def test_paper_md_spectra_read_with_mean_and_stderr():
    s = read_spectrum(shared("paper_ir", "P2", "dft_md_400K_25runs.npy"))
    assert s.n_runs == 25 and np.all(s.stderr >= 0) and s.stderr.max() > 0
    assert s.wavenumber[1] - s.wavenumber[0] == pytest.approx(2.036, abs=2e-3)  # 2048 fs at 0.5 fs
    one = read_spectrum(shared("paper_ir", "P2", "dft_md_400K.npy"))
    assert one.n_runs == 1 and np.all(one.stderr == 0)
    # the paper's P2 bands (Sec. III B): ~464, 748, 827, 1114 cm^-1
    peaks = peak_positions(s.cropped(300, 1300), n=6)
    for band in (464.0, 827.0, 1114.0):
        assert np.min(np.abs(peaks - band)) < 15.0


def test_spectrum_csv_round_trip_and_detection(tmp_path):
    s = Spectrum(np.array([0.0, 2.0, 4.0]), np.array([0.0, 1.5, 0.25]), np.array([0.0, 0.1, 0.05]))
    write_spectrum_csv(tmp_path / "s.csv", s)
    text = (tmp_path / "s.csv").read_text().splitlines()
    assert text[0] == ",".join(CSV_COLUMNS) == "wavenumber_cm-1,wavelength_um,intensity,stderr"
    assert text[1].split(",")[1] == "inf" and float(text[2].split(",")[1]) == pytest.approx(5000.0)
    back = read_spectrum(tmp_path / "s.csv")
    np.testing.assert_allclose(back.intensity, s.intensity)
    np.testing.assert_allclose(back.stderr, s.stderr)
    assert isinstance(read_comparable(tmp_path / "s.csv"), Spectrum)
    np.savetxt(tmp_path / "modes.txt", [[120.0, 5.0], [455.5, 20.0], [1100.0, 300.0]])
    assert isinstance(read_comparable(tmp_path / "modes.txt"), HarmonicIR)
    np.savetxt(tmp_path / "spec.txt", np.column_stack([np.arange(10.0), np.ones(10)]))
    assert isinstance(read_comparable(tmp_path / "spec.txt"), Spectrum)
    bad = tmp_path / "bad.csv"
    bad.write_text("wavenumber_cm-1,wavelength_um,intensity,stderr\n0,inf,1,0\n2,5000,1\n")
    with pytest.raises(ValueError, match=r"bad.csv: line 3: expected 4 columns, found 3"):
        read_spectrum(bad)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        read_spectrum(tmp_path / "empty.csv")
