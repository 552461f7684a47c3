"""MD IR spectra from dipole time series: autocorrelation of the dipole time derivative (paper Eq. 6).

Recipe (each step an option of :class:`SpectrumOptions`; the paper's values except the window):

1. discard the equilibration (``discard_ps`` = 5 ps);
2. dipole derivative by central differences, mu'(t_i) = (mu(t_{i+1}) - mu(t_{i-1})) / (2 dt);
3. autocorrelation C(tau) = <mu'(0) . mu'(tau)> (sum of the x, y, z components) by FFT (Wiener-Khinchin),
   zero-padded to at least twice the series length so it is not circular, for lags up to the correlation
   depth tau_max (``depth_fs`` = 2048 fs). Two estimators, chosen by the window (step 4):
   *biased*, sum_t mu'(t) . mu'(t + tau) / N, and *unbiased*, the same sum / (N - tau) (the average over
   the time origins at each lag, the paper's). The biased one is the autocorrelation of the finite series
   itself, so its transform is the periodogram |FT mu'|^2 / N >= 0; the unbiased one is not positive
   semidefinite (its far lags are averages over few origins and carry more weight), so no window can make
   its transform non-negative;
4. lag window w(tau), 1 at tau = 0 (so it keeps C(0) and the band areas). FWHM of the line of a pure
   sinusoid in units of the resolution 1 / (2 c tau_max) = 8.14 cm^-1 at 2048 fs:

   ``parzen`` (default), biased C:  w = 1 - 6u^2 + 6|u|^3 for |u| <= 1/2, 2(1 - |u|)^3 up to 1, u = tau/tau_max
       (a triangle convolved with itself; its transform is sinc^4 >= 0). FWHM 2.55 (20.8 cm^-1 at
       2048 fs), side lobes positive and below 0.23% of the peak, decaying as 1/distance^4.
   ``bartlett``, biased C:  w = 1 - |u| (transform sinc^2 = Fejer kernel >= 0). FWHM 1.77 (14.4 cm^-1),
       but positive side lobes up to 4.7% of the peak, decaying only as 1/distance^2: 0.5% of a band's
       area lies more than 300 cm^-1 away from it at 2048 fs.
   ``hann`` (the paper's processing), unbiased C:  w = cos^2(pi u / 2), the half of a Hann window centred
       at tau = 0. FWHM 2.00 (16.3 cm^-1), side lobes down to -2.7% of the peak: the spectrum dips below
       zero beside strong bands (and near 0 cm^-1).
   ``none``, unbiased C: the sharp cut at tau_max. FWHM 1.21 (9.8 cm^-1), side lobes down to -22%.

   These are the values for a series much longer than tau_max; the biased estimator multiplies C by
   (1 - tau/N), which widens ``parzen`` and ``bartlett`` by about 1.5% when N = 10 tau_max.

   Why the default is non-negative by construction: the spectrum of ``parzen`` and ``bartlett`` is the
   periodogram (>= 0) convolved with the window's transform (>= 0; sampling a window whose continuous
   transform is >= 0 keeps the discrete transform >= 0, Poisson summation), and the transform of step 5
   samples it exactly. Only floating-point rounding (about 1e-15 of the peak) can go below zero; values
   above -1e-12 of the peak are set to 0. For the paper's FWHM at a given depth, ``parzen`` needs
   tau_max x 1.28 (2600 fs for the 16.3 cm^-1 of 2048 fs with ``hann``);
5. the symmetric windowed C(tau) is zero-padded to the next power of two of at least
   ``zero_padding`` x 2 x (depth in steps) points before the transform (finer grid, same information:
   a spacing of 2.036 cm^-1 at 0.5 fs and 2048 fs with the default 4, the paper's grid);
6. absolute normalisation: with S(nu~) the one-sided spectral density of C over wavenumber
   (integral_0^inf S dnu~ = C(0) = <|mu'|^2>, for every window),

       A(nu~) = 42.2561 km/mol / ((D/Å)^2/amu) * S(nu~) / (k_B T)       [km/mol per cm^-1].

   Why: classical linear response gives the absorption of a mode as beta |mu'|^2 / ... ; for a harmonic mode
   with mass-weighted coordinate Q, <|mu'|^2> = |d mu/d Q|^2 <Q'^2> = |d mu/d Q|^2 k_B T (equipartition),
   so the band integrates to |d mu/d Q|^2 in (D/Å)^2/amu times 42.2561, the harmonic intensity in km/mol,
   at any temperature. (TRAVIS prints A(nu~) * T in K km/mol per cm^-1.) Central differences damp the
   derivative by sin(x)/x with x = 2 pi c nu~ dt (the exact transfer function of the difference), hence the
   spectrum by (sin x / x)^2: -0.3% in band area at 1000 cm^-1 and 0.5 fs, -4.7% at 4000 cm^-1; with a dipole
   every 2 fs already -4.4% at 1000 cm^-1 and -17% at 2000 cm^-1. ``correct_central_difference`` divides it
   out, (x / sin x)^2, exactly for any band up to half the Nyquist wavenumber (x = pi/2: 4170 cm^-1 at 2 fs;
   beyond it the factor is held at (pi/2)^2, as sin x falls to 0 at the Nyquist wavenumber), so a spectrum
   from dipoles every 2 fs equals the one from every 0.5 fs step. Off by default (the paper's processing).
7. optional quantum correction factor (``quantum_correction``), relative to this classical spectrum, with
   x = h c nu~ / (k_B T): ``harmonic`` 1 (the classical formula above already is the harmonic-QCF result:
   exact for a harmonic system), ``standard`` 2 tanh(x/2)/x, ``schofield`` 2 sinh(x/2)/x.

Two error bands, both in km/mol per cm^-1, answering different questions:

* ``stderr`` (runs, :func:`md_ir_spectrum`): the standard error (ddof=1) of the mean spectrum over
  independent runs. It is the *sampling noise of the MD*: finite trajectories, different initial
  conditions. It shrinks as 1/sqrt(runs) and says nothing about whether the potential is right.
* ``std_committee`` (committee, :func:`committee_spectra`, :func:`md_committee_spectrum`): the standard
  deviation (ddof=1) over the dipole committee members of the spectra of each member's dipole time series
  on the *same* trajectory (averaged over the runs member by member). It is the *model uncertainty of the
  dipole surface* on that trajectory: how much the intensities would change with another equally good
  dipole model. It is not the uncertainty of the trajectory itself (the energy committee's spread in the
  forces, hence in band positions and shapes, is not in it), and it does not shrink with more runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from ase import units

from .constants import FS_IN_ASE_TIME, KM_MOL_PER_E2_AMU, SPEED_OF_LIGHT_CM_PER_FS
from .io import DipoleMembersSeries, DipoleSeries
from .spectrum import Spectrum, trapezoid

WINDOWS = ("parzen", "bartlett", "hann", "none")
#: windows whose spectrum is >= 0 by construction (they use the biased autocorrelation, see step 3)
NONNEGATIVE_WINDOWS = ("parzen", "bartlett")
QUANTUM_CORRECTIONS = ("none", "harmonic", "standard", "schofield")

# Rounding of the FFT leaves |errors| of about eps * log2(m) * sum |C w| <~ 1e-15 of the peak on a
# spectrum that is >= 0 in exact arithmetic; anything above -this fraction of the peak is such rounding.
_ROUNDING_FRACTION = 1e-12


@dataclass
class SpectrumOptions:
    """Options of the MD spectrum: the paper's values, except the non-negative ``parzen`` window."""

    depth_fs: float = 2048.0         # maximum correlation depth
    discard_ps: float = 5.0          # equilibration discarded at the start of every run
    window: str = "parzen"           # 'parzen', 'bartlett', 'hann' (the paper's) or 'none'
    zero_padding: int = 4            # FFT length >= zero_padding * 2 * depth (in steps), power of two
    quantum_correction: str = "none"  # 'none', 'harmonic', 'standard', 'schofield'
    correct_central_difference: bool = False  # divide out the (sin x / x)^2 damping of step 2 (module docstring)

    def check(self) -> None:
        if not (self.depth_fs > 0 and math.isfinite(self.depth_fs)):
            raise ValueError(f"correlation depth must be positive, got {self.depth_fs} fs")
        if not (self.discard_ps >= 0 and math.isfinite(self.discard_ps)):
            raise ValueError(f"discarded time must be >= 0, got {self.discard_ps} ps")
        if self.window not in WINDOWS:
            raise ValueError(f"unknown window {self.window!r}; choose from {', '.join(WINDOWS)}")
        if int(self.zero_padding) != self.zero_padding or self.zero_padding < 1:
            raise ValueError(f"zero padding factor must be an integer >= 1, got {self.zero_padding}")
        if self.quantum_correction not in QUANTUM_CORRECTIONS:
            raise ValueError(
                f"unknown quantum correction {self.quantum_correction!r}; choose from {', '.join(QUANTUM_CORRECTIONS)}"
            )


