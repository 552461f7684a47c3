"""Broadened spectra from harmonic frequencies and intensities (Gaussian or Lorentzian lines).

``normalization='height'``: each line peaks at its intensity (km/mol), the paper's harmonic plots
(Gaussians of FWHM 10 cm^-1 on ``linspace(0, 4000, 1024)``, :data:`PAPER_GRID`).
``normalization='area'``: each line integrates to its intensity, giving km/mol per cm^-1, the unit of the
MD spectra, so the two can be overlaid on one absolute scale.
Modes with negative (imaginary) frequencies are left out.
"""
from __future__ import annotations

import math

import numpy as np

from .spectrum import Spectrum

PAPER_GRID = np.linspace(0.0, 4000.0, 1024)
SHAPES = ("gaussian", "lorentzian")
NORMALIZATIONS = ("height", "area")


def broaden(
    frequencies: np.ndarray,
    intensities: np.ndarray,
    grid: np.ndarray | None = None,
    fwhm: float = 10.0,
    shape: str = "gaussian",
    normalization: str = "height",
) -> Spectrum:
    """Sum of one line per mode on ``grid`` (cm^-1; default :data:`PAPER_GRID`), full width ``fwhm`` cm^-1."""
    if shape not in SHAPES:
        raise ValueError(f"unknown line shape {shape!r}; choose from {', '.join(SHAPES)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; choose from {', '.join(NORMALIZATIONS)}")
    if not (fwhm > 0 and math.isfinite(fwhm)):
        raise ValueError(f"FWHM must be positive, got {fwhm}")
    grid = PAPER_GRID if grid is None else np.asarray(grid, dtype=float)
    f = np.asarray(frequencies, dtype=float)
    i = np.asarray(intensities, dtype=float)
    if f.shape != i.shape:
        raise ValueError(f"{f.size} frequencies but {i.size} intensities")
    keep = f >= 0
    f, i = f[keep], i[keep]
    x = grid[:, None] - f[None, :]
    if shape == "gaussian":
        sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
        lines = np.exp(-0.5 * (x / sigma) ** 2)
        if normalization == "area":
            lines /= sigma * math.sqrt(2.0 * math.pi)
    else:
        gamma = 0.5 * fwhm
        lines = gamma**2 / (x**2 + gamma**2)
        if normalization == "area":
            lines /= math.pi * gamma
    meta = {"shape": shape, "fwhm_cm-1": fwhm, "normalization": normalization}
    return Spectrum(grid, lines @ i, None, 1, meta)
