"""Sums for astronomers: wavelength axis, size weights, cross-sections and mass absorption coefficients."""
from __future__ import annotations

import numpy as np
import pytest
from ase import units

from spectra.broadening import broaden
from spectra.spectrum import Spectrum, wavelength_um
from spectra.sums import (
    SILICATE_BANDS_UM,
    TABLE_COLUMNS,
    absorption_table,
    cross_section_cm2,
    formula_mass_amu,
    kappa_cm2_g,
    size_weights,
    wavenumber_cm,
    weighted_sum,
    write_absorption_table,
)


def test_wavelength_axis_and_silicate_bands():
    assert wavelength_um(np.array([1000.0]))[0] == pytest.approx(10.0)
    assert np.isinf(wavelength_um(np.array([0.0]))[0])
    assert SILICATE_BANDS_UM == (9.7, 18.0)
    assert wavenumber_cm(9.7) == pytest.approx(1030.93, abs=0.01)  # Si-O stretch
    assert wavenumber_cm(18.0) == pytest.approx(555.56, abs=0.01)  # O-Si-O bend


def test_formula_masses():
    assert formula_mass_amu("MgSiO3") == pytest.approx(24.305 + 28.085 + 3 * 15.999, abs=0.01)
    assert formula_mass_amu("Mg2SiO4") == pytest.approx(2 * 24.305 + 28.085 + 4 * 15.999, abs=0.01)
    with pytest.raises(ValueError, match="not a chemical formula"):
        formula_mass_amu("Xx2")


def test_size_weights():
    np.testing.assert_allclose(size_weights("equal", 4), 0.25)
    np.testing.assert_allclose(size_weights("number", 3, [1.0, 1.0, 2.0]), [0.25, 0.25, 0.5])
    # equal mass fractions of clusters of mass 100 and 300 amu: three times as many small ones
    np.testing.assert_allclose(size_weights("mass", 2, [0.5, 0.5], [100.0, 300.0]), [0.75, 0.25])
    with pytest.raises(ValueError, match="need a size distribution"):
        size_weights("number", 3)
    with pytest.raises(ValueError, match="3 values for 2 spectra"):
        size_weights("number", 2, [1, 2, 3])
    with pytest.raises(ValueError, match="unknown weights"):
        size_weights("volume", 2)


def test_cross_section_and_kappa_units():
    # 1 km/mol per cm^-1 = 1e5 cm^2/mol -> per cluster 1e5 / N_A cm^2
    assert cross_section_cm2(1.0) == pytest.approx(1e5 / units._Nav)
    # kappa = sigma / m: 1 km/mol per cm^-1 for a 100 g/mol cluster = 1e5/100 cm^2/g
    assert kappa_cm2_g(1.0, 100.0) == pytest.approx(1000.0, rel=1e-9)
    # a band of I km/mol: integrated cross-section I * 1e5 / N_A (cm), whatever the broadening
    grid = np.linspace(0, 2000, 8001)
    band = broaden([1050.0], [300.0], grid, fwhm=25.0, normalization="area")
    assert np.trapezoid(cross_section_cm2(band.intensity), grid) == pytest.approx(300.0 * 1e5 / units._Nav, rel=1e-4)


def test_weighted_sum_and_table(tmp_path):
    grid = np.linspace(0, 2000, 1001)
    p1 = broaden([1000.0], [100.0], grid, fwhm=20, normalization="area")
    p2 = Spectrum(grid, broaden([600.0], [50.0], grid, fwhm=20, normalization="area").intensity,
                  np.full_like(grid, 0.01))
    fine = np.linspace(0, 2000, 4001)  # another grid: interpolated onto the first
    p3 = broaden([1100.0], [80.0], fine, fwhm=20, normalization="area")
    w = size_weights("equal", 3)
    total = weighted_sum([p1, p2, p3], w)
    assert total.integral() == pytest.approx((100 + 50 + 80) / 3, rel=1e-3)
    np.testing.assert_allclose(total.stderr, 0.01 / 3)
    masses = [100.39, 200.78, 301.17]
    mean_mass = float(np.dot(w, masses))
    table = absorption_table(total, mean_mass)
    assert table.shape[1] == len(TABLE_COLUMNS) and table[0, 0] > 0  # wavenumber 0 (infinite wavelength) left out
    np.testing.assert_allclose(table[:, 1], 1e4 / table[:, 0])
    np.testing.assert_allclose(table[:, 5], table[:, 4] / (mean_mass * units._amu * 1e3))
    write_absorption_table(tmp_path / "sum.txt", total, mean_mass, header="test sum")
    text = (tmp_path / "sum.txt").read_text().splitlines()
    assert text[0] == "# test sum" and text[2] == "# " + " ".join(TABLE_COLUMNS)
    back = np.loadtxt(tmp_path / "sum.txt")
    np.testing.assert_allclose(back, table, rtol=1e-7)
