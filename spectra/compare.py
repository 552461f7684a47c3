"""Comparisons: two harmonic sets (frequency MAE/RMSE, intensity MAE) and two spectra (MAE/RMSE on a grid).

Harmonic sets are compared mode by mode after sorting by frequency, with the six zero modes
(translations, rotations) left out of any set that contains them: a set of 3N modes (``n_atoms`` given),
or, without ``n_atoms``, the longer of two sets whose lengths differ by 6.
"""
from __future__ import annotations

import numpy as np

from .harmonic import HarmonicIR
from .spectrum import Spectrum

N_ZERO_MODES = 6


def drop_zero_modes(h: HarmonicIR, n_zero: int = N_ZERO_MODES) -> HarmonicIR:
    """Remove the ``n_zero`` modes of smallest |frequency|; the rest sorted by frequency."""
    order = np.argsort(np.abs(h.frequencies), kind="stable")[n_zero:]
    order = order[np.argsort(h.frequencies[order], kind="stable")]
    return HarmonicIR(h.frequencies[order], h.intensities[order], None, h.method)


def _vibrational(a: HarmonicIR, b: HarmonicIR, n_atoms: int | None):
    def sort(h):
        o = np.argsort(h.frequencies, kind="stable")
        return HarmonicIR(h.frequencies[o], h.intensities[o], None, h.method)

    if n_atoms is not None:
        full = 3 * n_atoms
        out = []
        for name, h in (("first", a), ("second", b)):
            if len(h.frequencies) == full:
                out.append(drop_zero_modes(h))
            elif len(h.frequencies) == full - N_ZERO_MODES:
                out.append(sort(h))
            else:
                raise ValueError(
                    f"{name} set has {len(h.frequencies)} modes; {n_atoms} atoms give {full} or {full - N_ZERO_MODES}"
                )
        return out
    na, nb = len(a.frequencies), len(b.frequencies)
    if na == nb:
        return [sort(a), sort(b)]
    if na - nb == N_ZERO_MODES:
        return [drop_zero_modes(a), sort(b)]
    if nb - na == N_ZERO_MODES:
        return [sort(a), drop_zero_modes(b)]
    raise ValueError(f"harmonic sets of {na} and {nb} modes cannot be matched (give the number of atoms)")


def compare_harmonic(a: HarmonicIR, b: HarmonicIR, n_atoms: int | None = None) -> dict:
    """Frequency MAE/RMSE/max (cm^-1) and intensity MAE/RMSE (km/mol) of b against a, modes sorted."""
    va, vb = _vibrational(a, b, n_atoms)
    df = vb.frequencies - va.frequencies
    di = vb.intensities - va.intensities
    return {
        "n_modes": int(len(df)),
        "frequency_mae_cm-1": float(np.mean(np.abs(df))),
        "frequency_rmse_cm-1": float(np.sqrt(np.mean(df**2))),
        "frequency_max_abs_cm-1": float(np.max(np.abs(df))),
        "intensity_mae_km_mol": float(np.mean(np.abs(di))),
        "intensity_rmse_km_mol": float(np.sqrt(np.mean(di**2))),
    }


def normalized(spectrum: Spectrum, how: str, lo: float = 0.0, hi: float = np.inf) -> Spectrum:
    """``none``, ``max`` (peak 1 in [lo, hi]) or ``area`` (integral 1 over [lo, hi])."""
    if how == "none":
        return spectrum
    c = spectrum.cropped(lo, hi)
    if how == "max":
        scale = float(np.max(np.abs(c.intensity))) if len(c.intensity) else 0.0
    elif how == "area":
        scale = abs(c.integral())
    else:
        raise ValueError(f"unknown normalization {how!r}; choose from none, max, area")
    if scale == 0:
        raise ValueError(f"spectrum {spectrum.meta.get('source', '')} is zero in {lo:g}-{hi:g} cm^-1: cannot normalise")
    return Spectrum(spectrum.wavenumber, spectrum.intensity / scale, spectrum.stderr / scale, spectrum.n_runs,
                    dict(spectrum.meta))