def central_difference_correction(wavenumber: np.ndarray, dt_fs: float) -> np.ndarray:
    """(x / sin x)^2 with x = 2 pi c nu~ dt: the inverse of the damping of the spectrum by central differences
    (module docstring, step 6), held at its value at x = pi/2 (half the Nyquist wavenumber) above it."""
    x = np.minimum(2.0 * np.pi * SPEED_OF_LIGHT_CM_PER_FS * np.asarray(wavenumber, dtype=float) * dt_fs, np.pi / 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x > 1e-8, (x / np.sin(x)) ** 2, 1.0)


def dipole_derivative(dipoles: np.ndarray, dt_fs: float) -> np.ndarray:
    """Central differences: (n, 3) dipoles -> (n - 2, 3) derivatives at the interior frames (unit/fs)."""
    dipoles = np.asarray(dipoles, dtype=float)
    return (dipoles[2:] - dipoles[:-2]) / (2.0 * dt_fs)


def autocorrelation(signal: np.ndarray, n_lags: int, biased: bool = False) -> np.ndarray:
    """<x(0) . x(tau)> for tau = 0 .. n_lags-1 (steps), summed over columns.

    ``biased=False``: averaged over the time origins of each lag (sum / (n - tau)); ``biased=True``: sum / n,
    the autocorrelation of the finite series, whose transform is >= 0 (see the module docstring, step 3).
    FFT with zero padding to a power of two >= 2n, so the correlation is linear, not circular.
    """
    x = np.asarray(signal, dtype=float)
    if x.ndim == 1:
        x = x[:, None]
    n = len(x)
    if n_lags > n:
        raise ValueError(f"{n_lags} lags requested from a series of {n} points")
    nfft = 1 << int(math.ceil(math.log2(2 * n)))
    f = np.fft.rfft(x, n=nfft, axis=0)
    acf = np.fft.irfft((f * f.conj()).real.sum(axis=1), n=nfft)[:n_lags]
    return acf / n if biased else acf / (n - np.arange(n_lags))


