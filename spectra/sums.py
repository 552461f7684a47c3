"""Sums for astronomers: spectra over cluster sizes (and temperatures), wavelength axis, kappa, cross-sections.

Weights are number fractions f_N of clusters of each size (they sum to 1):

* ``equal``: f_N = 1 / (number of sizes), the paper's Fig. 8;
* ``number``: f_N proportional to the given size distribution read as numbers of clusters;
* ``mass``: the given distribution is read as mass fractions, f_N proportional to w_N / M_N.

The summed spectrum A(nu~) = sum_N f_N A_N(nu~) is per average cluster, in km/mol per cm^-1. From it:

* cross-section per cluster sigma(nu~) = A(nu~) * 1e5 / N_A in cm^2 (1 km/mol per cm^-1 = 1e5 cm^2/mol;
  natural-log convention, as the km/mol intensities);
* mass absorption coefficient kappa(nu~) = sigma(nu~) / <m> in cm^2/g, with <m> = sum_N f_N M_N the mean
  cluster mass in g.

Silicate bands to mark: 9.7 µm (Si-O stretching) and 18 µm (O-Si-O bending).
"""
from __future__ import annotations

import io as _io
import os
from typing import Sequence

import numpy as np

from .constants import AMU_IN_G, AVOGADRO
from .atomic import write_text
from .spectrum import Spectrum, wavelength_um

SILICATE_BANDS_UM = (9.7, 18.0)
WEIGHTS = ("equal", "number", "mass")
TABLE_COLUMNS = (
    "wavenumber_cm-1", "wavelength_um", "intensity_km_mol_per_cm-1", "stderr_km_mol_per_cm-1",
    "cross_section_cm2", "kappa_cm2_g",
)


def wavenumber_cm(wavelength_in_um: np.ndarray) -> np.ndarray:
    """Wavenumber in cm^-1 of a wavelength in µm."""
    return 1.0e4 / np.asarray(wavelength_in_um, dtype=float)


def formula_mass_amu(formula: str) -> float:
    """Mass in amu of a chemical formula (ASE's atomic masses), e.g. ``MgSiO3`` 100.39."""
    from ase.data import atomic_masses, atomic_numbers
    from ase.formula import Formula

    try:
        counts = Formula(formula).count()
    except Exception:
        raise ValueError(f"not a chemical formula: {formula!r}") from None
    unknown = [s for s in counts if s not in atomic_numbers]
    if unknown or not counts:
        raise ValueError(f"not a chemical formula: {formula!r}")
    return float(sum(atomic_masses[atomic_numbers[s]] * n for s, n in counts.items()))


def size_weights(
    kind: str,
    n_sizes: int,
    distribution: Sequence[float] | None = None,
    masses_amu: Sequence[float] | None = None,
) -> np.ndarray:
    """Number fractions f_N (sum 1) for ``kind`` in ``equal``, ``number``, ``mass`` (see module docstring)."""
    if kind not in WEIGHTS:
        raise ValueError(f"unknown weights {kind!r}; choose from {', '.join(WEIGHTS)}")
    if n_sizes < 1:
        raise ValueError("no spectra to sum")
    if kind == "equal":
        return np.full(n_sizes, 1.0 / n_sizes)
    if distribution is None:
        raise ValueError(f"weights {kind!r} need a size distribution (one value per spectrum)")
    w = np.asarray(distribution, dtype=float)
    if w.shape != (n_sizes,):
        raise ValueError(f"size distribution has {w.size} values for {n_sizes} spectra")
    if np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("size distribution values must be finite, >= 0 and not all zero")
    if kind == "mass":
        if masses_amu is None:
            raise ValueError("mass weights need the cluster masses")
        m = np.asarray(masses_amu, dtype=float)
        if m.shape != (n_sizes,) or np.any(m <= 0):
            raise ValueError(f"need {n_sizes} positive cluster masses, got {m.tolist()}")
        w = w / m
    return w / w.sum()


def weighted_sum(spectra: Sequence[Spectrum], weights: np.ndarray) -> Spectrum:
    """sum_k w_k A_k on the first spectrum's grid (others interpolated); stderr sqrt(sum w_k^2 e_k^2)."""
    if not spectra:
        raise ValueError("no spectra to sum")
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (len(spectra),):
        raise ValueError(f"{weights.size} weights for {len(spectra)} spectra")
    grid = spectra[0].wavenumber
    total = np.zeros_like(grid)
    var = np.zeros_like(grid)
    for w, s in zip(weights, spectra):
        g = s if (s.wavenumber.shape == grid.shape and np.allclose(s.wavenumber, grid)) else s.on_grid(grid)
        total += w * g.intensity
        var += (w * g.stderr) ** 2
    return Spectrum(grid, total, np.sqrt(var), min(s.n_runs for s in spectra), {"weights": weights.tolist()})


def cross_section_cm2(intensity_km_mol_per_cm: np.ndarray) -> np.ndarray:
    """Absorption cross-section per cluster (cm^2) of A(nu~) in km/mol per cm^-1."""
    return np.asarray(intensity_km_mol_per_cm, dtype=float) * 1.0e5 / AVOGADRO


def kappa_cm2_g(intensity_km_mol_per_cm: np.ndarray, mean_mass_amu: float) -> np.ndarray:
    """Mass absorption coefficient (cm^2/g) of A(nu~) per cluster of mean mass ``mean_mass_amu``."""
    if not mean_mass_amu > 0:
        raise ValueError(f"mean cluster mass must be positive, got {mean_mass_amu}")
    return cross_section_cm2(intensity_km_mol_per_cm) / (mean_mass_amu * AMU_IN_G)


def absorption_table(spectrum: Spectrum, mean_mass_amu: float) -> np.ndarray:
    """Columns of :data:`TABLE_COLUMNS` (ascending wavenumber; wavenumber 0 left out: infinite wavelength)."""
    s = spectrum.cropped(lo=np.nextafter(0.0, 1.0))
    return np.column_stack([
        s.wavenumber, wavelength_um(s.wavenumber), s.intensity, s.stderr,
        cross_section_cm2(s.intensity), kappa_cm2_g(s.intensity, mean_mass_amu),
    ])


def write_absorption_table(path: str | os.PathLike, spectrum: Spectrum, mean_mass_amu: float, header: str = "") -> None:
    """Plain-text table (whitespace columns, ``#`` header) of :func:`absorption_table`, atomic write."""
    buf = _io.StringIO()
    for line in header.splitlines():
        buf.write(f"# {line}\n")
    buf.write(f"# mean cluster mass: {mean_mass_amu:.4f} amu\n")
    buf.write("# " + " ".join(TABLE_COLUMNS) + "\n")
    np.savetxt(buf, absorption_table(spectrum, mean_mass_amu), fmt="%.8e")
    write_text(path, buf.getvalue())