def peak_positions(spectrum: Spectrum, n: int = 5, min_prominence: float = 0.05) -> np.ndarray:
    """Wavenumbers of the ``n`` most prominent peaks (prominence >= ``min_prominence`` x maximum), ascending."""
    from scipy.signal import find_peaks

    y = spectrum.intensity
    if len(y) < 3 or np.max(y) <= 0:
        return np.array([])
    idx, props = find_peaks(y, prominence=min_prominence * np.max(y))
    best = idx[np.argsort(props["prominences"])[::-1][:n]]
    return np.sort(spectrum.wavenumber[best])


def compare_spectra(
    a: Spectrum, b: Spectrum, lo: float = 0.0, hi: float = 4000.0, normalize: str = "none"
) -> dict:
    """MAE/RMSE of b against a on a's grid within [lo, hi] (b interpolated), cosine similarity, main peaks.

    ``normalize`` (``none``, ``max``, ``area``) is applied to both within [lo, hi] first: use ``max`` or
    ``area`` for spectra in arbitrary units (e.g. the paper's MD spectra).
    """
    if lo >= hi:
        raise ValueError(f"empty range {lo:g}-{hi:g} cm^-1")
    lo = max(lo, a.wavenumber[0], b.wavenumber[0])
    hi = min(hi, a.wavenumber[-1], b.wavenumber[-1])
    if lo >= hi:
        raise ValueError("the two spectra do not overlap in the requested range")
    a = normalized(a, normalize, lo, hi).cropped(lo, hi)
    b = normalized(b, normalize, lo, hi).on_grid(a.wavenumber)
    d = b.intensity - a.intensity
    na, nb = np.linalg.norm(a.intensity), np.linalg.norm(b.intensity)
    cosine = float(a.intensity @ b.intensity / (na * nb)) if na > 0 and nb > 0 else float("nan")
    return {
        "range_cm-1": [float(lo), float(hi)],
        "normalize": normalize,
        "n_points": int(len(d)),
        "mae": float(np.mean(np.abs(d))),
        "rmse": float(np.sqrt(np.mean(d**2))),
        "cosine_similarity": cosine,
        "max_peak_a_cm-1": float(a.wavenumber[np.argmax(a.intensity)]),
        "max_peak_b_cm-1": float(b.wavenumber[np.argmax(b.intensity)]),
        "area_a": a.integral(),
        "area_b": b.integral(),
    }


def read_comparable(path, kind: str = "auto"):
    """A :class:`Spectrum` or a :class:`HarmonicIR` from ``path``.

    ``kind``: ``spectrum``, ``harmonic`` or ``auto``: the project's CSV and ``.npy`` files are spectra; a
    text table of 2 columns whose first column is not evenly spaced is a harmonic set (frequency,
    intensity), any other table a spectrum.
    """
    from pathlib import Path

    from .harmonic import read_harmonic
    from .spectrum import read_spectrum

    if kind not in ("auto", "spectrum", "harmonic"):
        raise ValueError(f"unknown kind {kind!r}; choose auto, spectrum or harmonic")
    path = Path(path)
    if kind == "harmonic":
        return read_harmonic(path)
    if kind == "spectrum" or path.suffix in (".csv", ".npy"):
        return read_spectrum(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    rows = []
    with open(path, "r", errors="replace") as fh:
        for line in fh:
            s = line.split("#", 1)[0].split()
            if s:
                rows.append(s)
    if not rows:
        raise ValueError(f"{path}: empty file")
    if len(rows[0]) == 2:
        try:
            x = np.array([float(r[0]) for r in rows])
        except ValueError:
            x = None
        if x is not None and len(x) >= 2:
            d = np.diff(x)
            if len(x) < 3 or not np.allclose(d, d[0], rtol=1e-3, atol=1e-6):
                return read_harmonic(path)
    return read_spectrum(path)