def uses_biased_autocorrelation(window: str) -> bool:
    """The non-negative windows need the biased estimator; ``hann`` and ``none`` keep the paper's."""
    return window in NONNEGATIVE_WINDOWS


def window_function(name: str, n_lags: int) -> np.ndarray:
    """Weights of lags 0 .. n_lags-1 (1 at lag 0), u = lag / n_lags (see the module docstring, step 4)."""
    u = np.arange(n_lags) / n_lags
    if name == "none":
        return np.ones(n_lags)
    if name == "hann":
        return np.cos(0.5 * np.pi * u) ** 2
    if name == "bartlett":
        return 1.0 - u
    if name == "parzen":
        return np.where(u <= 0.5, 1.0 - 6.0 * u**2 + 6.0 * u**3, 2.0 * (1.0 - u) ** 3)
    raise ValueError(f"unknown window {name!r}; choose from {', '.join(WINDOWS)}")


def fft_length(n_lags: int, zero_padding: int) -> int:
    """Points of the transform: the next power of two >= zero_padding * 2 * n_lags."""
    return 1 << int(math.ceil(math.log2(max(2, int(zero_padding) * 2 * n_lags))))


def _lag_transform(acf: np.ndarray, dt_fs: float, window: str, zero_padding: int):
    """``(wavenumber cm^-1, S)``: the one-sided transform of the windowed, symmetrised ``acf``, unclipped."""
    n_lags = len(acf)
    c = np.asarray(acf, dtype=float) * window_function(window, n_lags)
    m = fft_length(n_lags, zero_padding)
    sym = np.zeros(m)
    sym[:n_lags] = c
    sym[m - n_lags + 1:] = c[1:][::-1]
    two_sided = np.fft.rfft(sym).real * dt_fs  # (acf unit) * fs, per 1/fs of frequency
    wavenumber = np.arange(len(two_sided)) / (m * dt_fs * SPEED_OF_LIGHT_CM_PER_FS)
    return wavenumber, 2.0 * two_sided * SPEED_OF_LIGHT_CM_PER_FS


