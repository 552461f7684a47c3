"""MD IR spectra from dipole series: peak positions, absolute band areas, window/padding/discard options,
non-negativity of the default window."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ase import units

from spectra.autocorrelation import (
    NONNEGATIVE_WINDOWS,
    WINDOWS,
    SpectrumOptions,
    absorption_prefactor,
    autocorrelation,
    fft_length,
    md_ir_spectrum,
    quantum_correction_factor,
    run_spectrum,
    spectral_density,
    window_function,
)
from spectra.constants import KM_MOL_PER_D2_A2_AMU, KM_MOL_PER_E2_AMU, SPEED_OF_LIGHT_CM_PER_FS
from spectra.io import DipoleSeries

C = SPEED_OF_LIGHT_CM_PER_FS


def kt_fs(temperature):
    """k_B T in amu Å^2 / fs^2."""
    return units.kB * temperature * units.fs**2


def analytic_harmonic_dipoles(t_fs, wavenumber, dmu_dq, temperature, phase=0.3):
    """Dipole (e·Å) of one classical harmonic mode of energy k_B T: Q(t) = A cos(w t + phase), A^2 w^2 / 2 = kT.

    Q is the mass-weighted coordinate (Å sqrt(amu)), ``dmu_dq`` (3,) in e/sqrt(amu).
    """
    w = 2 * np.pi * C * wavenumber  # rad/fs
    amp = math.sqrt(2 * kt_fs(temperature)) / w
    q = amp * np.cos(w * t_fs + phase)
    return q[:, None] * np.asarray(dmu_dq)[None, :]


def langevin_oscillators(wavenumbers, gamma_per_fs, temperature, dt, n_steps, n_runs, seed):
    """Mass-weighted coordinates of independent damped (Langevin, BAOAB) harmonic oscillators.

    Returns (n_runs, n_steps, k): ``n_runs`` independent runs of k oscillators, started from Boltzmann samples.
    """
    rng = np.random.default_rng(seed)
    w2 = (2 * np.pi * C * np.asarray(wavenumbers)) ** 2
    kt = kt_fs(temperature)
    shape = (n_runs, len(w2))
    q = rng.normal(size=shape) * np.sqrt(kt / w2)
    v = rng.normal(size=shape) * np.sqrt(kt)
    c1 = math.exp(-gamma_per_fs * dt)
    c2 = math.sqrt((1 - c1**2) * kt)
    out = np.empty((n_steps,) + shape)
    for i in range(n_steps):
        v -= 0.5 * dt * w2 * q
        q += 0.5 * dt * v
        v = c1 * v + c2 * rng.normal(size=shape)
        q += 0.5 * dt * v
        v -= 0.5 * dt * w2 * q
        out[i] = q
    return out.transpose(1, 0, 2)


def test_unit_factor_is_ase_infrared_convention():
    # 1 (D/Å)^2/amu = 42.2561 km/mol (ASE's Infrared docs quote Porezag's rounded 42.255)
    assert KM_MOL_PER_D2_A2_AMU == pytest.approx(42.2561, abs=2e-4)
    assert KM_MOL_PER_E2_AMU == pytest.approx(42.2561 / units.Debye**2, rel=1e-5)


def test_autocorrelation_matches_direct_sum_not_circular():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    acf = autocorrelation(x, 50)
    direct = np.array([np.sum(x[: 300 - k] * x[k:]) / (300 - k) for k in range(50)])
    np.testing.assert_allclose(acf, direct, rtol=1e-10, atol=1e-12)
    biased = autocorrelation(x, 50, biased=True)
    np.testing.assert_allclose(biased, direct * (300 - np.arange(50)) / 300, rtol=1e-10, atol=1e-12)


def test_windows_are_one_at_lag_zero_and_parzen_is_the_cubic_b_spline():
    for name in WINDOWS:
        w = window_function(name, 64)
        assert w[0] == 1.0 and np.all(w >= 0) and np.all(np.diff(w) <= 1e-15)
    # Parzen = triangle convolved with itself (support 2 x 32 lags each side): its transform is sinc^4 >= 0
    tri = 1.0 - np.abs(np.arange(-32, 33)) / 32
    conv = np.convolve(tri, tri)
    conv /= conv.max()
    # the discrete self-convolution tends to the continuous cubic B-spline; they agree to O(1/32^2)
    np.testing.assert_allclose(window_function("parzen", 64), conv[64:128], atol=2e-3)


def test_spectral_density_integrates_to_lag_zero_for_any_window_and_padding():
    rng = np.random.default_rng(2)
    acf = autocorrelation(rng.normal(size=(4000, 3)), 400)
    for window in WINDOWS:
        for pad in (1, 4, 16):
            wn, s = spectral_density(acf, 0.5, window, pad)
            assert np.trapezoid(s, wn) == pytest.approx(acf[0], rel=1e-10)
            assert len(wn) == fft_length(400, pad) // 2 + 1
            assert wn[1] == pytest.approx(1.0 / (fft_length(400, pad) * 0.5 * C))


@pytest.mark.parametrize("window", ["parzen", "hann"])  # the default and the paper's processing
@pytest.mark.parametrize("temperature", [30.0, 300.0, 1000.0, 3000.0])
def test_classical_harmonic_band_equals_harmonic_intensity(temperature, window):
    """Eq. 6 normalisation: a harmonic mode at temperature T integrates to its harmonic intensity (km/mol)."""
    dmu_dq = np.array([0.31, -0.22, 0.12])  # e / sqrt(amu)
    intensity = float(dmu_dq @ dmu_dq) * KM_MOL_PER_E2_AMU  # km/mol, ~162
    nu = 1050.0
    t = np.arange(0.0, 30000.0, 0.5)
    mu = analytic_harmonic_dipoles(t, nu, dmu_dq, temperature)
    spec = run_spectrum(mu, 0.5, temperature, SpectrumOptions(window=window))
    assert spec.meta["window"] == window
    band = spec.integral(nu - 300, nu + 300)
    ratio = band / intensity
    # central differences damp the derivative by sin(x)/x: (sin x / x)^2 = 0.9967 at 1050 cm^-1, 0.5 fs
    x = 2 * np.pi * C * nu * 0.5
    assert ratio == pytest.approx((math.sin(x) / x) ** 2, abs=2e-3)
    assert abs(ratio - 1.0) < 0.02
    assert abs(spec.wavenumber[np.argmax(spec.intensity)] - nu) < spec.wavenumber[1]
    # nothing outside the band
    assert spec.integral(0, nu - 300) + spec.integral(nu + 300, np.inf) < 1e-3 * intensity
    assert spec.meta["temperature_K"] == temperature


def test_bartlett_keeps_the_total_area_but_leaks_beyond_the_band():
    dmu_dq = np.array([0.31, -0.22, 0.12])
    intensity = float(dmu_dq @ dmu_dq) * KM_MOL_PER_E2_AMU
    t = np.arange(0.0, 30000.0, 0.5)
    spec = run_spectrum(analytic_harmonic_dipoles(t, 1050.0, dmu_dq, 300.0), 0.5, 300.0,
                        SpectrumOptions(window="bartlett"))
    x = 2 * np.pi * C * 1050.0 * 0.5
    assert spec.integral() / intensity == pytest.approx((math.sin(x) / x) ** 2, abs=2e-3)
    # sinc^2 tails: 1 / (pi^2 c tau_max 300 cm^-1) = 0.55% of the band beyond 300 cm^-1 (documented)
    outside = 1 - spec.integral(750, 1350) / spec.integral()
    assert outside == pytest.approx(1 / (math.pi**2 * C * 2048.0 * 300.0), rel=0.15)
    assert spec.intensity.min() >= 0


def test_damped_oscillators_peak_at_their_wavenumbers_with_absolute_areas():
    """Langevin-damped oscillators (stationary, like MD bands): peaks within the resolution, areas = intensities."""
    nus = np.array([470.0, 1000.0, 1600.0])
    dmu = np.array([[0.20, 0.0, 0.05], [0.0, 0.30, 0.0], [0.10, 0.10, 0.25]])  # e/sqrt(amu), per mode
    intens = (dmu**2).sum(1) * KM_MOL_PER_E2_AMU
    temperature, dt = 400.0, 0.5
    q = langevin_oscillators(nus, 1.0 / 150.0, temperature, dt, 110000, 8, seed=0)  # 8 runs of 55 ps
    runs = [DipoleSeries(q[k] @ dmu, dt, source=f"run{k}") for k in range(8)]
    spec = md_ir_spectrum(runs, temperature, SpectrumOptions())  # 5 ps discarded, 2048 fs, Parzen
    resolution = 1.0 / (2 * 2048.0 * C)  # 8.1 cm^-1
    from spectra.compare import peak_positions

    found = peak_positions(spec.cropped(200, 2000), n=3)
    assert len(found) == 3
    np.testing.assert_allclose(found, nus, atol=resolution)
    assert spec.n_runs == 8 and np.all(spec.stderr >= 0) and spec.stderr.max() > 0
    assert spec.intensity.min() >= 0  # the default window: non-negative by construction
    # total area = sum of intensities (equipartition); each band within its statistical error (~3% per band
    # here, plus ~2% of Lorentzian tail crossing the band edges)
    total = spec.integral(0, np.inf)
    assert total == pytest.approx(intens.sum(), rel=0.06)
    edges = [0.0, 735.0, 1300.0, np.inf]
    for k in range(3):
        assert spec.integral(edges[k], edges[k + 1]) == pytest.approx(intens[k], rel=0.12)


@pytest.mark.parametrize("duration_fs, parzen_fwhm, bartlett_fwhm", [(20000.0, 2.584, 1.802), (200000.0, 2.5513, 1.7718)])
def test_window_options_behave_as_documented(duration_fs, parzen_fwhm, bartlett_fwhm):
    """FWHM in units of 1/(2 c tau_max) and the deepest point within 200 cm^-1 of a pure sinusoid's line.

    Hann: FWHM 2, side lobes within 2.7%; none: FWHM 1.21, side lobes -22%; Parzen 2.55 and Bartlett 1.77
    (the sinc^4 and sinc^2 half widths) and never below zero. The biased autocorrelation of the
    non-negative windows widens them by ~1.5% when the series is 10 x tau_max (20 ps), not when it is 100 x.
    """
    nu, dt = 1000.0, 0.5
    t = np.arange(0.0, duration_fs, dt)
    mu = np.column_stack([np.cos(2 * np.pi * C * nu * t), 0 * t, 0 * t])
    bin_width = 1.0 / (2 * 2048.0 * C)
    cases = (("hann", 2.0, -0.0268), ("none", 1.2067, -0.2172), ("parzen", parzen_fwhm, 0.0),
             ("bartlett", bartlett_fwhm, 0.0))
    for window, fwhm_bins, lobe in cases:
        s = run_spectrum(mu, dt, 300.0, SpectrumOptions(window=window, zero_padding=64, discard_ps=0))
        x, y = s.wavenumber, s.intensity
        k = int(np.argmax(y))
        half = y[k] / 2
        left = k - np.argmax(y[k::-1] < half)
        right = k + np.argmax(y[k:] < half)
        xl = np.interp(half, [y[left], y[left + 1]], [x[left], x[left + 1]])
        xr = np.interp(half, [y[right], y[right - 1]], [x[right], x[right - 1]])
        assert (xr - xl) / bin_width == pytest.approx(fwhm_bins, rel=0.005), window
        near = (x > nu - 200) & (x < nu + 200)
        assert y[near].min() / y[k] == pytest.approx(lobe, abs=0.005), window
        assert abs(x[k] - nu) < 0.1
        if window in NONNEGATIVE_WINDOWS:
            assert y.min() >= 0.0
            # the highest side lobe, outside the main lobe (first zero of sinc^4 at 4 bins, sinc^2 at 2)
            lobe_max = y[np.abs(x - nu) > (4 if window == "parzen" else 2) * bin_width].max() / y[k]
            assert lobe_max < (0.0033 if window == "parzen" else 0.049), window


def test_default_spectrum_is_non_negative_where_the_papers_is_not():
    """Damped (Langevin) oscillators, 12 ps: Hann and the sharp cut dip below zero, Parzen and Bartlett never.

    Same band area for every window (C(0): the window keeps lag 0 and both estimators agree there).
    """
    from spectra.autocorrelation import _lag_transform, dipole_derivative

    dmu = np.array([[0.20, 0.0, 0.05], [0.0, 0.30, 0.0], [0.10, 0.10, 0.25]])
    mu = langevin_oscillators([470.0, 1000.0, 1600.0], 1.0 / 150.0, 400.0, 0.5, 24000, 1, seed=3)[0] @ dmu
    opts = dict(discard_ps=1.0, depth_fs=2048.0)
    spectra = {w: run_spectrum(mu, 0.5, 400.0, SpectrumOptions(window=w, **opts)) for w in WINDOWS}
    for w in NONNEGATIVE_WINDOWS:
        assert spectra[w].intensity.min() >= 0.0, w
        assert spectra[w].meta["autocorrelation"] == "biased"
    assert spectra["hann"].intensity.min() < -1e-6 * spectra["hann"].intensity.max()
    assert spectra["none"].intensity.min() < 0
    for w in WINDOWS:
        assert spectra[w].integral() == pytest.approx(spectra["parzen"].integral(), rel=1e-10)
    # the clipping in spectral_density only trims rounding: unclipped, the biased transform is already >= 0
    # here, and the unbiased estimate keeps its (real) negatives even with the Parzen window
    d = dipole_derivative(mu[2000:], 0.5)
    _, raw = _lag_transform(autocorrelation(d, 4096, biased=True), 0.5, "parzen", 4)
    assert raw.min() >= -1e-12 * raw.max()
    _, unbiased = spectral_density(autocorrelation(d, 4096), 0.5, "parzen")
    assert unbiased.min() < -1e-6 * unbiased.max()


def test_rounding_residue_is_clipped_not_larger_negatives(monkeypatch):
    import spectra.autocorrelation as ac

    raw = np.array([2.0, -1e-13, -3e-12, 0.5])  # below -1e-12 of the peak (2.0): kept
    monkeypatch.setattr(ac, "_lag_transform", lambda *args: (np.arange(4.0), raw.copy()))
    np.testing.assert_array_equal(spectral_density(np.ones(4), 0.5, "parzen")[1], [2.0, 0.0, -3e-12, 0.5])
    np.testing.assert_array_equal(spectral_density(np.ones(4), 0.5, "hann")[1], raw)  # the paper's: untouched
    monkeypatch.undo()
    # a sequence that is not positive semidefinite: its negative transform survives (nothing hidden)
    wn, s = spectral_density(np.r_[1.0, -2.0, np.zeros(62)], 0.5, "parzen", 4)
    assert s.min() < -0.1 * s.max()


def test_zero_padding_refines_grid_without_changing_bands():
    t = np.arange(0.0, 15000.0, 0.5)
    mu = analytic_harmonic_dipoles(t, 800.0, [0.2, 0.1, 0.0], 300.0)
    areas, spacings = [], []
    for pad in (1, 4, 16):
        s = run_spectrum(mu, 0.5, 300.0, SpectrumOptions(zero_padding=pad, discard_ps=1.0))
        spacings.append(s.wavenumber[1])
        areas.append(s.integral(500, 1100))
        assert abs(s.wavenumber[np.argmax(s.intensity)] - 800.0) <= s.wavenumber[1]
    assert spacings[0] / spacings[1] == pytest.approx(4.0) and spacings[1] / spacings[2] == pytest.approx(4.0)
    # the paper's grid: 2048 fs at 0.5 fs with the default padding -> 2.036 cm^-1
    assert spacings[1] == pytest.approx(2.036, abs=1e-3)
    np.testing.assert_allclose(areas, areas[1], rtol=2e-3)


def test_equilibration_is_discarded():
    dt = 0.5
    t = np.arange(0.0, 20000.0, dt)
    clean = analytic_harmonic_dipoles(t, 900.0, [0.2, 0.0, 0.0], 300.0)
    dirty = clean.copy()
    early = t < 4000.0  # a violent transient at 1500 cm^-1 during the first 4 ps
    dirty[early, 1] += 5.0 * np.sin(2 * np.pi * C * 1500.0 * t[early])
    ref = run_spectrum(clean, dt, 300.0)  # default: 5 ps discarded
    got = run_spectrum(dirty, dt, 300.0)
    np.testing.assert_allclose(got.intensity, ref.intensity, atol=1e-9 * ref.intensity.max())
    kept = run_spectrum(dirty, dt, 300.0, SpectrumOptions(discard_ps=0.0))
    assert kept.integral(1400, 1600) > 10 * ref.integral(0, np.inf)


def test_too_short_series_is_a_clear_error():
    mu = np.zeros((12000, 3))  # 6 ps at 0.5 fs: 1 ps left after 5 ps, less than 2048 fs
    with pytest.raises(ValueError, match=r"run7.*fewer than the correlation depth of 4096 frames"):
        run_spectrum(mu, 0.5, 300.0, source="run7")
    with pytest.raises(ValueError, match="NaN"):
        bad = np.ones((30000, 3))
        bad[100, 2] = np.nan
        run_spectrum(bad, 0.5, 300.0)
    with pytest.raises(ValueError, match="different frame intervals"):
        md_ir_spectrum([DipoleSeries(np.zeros((20000, 3)), 0.5, "a"), DipoleSeries(np.zeros((20000, 3)), 1.0, "b")], 300)
    with pytest.raises(ValueError, match="window"):
        run_spectrum(np.zeros((20000, 3)), 0.5, 300.0, SpectrumOptions(window="blackman"))


def test_quantum_correction_factors():
    wn = np.array([0.0, 10.0, 1000.0])
    temperature = 300.0
    x = 1000.0 * units.invcm / (units.kB * temperature)  # 4.79
    np.testing.assert_allclose(quantum_correction_factor(wn, temperature, "harmonic"), 1.0)
    std = quantum_correction_factor(wn, temperature, "standard")
    sch = quantum_correction_factor(wn, temperature, "schofield")
    assert std[0] == 1.0 and sch[0] == 1.0
    assert std[1] == pytest.approx(1.0, abs=1e-3) and sch[1] == pytest.approx(1.0, abs=1e-3)
    assert std[2] == pytest.approx(2 * math.tanh(x / 2) / x)
    assert sch[2] == pytest.approx(2 * math.sinh(x / 2) / x)
    assert std[2] < 1.0 < sch[2]
    # applied to the spectrum as a factor per wavenumber
    t = np.arange(0.0, 12000.0, 0.5)
    mu = analytic_harmonic_dipoles(t, 1000.0, [0.2, 0.0, 0.0], temperature)
    plain = run_spectrum(mu, 0.5, temperature, SpectrumOptions(discard_ps=0))
    corr = run_spectrum(mu, 0.5, temperature, SpectrumOptions(discard_ps=0, quantum_correction="standard"))
    np.testing.assert_allclose(corr.intensity, plain.intensity * quantum_correction_factor(plain.wavenumber, temperature, "standard"))


def test_prefactor_scales_as_inverse_temperature():
    assert absorption_prefactor(100.0) / absorption_prefactor(400.0) == pytest.approx(4.0)
