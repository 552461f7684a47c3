"""The dipole-committee band of an MD IR spectrum, on the dipoles of a real i-PI trajectory.

The committee band is the std (ddof=1) over the dipole members of the spectra of each member's dipole
series on the same trajectory: the model uncertainty of the dipole surface. A spectrum is a quadratic form
of the dipole series, so scaled members give exactly predictable bands.
"""
from __future__ import annotations

import numpy as np
import pytest
from test_spectra_io import MEMBER_SCALES, run_ipi

from spectra.autocorrelation import (
    SpectrumOptions,
    committee_spectra,
    md_committee_spectrum,
    md_ir_spectrum,
    member_band_areas,
    run_spectrum,
    with_committee_band,
)
from spectra.io import DipoleMembersSeries, DipoleSeries, read_dipole_members, read_dipoles
from spectra.plotting import plot_spectra
from spectra.spectrum import COMMITTEE_COLUMN, CSV_COLUMNS, read_spectrum, write_spectrum_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEMPERATURE = 300.0
OPTIONS = SpectrumOptions(depth_fs=100.0, discard_ps=0.05)  # a 1 ps run: 100 fs depth (resolution 167 cm^-1)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """The real i-PI NVT run of test_spectra_io (O and H on springs): its dipole file and per-member file."""
    extras = run_ipi(tmp_path_factory.mktemp("ipi_committee"))
    return extras, extras.parent / "sim.dipole_members_0"


@pytest.fixture(scope="module")
def real_dipoles(real_run):
    return read_dipoles(real_run[0], timestep_fs=0.5)


def test_identical_members_give_exactly_zero_band(real_dipoles):
    mu = real_dipoles.dipoles
    committee = committee_spectra(np.stack([mu, mu, mu]), real_dipoles.frame_interval_fs, TEMPERATURE, OPTIONS)
    assert committee.n_members == 3
    assert np.all(committee.std == 0.0)
    single = run_spectrum(mu, real_dipoles.frame_interval_fs, TEMPERATURE, OPTIONS)
    np.testing.assert_array_equal(committee.members[2], single.intensity)  # the same computation, bit for bit
    np.testing.assert_allclose(committee.mean, single.intensity, rtol=1e-15, atol=0)  # mean of 3: rounding
    np.testing.assert_array_equal(committee.wavenumber, single.wavenumber)


def test_scaled_members_band_is_the_arithmetic(real_dipoles):
    """Member k = s_k mu gives s_k^2 S: mean S mean(s^2), std S std(s^2) (ddof=1), same units."""
    mu, dt = real_dipoles.dipoles, real_dipoles.frame_interval_fs
    scales = np.array([1.0, 1.1, 0.9, 1.25])
    committee = committee_spectra(scales[:, None, None] * mu[None], dt, TEMPERATURE, OPTIONS, source="scaled")
    s = run_spectrum(mu, dt, TEMPERATURE, OPTIONS).intensity  # km/mol per cm^-1
    peak = s.max()
    np.testing.assert_allclose(committee.members, scales[:, None] ** 2 * s, rtol=1e-10, atol=1e-13 * peak)
    np.testing.assert_allclose(committee.mean, np.mean(scales**2) * s, rtol=1e-10, atol=1e-13 * peak)
    np.testing.assert_allclose(committee.std, np.std(scales**2, ddof=1) * s, rtol=1e-10, atol=1e-13 * peak)
    assert np.all(committee.std[s > 1e-6 * peak] > 0)
    areas = member_band_areas(committee)
    np.testing.assert_allclose(areas, scales**2 * np.trapezoid(s, committee.wavenumber), rtol=1e-10)
    assert committee.meta["n_members"] == 4 and committee.meta["source"] == "scaled"
    as_spectrum = committee.as_spectrum()
    np.testing.assert_array_equal(as_spectrum.intensity, committee.mean)
    np.testing.assert_array_equal(as_spectrum.std_committee, committee.std)
    assert np.all(as_spectrum.stderr == 0)