def spectral_density(acf: np.ndarray, dt_fs: float, window: str = "parzen", zero_padding: int = 4):
    """One-sided spectral density over wavenumber of an autocorrelation sampled every ``dt_fs``.

    Returns ``(wavenumber cm^-1, S)`` on 0 .. Nyquist with S in (acf unit) per cm^-1, normalised so that the
    trapezoidal integral of S over the grid equals ``acf[0]`` (the window keeps lag 0; exact to rounding).
    With a window of :data:`NONNEGATIVE_WINDOWS` and a biased ``acf``, S >= 0: the rounding residue (above
    -1e-12 of the peak) is set to 0; larger negatives (an ``acf`` that is not positive semidefinite, such as
    the unbiased estimate) are kept, not hidden.
    """
    wavenumber, s = _lag_transform(acf, dt_fs, window, zero_padding)
    if window in NONNEGATIVE_WINDOWS and len(s):
        # exact arithmetic gives S >= 0 here; what rounding leaves below zero is noise, not absorption
        tiny = (s < 0) & (s >= -_ROUNDING_FRACTION * np.abs(s).max())
        s = np.where(tiny, 0.0, s)
    return wavenumber, s


def quantum_correction_factor(wavenumber: np.ndarray, temperature: float, kind: str) -> np.ndarray:
    """Factor multiplying the classical absorption A(nu~) (see module docstring); 1 at nu~ = 0."""
    wn = np.asarray(wavenumber, dtype=float)
    if kind in ("none", "harmonic"):
        return np.ones_like(wn)
    x = wn * units.invcm / (units.kB * temperature)
    safe = np.where(x > 0, x, 1.0)
    if kind == "standard":
        f = 2.0 * np.tanh(0.5 * safe) / safe
    elif kind == "schofield":
        # sinh overflows near x ~ 1400 (far above any IR band at a sane temperature); cap it
        f = 2.0 * np.sinh(np.minimum(0.5 * safe, 700.0)) / safe
    else:
        raise ValueError(f"unknown quantum correction {kind!r}; choose from {', '.join(QUANTUM_CORRECTIONS)}")
    return np.where(x > 0, f, 1.0)


def absorption_prefactor(temperature: float) -> float:
    """Turns S of mu' in (e·Å/fs)^2 per cm^-1 into A(nu~) in km/mol per cm^-1 at ``temperature`` (K)."""
    kt = units.kB * temperature  # eV = amu Å^2 / (ASE time)^2
    return KM_MOL_PER_E2_AMU / (FS_IN_ASE_TIME**2 * kt)


def run_spectrum(
    dipoles_eA: np.ndarray,
    frame_interval_fs: float,
    temperature: float,
    options: SpectrumOptions | None = None,
    source: str = "dipole series",
) -> Spectrum:
    """The absolute MD IR spectrum of one run: A(nu~) in km/mol per cm^-1 (see module docstring)."""
    options = options or SpectrumOptions()
    options.check()
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive, got {temperature} K")
    dip = np.asarray(dipoles_eA, dtype=float)
    if dip.ndim != 2 or dip.shape[1] != 3:
        raise ValueError(f"{source}: dipoles have shape {dip.shape}, expected (n_frames, 3)")
    if not np.all(np.isfinite(dip)):
        raise ValueError(f"{source}: NaN or inf in the dipoles (frame {int(np.argmax(~np.isfinite(dip).all(1)))})")
    dt = float(frame_interval_fs)
    n_discard = int(round(options.discard_ps * 1000.0 / dt))
    n_lags = int(round(options.depth_fs / dt))
    if n_lags < 2:
        raise ValueError(f"correlation depth {options.depth_fs} fs is shorter than two frames of {dt} fs")
    kept = len(dip) - n_discard
    if kept - 2 < n_lags:
        raise ValueError(
            f"{source}: {len(dip)} frames ({(len(dip) - 1) * dt / 1000:.3g} ps at {dt:g} fs); after discarding "
            f"{options.discard_ps:g} ps ({n_discard} frames) {max(kept, 0)} remain, fewer than the correlation "
            f"depth of {n_lags} frames ({options.depth_fs:g} fs) plus 2"
        )
    biased = uses_biased_autocorrelation(options.window)
    dmu = dipole_derivative(dip[n_discard:], dt)
    acf = autocorrelation(dmu, n_lags, biased=biased)
    wn, s = spectral_density(acf, dt, options.window, options.zero_padding)
    intensity = s * absorption_prefactor(temperature) * quantum_correction_factor(wn, temperature, options.quantum_correction)
    if options.correct_central_difference:
        intensity = intensity * central_difference_correction(wn, dt)
    meta = {
        "temperature_K": temperature, "frame_interval_fs": dt, "depth_fs": n_lags * dt, "discard_ps": options.discard_ps,
        "window": options.window, "autocorrelation": "biased" if biased else "unbiased",
        "zero_padding": options.zero_padding, "quantum_correction": options.quantum_correction,
        "central_difference_correction": bool(options.correct_central_difference), "source": source,
    }
    return Spectrum(wn, intensity, None, 1, meta)


