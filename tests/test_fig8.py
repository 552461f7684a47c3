"""Fig. 8 against the paper: band positions and widths of summed spectra, on the paper's own arrays."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import shared_file
from spectra.fig8 import (
    BANDS_UM,
    CSV_COLUMNS,
    band_features,
    compare_fig8,
    fig8_against_paper,
    paper_fig8_path,
    read_paper_fig8,
    write_fig8,
)
from spectra.spectrum import Spectrum, read_spectrum, write_spectrum_csv

CASES = [(c, t) for c in ("pyroxene", "olivine") for t in (100, 400, 800)]


def paper(composition, temperature, sizes=None) -> Spectrum:
    return read_paper_fig8(shared_file("paper_ir", f"{composition}_ml_md_{temperature}K.npy"), sizes)


@pytest.mark.parametrize("composition,temperature", CASES)
def test_paper_against_itself_has_zero_shift(composition, temperature):
    p = paper(composition, temperature)
    r = compare_fig8(p, p)
    assert [b["band"] for b in r["bands"]] == list(BANDS_UM)
    for b in r["bands"]:
        assert b["shift_cm-1"] == 0.0 and b["shift_um"] == 0.0 and b["fwhm_difference_um"] == 0.0
        lo, hi = b["window_um"]
        assert lo <= b["paper_peak_um"] <= hi
        assert b["paper_peak_um"] == pytest.approx(1e4 / b["paper_peak_cm-1"])
        assert b["cosine_in_window"] == pytest.approx(1.0)
    assert r["shape"]["cosine_similarity"] == pytest.approx(1.0)
    # each spectrum is normalised to its own maximum in 5-40 µm: the strongest band is there at height 1 here
    assert max(b["paper_height"] for b in r["bands"]) == pytest.approx(1.0)


@pytest.mark.parametrize("composition,temperature", CASES)
@pytest.mark.parametrize("shift", [12.0, -7.25])
def test_shifted_copy_gives_back_the_shift(composition, temperature, shift):
    p = paper(composition, temperature)
    moved = Spectrum(p.wavenumber + shift, 3.7 * p.intensity)  # another scale too: arbitrary units
    r = compare_fig8(moved, p)
    for b in r["bands"]:
        assert b["shift_cm-1"] == pytest.approx(shift, abs=1e-9)
        assert b["ours_peak_um"] == pytest.approx(1e4 / (b["paper_peak_cm-1"] + shift))
        assert b["ours_fwhm_cm-1"] == pytest.approx(b["paper_fwhm_cm-1"], abs=1e-6, nan_ok=True)
        assert b["ours_height"] == pytest.approx(b["paper_height"])


@pytest.mark.parametrize("composition,temperature", CASES)
def test_shift_on_the_same_grid_is_found_within_one_spacing(composition, temperature):
    p = paper(composition, temperature)
    step = float(np.median(np.diff(p.wavenumber)))
    shift = 10.5 * step
    moved = Spectrum(p.wavenumber, np.interp(p.wavenumber - shift, p.wavenumber, p.intensity))
    for b in compare_fig8(moved, p)["bands"]:
        assert abs(b["shift_cm-1"] - shift) <= step + 1e-9


def test_sizes_select_the_paper_columns():
    path = shared_file("paper_ir", "pyroxene_ml_md_400K.npy")
    data = np.load(path)
    one = read_paper_fig8(path, [3])
    np.testing.assert_allclose(one.intensity, data[:, 3])
    two = read_paper_fig8(path, [1, 2])
    np.testing.assert_allclose(two.intensity, data[:, 1] + data[:, 2])
    with pytest.raises(ValueError, match="not among the paper's N = 1..10"):
        read_paper_fig8(path, [11])


def test_synthetic_bands_positions_widths_and_areas():
    wn = np.arange(100.0, 4000.0, 0.5)

    def gaussian(centre, fwhm, area):
        s = fwhm / (2 * math.sqrt(2 * math.log(2)))
        return area * np.exp(-0.5 * ((wn - centre) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    ours = Spectrum(wn, gaussian(1040.0, 40.0, 300.0) + gaussian(560.0, 30.0, 60.0))  # km/mol per cm^-1
    f = {b.band: b for b in band_features(ours)}
    assert f["9.7um"].peak_cm == pytest.approx(1040.0, abs=0.25)
    assert f["9.7um"].fwhm_cm == pytest.approx(40.0, abs=0.1)
    assert f["9.7um"].fwhm_um == pytest.approx(1e4 / f["9.7um"].half_lo_cm - 1e4 / f["9.7um"].half_hi_cm)
    assert f["9.7um"].height == pytest.approx(1.0)
    assert f["18um"].peak_um == pytest.approx(1e4 / 560.0, abs=0.01)
    assert f["18um"].fwhm_cm == pytest.approx(30.0, abs=0.1)
    r = compare_fig8(ours, ours)
    areas = {b["band"]: b["ours_area_km_mol"] for b in r["bands"]}
    assert areas["9.7um"] == pytest.approx(300.0, rel=1e-3)   # our absolute units: km/mol
    assert areas["18um"] == pytest.approx(60.0, rel=1e-3)
    assert r["ours_area_km_mol"]["total"] == pytest.approx(360.0, rel=1e-3)
    # a band sitting on a continuum above its half height has no FWHM: NaN, not a made-up number
    flat = Spectrum(wn, gaussian(1040.0, 40.0, 300.0) + 2.5)
    assert math.isnan({b.band: b for b in band_features(flat)}["18um"].fwhm_um)


def test_smoothing_widens_a_spiky_band():
    p = paper("pyroxene", 100)
    raw = {b.band: b for b in band_features(p)}
    smooth = {b.band: b for b in band_features(p, smooth_fwhm_cm=20.0)}
    assert smooth["9.7um"].fwhm_um > raw["9.7um"].fwhm_um


def test_files_and_the_campaign_entry_point(tmp_path):
    p = paper("olivine", 800)
    ours_csv = tmp_path / "olivine_800K_sum.csv"   # what the campaign writes: wavenumber from 0, km/mol per cm^-1
    grid = np.arange(0.0, 4000.0, 2.0)
    write_spectrum_csv(ours_csv, p.on_grid(grid))
    ours = read_spectrum(ours_csv)
    result = fig8_against_paper(ours, "olivine", 800, tmp_path / "fig8_olivine_800K",
                                paper_dir=shared_file("paper_ir"))
    assert result is not None and result["temperature_K"] == 800.0
    for key in ("csv", "json", "png"):
        assert (tmp_path / f"fig8_olivine_800K.{key}").stat().st_size > 0
    with open(tmp_path / "fig8_olivine_800K.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["band"] for r in rows] == list(BANDS_UM)
    for r in rows:  # the same spectrum on a coarser grid: within a grid spacing
        assert abs(float(r["shift_cm-1"])) <= 2.0
    data = json.loads((tmp_path / "fig8_olivine_800K.json").read_text())
    assert data["paper"]["units"].startswith("arbitrary") and data["paper"]["sizes"] == list(range(1, 11))
    assert fig8_against_paper(ours, "olivine", 300, paper_dir=shared_file("paper_ir")) is None
    assert fig8_against_paper(ours, "quartz", 800, paper_dir=shared_file("paper_ir")) is None
    assert paper_fig8_path("olivine", 800, tmp_path) is None


def test_write_fig8_without_shared_data(tmp_path):
    wn = np.arange(1.0, 4000.0, 1.0)
    s = Spectrum(wn, np.exp(-0.5 * ((wn - 1050) / 15) ** 2) + 0.4 * np.exp(-0.5 * ((wn - 540) / 20) ** 2))
    r = compare_fig8(s, s)
    paths = write_fig8(tmp_path / "x", r, s, s)
    assert set(paths) == {"csv", "json", "png"}
    assert json.loads((tmp_path / "x.json").read_text())["bands"][0]["shift_cm-1"] == 0.0