def test_mean_of_member_spectra_exceeds_spectrum_of_mean_dipole_by_the_spread(real_dipoles):
    """S is quadratic in mu: mean_k S[mu_k] = S[mean mu] + mean_k S[mu_k - mean mu] (>= 0 with Parzen)."""
    mu, dt = real_dipoles.dipoles, real_dipoles.frame_interval_fs
    members = np.stack([mu, 1.2 * mu, mu + 0.3 * mu**2 / np.abs(mu).max()])  # one member differs in shape
    committee = committee_spectra(members, dt, TEMPERATURE, OPTIONS)
    mean_dipole = run_spectrum(members.mean(axis=0), dt, TEMPERATURE, OPTIONS).intensity
    spread = np.mean([run_spectrum(m - members.mean(axis=0), dt, TEMPERATURE, OPTIONS).intensity for m in members],
                     axis=0)
    np.testing.assert_allclose(committee.mean, mean_dipole + spread, rtol=1e-9, atol=1e-12 * committee.mean.max())
    assert spread.min() >= 0.0 and spread.max() > 0


def test_real_ipi_committee_file_gives_the_scaled_band(real_run, real_dipoles):
    """End to end from the file i-PI wrote: members MEMBER_SCALES x dipole, band = S std(scales^2)."""
    members = read_dipole_members(real_run[1], timestep_fs=0.5)
    committee = committee_spectra(members.dipoles, members.frame_interval_fs, TEMPERATURE, OPTIONS, members.source)
    s = run_spectrum(real_dipoles.dipoles, real_dipoles.frame_interval_fs, TEMPERATURE, OPTIONS).intensity
    scales = np.asarray(MEMBER_SCALES)
    # i-PI prints 9 significant digits: the arithmetic holds to ~1e-7
    np.testing.assert_allclose(committee.std, np.std(scales**2, ddof=1) * s, rtol=1e-6, atol=1e-9 * s.max())
    np.testing.assert_allclose(committee.members[0], s, rtol=1e-6, atol=1e-9 * s.max())


def test_committee_over_runs_is_the_std_of_each_members_run_mean(real_dipoles):
    """Two runs (the halves of the real trajectory): member k's spectrum is its mean over the runs."""
    mu, dt = real_dipoles.dipoles, real_dipoles.frame_interval_fs
    halves = [mu[:500], mu[500:]]
    make = [lambda x: x, lambda x: 1.1 * x, lambda x: x + 0.2 * np.roll(x, 1, axis=1)]  # third: another direction
    runs = [DipoleMembersSeries(np.stack([f(h) for f in make]), dt, source=f"half{k}") for k, h in enumerate(halves)]
    committee = md_committee_spectrum(runs, TEMPERATURE, OPTIONS)
    per_member = np.array([[run_spectrum(f(h), dt, TEMPERATURE, OPTIONS).intensity for h in halves] for f in make])
    expected = per_member.mean(axis=1)  # (members, wavenumbers)
    np.testing.assert_allclose(committee.members, expected, rtol=1e-12, atol=1e-15 * expected.max())
    np.testing.assert_allclose(committee.std, expected.std(axis=0, ddof=1), rtol=1e-10,
                               atol=1e-14 * expected.max())
    assert committee.n_runs == 2 and committee.meta["sources"] == ["half0", "half1"]
    # the runs' band of the same spectra is a different number: the spread of the halves, not of the members
    runs_spectrum = md_ir_spectrum([DipoleSeries(h, dt, source=f"half{k}") for k, h in enumerate(halves)],
                                   TEMPERATURE, OPTIONS)
    both = with_committee_band(runs_spectrum, committee)
    np.testing.assert_array_equal(both.intensity, runs_spectrum.intensity)
    np.testing.assert_array_equal(both.stderr, runs_spectrum.stderr)
    np.testing.assert_array_equal(both.std_committee, committee.std)
    assert both.meta["n_dipole_members"] == 3