def _check_same_grid(spectra: Sequence[Spectrum]) -> np.ndarray:
    grid = spectra[0].wavenumber
    for s in spectra[1:]:
        if s.wavenumber.shape != grid.shape or not np.allclose(s.wavenumber, grid):
            raise ValueError(
                f"spectra on different grids ({s.meta.get('source', '?')} vs {spectra[0].meta.get('source', '?')}): "
                "use the same time step, depth and zero padding for every run"
            )
    return grid


def mean_spectrum(spectra: Sequence[Spectrum]) -> Spectrum:
    """Mean over runs and its standard error (ddof=1, 0 for one run); all on the same grid."""
    if not spectra:
        raise ValueError("no spectra to average")
    grid = _check_same_grid(spectra)
    stack = np.stack([s.intensity for s in spectra])
    n = len(spectra)
    err = stack.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(grid)
    meta = dict(spectra[0].meta)
    meta["sources"] = [s.meta.get("source", "") for s in spectra]
    meta.pop("source", None)
    return Spectrum(grid, stack.mean(axis=0), err, n, meta)


def _check_frame_intervals(runs) -> None:
    dts = {round(r.frame_interval_fs, 9) for r in runs}
    if len(dts) > 1:
        detail = ", ".join(f"{r.source}: {r.frame_interval_fs:g} fs" for r in runs)
        raise ValueError(f"runs have different frame intervals ({detail})")


def md_ir_spectrum(
    runs: Sequence[DipoleSeries],
    temperature: float,
    options: SpectrumOptions | None = None,
    progress=None,
) -> Spectrum:
    """Mean absolute IR spectrum (km/mol per cm^-1) and standard error over independent runs.

    ``progress``: optional callable receiving one line per run.
    """
    if not runs:
        raise ValueError("no dipole series given")
    _check_frame_intervals(runs)
    spectra = []
    for k, run in enumerate(runs, 1):
        spectra.append(run_spectrum(run.dipoles, run.frame_interval_fs, temperature, options, source=run.source))
        if progress is not None:
            progress(f"run {k}/{len(runs)}: {run.source}: {run.n_frames} frames, "
                     f"band area {spectra[-1].integral():.4g} km/mol")
    return mean_spectrum(spectra)


# ------------------------------------------------------------------------------------------ committee band
@dataclass
class CommitteeSpectrum:
    """Spectra of the dipole committee members on the same trajectory (or the same runs).

    ``members`` (n_members, n_wavenumbers): A(nu~) of each member's dipole series in km/mol per cm^-1 (for
    several runs: each member's mean over the runs). ``mean`` and ``std`` (ddof=1) are over the members:
    ``std`` is the model uncertainty of the dipole surface on these trajectories (module docstring).
    A spectrum is quadratic in the dipoles, so ``mean`` = the spectrum of the committee-mean dipole + the
    members' mean spectrum of their deviations from it: ``mean`` lies above the former (for the
    non-negative windows), by an amount that grows with the spread.
    """

    wavenumber: np.ndarray
    members: np.ndarray
    n_runs: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def n_members(self) -> int:
        return int(self.members.shape[0])

    @property
    def mean(self) -> np.ndarray:
        return self.members.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        # shifted by member 0 (same std): identical members give exactly 0, not the rounding of their mean
        return (self.members - self.members[0]).std(axis=0, ddof=1)

    def as_spectrum(self) -> Spectrum:
        """The members' mean spectrum with the committee std as its ``std_committee`` band (stderr 0)."""
        return Spectrum(self.wavenumber, self.mean, None, self.n_runs, dict(self.meta), std_committee=self.std)


