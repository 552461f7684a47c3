"""PNG plots of spectra (matplotlib, Agg backend: no display needed), written atomically.

``plot_spectra`` overlays spectra against wavenumber or wavelength (µm, marking 9.7 and 18 µm), with
shaded bands where there are some: +-1 standard error over the runs (sampling noise of the MD, solid fill)
and +-1 std over the dipole committee (model uncertainty of the dipole surface, hatched), each labelled in
the legend; ``plot_harmonic`` draws sticks and the broadened curve.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .spectrum import Spectrum
from .sums import SILICATE_BANDS_UM

DEFAULT_YLABEL = "A(ν̃) / km mol$^{-1}$ (cm$^{-1}$)$^{-1}$"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    from .atomic import write_with

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    write_with(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"), suffix=f".{fmt}")


def plot_spectra(
    path: str | os.PathLike,
    spectra: Sequence[Spectrum],
    labels: Sequence[str] | None = None,
    axis: str = "wavenumber",
    xlim: tuple[float, float] | None = None,
    ylabel: str = DEFAULT_YLABEL,
    title: str = "",
    mark_bands: bool = True,
    label_bands: bool | None = None,
) -> list[str]:
    """Overlay ``spectra`` against ``axis`` = ``wavenumber`` (cm^-1) or ``wavelength`` (µm).

    ``label_bands``: name the error bands in the legend (default: when a spectrum has a committee band).
    Returns the legend's labels.
    """
    if axis not in ("wavenumber", "wavelength"):
        raise ValueError(f"unknown axis {axis!r}; choose wavenumber or wavelength")
    plt = _pyplot()
    labels = list(labels) if labels is not None else [""] * len(spectra)
    if label_bands is None:
        label_bands = any(s.std_committee is not None for s in spectra)
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ("-", "--", ":", "-.")  # overlaid curves stay visible where they coincide
    for k, (s, label) in enumerate(zip(spectra, labels)):
        m = s.wavenumber > 0 if axis == "wavelength" else np.ones_like(s.wavenumber, dtype=bool)
        x = s.wavelength_um[m] if axis == "wavelength" else s.wavenumber[m]
        line, = ax.plot(x, s.intensity[m], lw=1.2, ls=styles[k % len(styles)], label=label or None)
        # the curve's own label prefixes its bands' only where several curves share the legend
        _bands(ax, x, s, m, line.get_color(), None if not label_bands else (label if len(spectra) > 1 else ""))
    if axis == "wavelength":
        ax.set_xlabel("wavelength / µm")
        if mark_bands:
            for band in SILICATE_BANDS_UM:
                ax.axvline(band, color="k", lw=0.8, ls="--")
                ax.text(band, 1.0, f" {band:g} µm", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    else:
        ax.set_xlabel("wavenumber / cm$^{-1}$")
    if xlim is not None:
        ax.set_xlim(*xlim)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    legend = ax.get_legend_handles_labels()[1]
    if legend:
        ax.legend(frameon=False)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
    return legend


def _bands(ax, x, s: Spectrum, m, color, label: str | None) -> None:
    """+-stderr (runs, solid) and +-std_committee (model, hatched) around the curve; labelled unless None."""
    y = s.intensity[m]
    prefix = f"{label}: " if label else ""
    if np.any(s.stderr[m] > 0):
        e = s.stderr[m]
        ax.fill_between(x, y - e, y + e, color=color, alpha=0.25, lw=0,
                        label=None if label is None else
                        f"{prefix}runs: ±1 standard error over {s.n_runs} runs (MD sampling)")
    if s.std_committee is not None and np.any(s.std_committee[m] > 0):
        e = s.std_committee[m]
        members = s.meta.get("n_dipole_members")
        what = f"{members} dipole members" if members else "the dipole members"
        ax.fill_between(x, y - e, y + e, facecolor="none", edgecolor=color, hatch="////", alpha=0.6, lw=0,
                        label=None if label is None else f"{prefix}committee: ±1 std over {what} (dipole model)")


def plot_harmonic(
    path: str | os.PathLike,
    frequencies: np.ndarray,
    intensities: np.ndarray,
    broadened: Spectrum | None = None,
    xlim: tuple[float, float] | None = None,
    title: str = "",
) -> None:
    """Sticks at the harmonic frequencies (height = intensity, km/mol) and the broadened curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    f = np.asarray(frequencies)
    i = np.asarray(intensities)
    keep = f >= 0
    ax.vlines(f[keep], 0, i[keep], color="k", lw=1.0, label="modes")
    if broadened is not None:
        ax.plot(broadened.wavenumber, broadened.intensity, lw=1.2, label="broadened")
    ax.set_xlabel("wavenumber / cm$^{-1}$")
    ax.set_ylabel("intensity / km mol$^{-1}$")
    if xlim is not None:
        ax.set_xlim(*xlim)
    if title:
        ax.set_title(title)
    ax.legend(frameon=False)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