def test_both_bands_in_csv_columns_and_png_legend(real_dipoles, tmp_path):
    mu, dt = real_dipoles.dipoles, real_dipoles.frame_interval_fs
    halves = [mu[:500], mu[500:]]
    runs = md_ir_spectrum([DipoleSeries(h, dt, source=f"half{k}") for k, h in enumerate(halves)], TEMPERATURE, OPTIONS)
    members = [DipoleMembersSeries(np.stack([h, 1.1 * h, 0.9 * h]), dt, source=f"half{k}") for k, h in enumerate(halves)]
    spectrum = with_committee_band(runs, md_committee_spectrum(members, TEMPERATURE, OPTIONS))
    assert spectrum.stderr.max() > 0 and spectrum.std_committee.max() > 0

    write_spectrum_csv(tmp_path / "both.csv", spectrum)
    header = (tmp_path / "both.csv").read_text().splitlines()[0]
    assert header.split(",") == list(CSV_COLUMNS) + [COMMITTEE_COLUMN]
    assert header == "wavenumber_cm-1,wavelength_um,intensity,stderr,std_committee"
    back = read_spectrum(tmp_path / "both.csv")
    np.testing.assert_allclose(back.std_committee, spectrum.std_committee, rtol=1e-9, atol=1e-300)
    np.testing.assert_allclose(back.stderr, spectrum.stderr, rtol=1e-9, atol=1e-300)
    cropped = back.cropped(0.0, 3000.0)
    assert cropped.std_committee.shape == cropped.intensity.shape
    # without a committee band the file keeps the four columns
    write_spectrum_csv(tmp_path / "runs.csv", runs)
    assert (tmp_path / "runs.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert read_spectrum(tmp_path / "runs.csv").std_committee is None

    legend = plot_spectra(tmp_path / "both.png", [spectrum], ["300 K"], xlim=(0.0, 3000.0))
    assert (tmp_path / "both.png").read_bytes()[:8] == PNG_MAGIC
    assert legend == ["300 K", "runs: ±1 standard error over 2 runs (MD sampling)",
                      "committee: ±1 std over 3 dipole members (dipole model)"]
    # several curves: each band says whose it is
    legend = plot_spectra(tmp_path / "two.png", [spectrum, runs], ["ML", "other"])
    assert legend == ["ML", "ML: runs: ±1 standard error over 2 runs (MD sampling)",
                      "ML: committee: ±1 std over 3 dipole members (dipole model)",
                      "other", "other: runs: ±1 standard error over 2 runs (MD sampling)"]
    # a plain spectrum's plot stays as it was: no band labels unless asked
    assert plot_spectra(tmp_path / "runs.png", [runs], ["300 K"]) == ["300 K"]
    assert plot_spectra(tmp_path / "runs.png", [runs], [""], label_bands=True) == [
        "runs: ±1 standard error over 2 runs (MD sampling)"]


def test_committee_bad_input(real_dipoles):
    mu, dt = real_dipoles.dipoles, real_dipoles.frame_interval_fs
    with pytest.raises(ValueError, match="one.npz: 1 dipole member.*at least 2"):
        committee_spectra(mu[None], dt, TEMPERATURE, OPTIONS, source="one.npz")
    with pytest.raises(ValueError, match=r"flat: member dipoles have shape \(1001, 3\)"):
        committee_spectra(mu, dt, TEMPERATURE, OPTIONS, source="flat")
    a = DipoleMembersSeries(np.stack([mu, mu]), dt, source="a.dipole_members_0")
    b = DipoleMembersSeries(np.stack([mu, mu, mu]), dt, source="b.dipole_members_0")
    with pytest.raises(ValueError, match=r"different numbers of dipole members \(a.dipole_members_0: 2, b"):
        md_committee_spectrum([a, b], TEMPERATURE, OPTIONS)
    c = DipoleMembersSeries(np.stack([mu, mu]), 2 * dt, source="c.dipole_members_0")
    with pytest.raises(ValueError, match=r"different frame intervals \(a.dipole_members_0: 1 fs, c.dipole_members_0: 2"):
        md_committee_spectrum([a, c], TEMPERATURE, OPTIONS)
    other = run_spectrum(mu, dt, TEMPERATURE, SpectrumOptions(depth_fs=200.0, discard_ps=0.05), source="deep")
    with pytest.raises(ValueError, match="different grids"):
        with_committee_band(other, committee_spectra(np.stack([mu, mu]), dt, TEMPERATURE, OPTIONS))