def _member_array(member_dipoles_eA, source: str) -> np.ndarray:
    dip = np.asarray(member_dipoles_eA, dtype=float)
    if dip.ndim != 3 or dip.shape[2] != 3:
        raise ValueError(f"{source}: member dipoles have shape {dip.shape}, expected (n_members, n_frames, 3)")
    if dip.shape[0] < 2:
        raise ValueError(f"{source}: {dip.shape[0]} dipole member(s); a committee std needs at least 2")
    return dip


def committee_spectra(
    member_dipoles_eA: np.ndarray,
    frame_interval_fs: float,
    temperature: float,
    options: SpectrumOptions | None = None,
    source: str = "dipole members",
) -> CommitteeSpectrum:
    """The spectrum of each dipole member's series (n_members, n_frames, 3) in e·Å on one trajectory.

    Every member goes through :func:`run_spectrum` with the same options, so the members, their mean and
    their std are in km/mol per cm^-1 on the grid of the run's spectrum.
    """
    dip = _member_array(member_dipoles_eA, source)
    spectra = [run_spectrum(d, frame_interval_fs, temperature, options, source=f"{source} member {k}")
               for k, d in enumerate(dip)]
    meta = dict(spectra[0].meta, source=source, n_members=len(spectra))
    return CommitteeSpectrum(spectra[0].wavenumber, np.stack([s.intensity for s in spectra]), 1, meta)


def md_committee_spectrum(
    runs: Sequence[DipoleMembersSeries],
    temperature: float,
    options: SpectrumOptions | None = None,
    progress=None,
) -> CommitteeSpectrum:
    """Committee spectra over independent runs: member k's spectrum is its mean over the runs.

    The std over members of these run means is the committee band of the run-averaged spectrum; all runs
    need the same members (count), frame interval and grid.
    """
    if not runs:
        raise ValueError("no dipole member series given")
    _check_frame_intervals(runs)
    counts = {r.n_members for r in runs}
    if len(counts) > 1:
        detail = ", ".join(f"{r.source}: {r.n_members}" for r in runs)
        raise ValueError(f"runs have different numbers of dipole members ({detail})")
    per_run = []
    for k, run in enumerate(runs, 1):
        per_run.append(committee_spectra(run.dipoles, run.frame_interval_fs, temperature, options, run.source))
        if progress is not None:
            areas = member_band_areas(per_run[-1])
            progress(f"committee {k}/{len(runs)}: {run.source}: {run.n_members} members, band area "
                     f"{areas.mean():.4g} +- {areas.std(ddof=1):.2g} km/mol (std over members)")
    _check_same_grid([Spectrum(c.wavenumber, c.mean, meta=c.meta) for c in per_run])
    members = np.mean([c.members for c in per_run], axis=0)
    meta = dict(per_run[0].meta, sources=[r.source for r in runs])
    meta.pop("source", None)
    return CommitteeSpectrum(per_run[0].wavenumber, members, len(runs), meta)


def member_band_areas(committee: CommitteeSpectrum, lo: float = -np.inf, hi: float = np.inf) -> np.ndarray:
    """Each member's band area in [lo, hi] cm^-1 (km/mol, trapezoidal): the committee's spread in numbers."""
    m = (committee.wavenumber >= lo) & (committee.wavenumber <= hi)
    return trapezoid(committee.members[:, m], committee.wavenumber[m], axis=1)


def with_committee_band(spectrum: Spectrum, committee: CommitteeSpectrum) -> Spectrum:
    """``spectrum`` (e.g. of the committee-mean dipole, with its runs' stderr) carrying the committee std."""
    _check_same_grid([spectrum, Spectrum(committee.wavenumber, committee.mean, meta=committee.meta)])
    meta = dict(spectrum.meta, n_dipole_members=committee.n_members)
    return Spectrum(spectrum.wavenumber, spectrum.intensity, spectrum.stderr, spectrum.n_runs, meta,
                    std_committee=committee.std)
