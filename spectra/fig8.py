"""Our size-summed MD spectra beside the paper's Fig. 8: positions and widths of the 9.7 µm and 18 µm bands.

The paper's arrays (``paper_ir/{pyroxene,olivine}_ml_md_{100,400,800}K.npy``: column 0 wavenumber in cm^-1,
columns 1..10 the spectra of N = 1..10) are in arbitrary units (each dipole component standardised before
the autocorrelation), so only shapes and positions compare. Both spectra are therefore normalised to their
own maximum within 5-40 µm (:data:`NORM_RANGE_UM`), and in each band window (:data:`BANDS_UM`: 8-12 µm and
15-22 µm) the band is characterised by

* its peak: the maximum of the normalised spectrum in the window (µm and cm^-1) and its height there;
* its FWHM: the width between the nearest points on either side of the peak where the normalised spectrum
  falls to half the peak height (linear interpolation; searched within 5-40 µm, NaN when it never falls
  that low), in µm and cm^-1.

``smooth_fwhm_cm`` (default 0: none) applies the same Gaussian smoothing to both spectra first, for noisy
spectra whose band maximum would otherwise be a single spike.

Our absolute units stay separate: the band areas of our spectrum (its integral over each window in
wavenumber) in km/mol, per average cluster of the sum (the campaign's ``sums/<composition>_<T>K_sum.csv``
is in km/mol per cm^-1). The paper's sum here is the equal-weight sum of the size columns, those of
``sizes`` only when given (use the sizes the campaign summed).

Entry points: :func:`compare_fig8` (numbers), :func:`write_fig8` (CSV, JSON, PNG),
:func:`fig8_against_paper` (both, finding the paper's file; None when it is absent).
"""
from __future__ import annotations

import io as _io
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .spectrum import Spectrum

BANDS_UM: dict[str, tuple[float, float]] = {"9.7um": (8.0, 12.0), "18um": (15.0, 22.0)}
NORM_RANGE_UM = (5.0, 40.0)
COMPOSITIONS = ("pyroxene", "olivine")
PAPER_SIZES = tuple(range(1, 11))
CSV_COLUMNS = (
    "band", "window_um", "ours_peak_um", "paper_peak_um", "shift_um", "ours_peak_cm-1", "paper_peak_cm-1",
    "shift_cm-1", "ours_fwhm_um", "paper_fwhm_um", "fwhm_difference_um", "ours_fwhm_cm-1", "paper_fwhm_cm-1",
    "ours_height", "paper_height", "cosine_in_window", "ours_area_km_mol",
)


def _um_to_cm(lo_um: float, hi_um: float) -> tuple[float, float]:
    """A wavelength window (µm) as an ascending wavenumber window (cm^-1)."""
    return 1.0e4 / hi_um, 1.0e4 / lo_um


def default_paper_dir() -> Path | None:
    """``../shared/data/paper_ir`` beside the checkout, when it is there."""
    p = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper_ir"
    return p if p.is_dir() else None


def paper_fig8_path(composition: str, temperature: float, paper_dir: str | os.PathLike | None = None) -> Path | None:
    """The paper's Fig. 8 array for ``composition`` (pyroxene, olivine) at ``temperature`` K, or None."""
    if composition not in COMPOSITIONS:
        return None
    folder = Path(paper_dir) if paper_dir is not None else default_paper_dir()
    if folder is None or not math.isfinite(float(temperature)) or float(temperature) != round(float(temperature)):
        return None
    path = folder / f"{composition}_ml_md_{int(round(float(temperature)))}K.npy"
    return path if path.is_file() else None


def read_paper_fig8(path: str | os.PathLike, sizes: Sequence[int] | None = None) -> Spectrum:
    """The equal-weight sum of the paper's size columns (``sizes``, N = 1..10; default all), arbitrary units."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        data = np.asarray(np.load(path, allow_pickle=False), dtype=float)
    except Exception as exc:  # numpy raises several kinds for a damaged file
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    if data.ndim != 2 or data.shape[1] != len(PAPER_SIZES) + 1:
        raise ValueError(f"{path}: shape {data.shape}, expected (n, {len(PAPER_SIZES) + 1}): wavenumber, N=1..10")
    sizes = list(PAPER_SIZES) if sizes is None else [int(n) for n in sizes]
    bad = [n for n in sizes if n not in PAPER_SIZES]
    if bad or not sizes:
        raise ValueError(f"{path}: sizes {bad or sizes} not among the paper's N = 1..10")
    y = data[:, sizes].sum(axis=1)
    order = np.argsort(data[:, 0], kind="stable")
    return Spectrum(data[order, 0], y[order], meta={"source": str(path), "sizes": sizes, "units": "arbitrary"})


def smoothed(spectrum: Spectrum, fwhm_cm: float) -> Spectrum:
    """Gaussian smoothing of FWHM ``fwhm_cm`` (cm^-1) on the spectrum's grid (0: unchanged)."""
    if not fwhm_cm:
        return spectrum
    if not (fwhm_cm > 0 and math.isfinite(fwhm_cm)):
        raise ValueError(f"smoothing FWHM must be positive, got {fwhm_cm}")
    wn, y = spectrum.wavenumber, spectrum.intensity
    step = float(np.median(np.diff(wn)))
    grid = np.arange(wn[0], wn[-1] + 0.5 * step, step)
    yy = np.interp(grid, wn, y)
    sigma = fwhm_cm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / step
    half = max(1, int(math.ceil(4 * sigma)))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    ys = np.convolve(np.pad(yy, half, mode="edge"), kernel, mode="valid")
    return Spectrum(wn, np.interp(wn, grid, ys), meta=dict(spectrum.meta))


def normalised_in(spectrum: Spectrum, norm_range_um: tuple[float, float] = NORM_RANGE_UM) -> Spectrum:
    """The spectrum (positive wavenumbers) divided by its maximum within ``norm_range_um``."""
    lo, hi = _um_to_cm(*norm_range_um)
    s = spectrum.cropped(np.nextafter(0.0, 1.0), np.inf)
    m = (s.wavenumber >= lo) & (s.wavenumber <= hi)
    if not np.any(m):
        raise ValueError(f"spectrum {spectrum.meta.get('source', '')} has no points in "
                         f"{norm_range_um[0]:g}-{norm_range_um[1]:g} µm")
    top = float(np.max(s.intensity[m]))
    if not top > 0:
        raise ValueError(f"spectrum {spectrum.meta.get('source', '')} is not positive in "
                         f"{norm_range_um[0]:g}-{norm_range_um[1]:g} µm: cannot normalise")
    return Spectrum(s.wavenumber, s.intensity / top, s.stderr / top, s.n_runs, dict(s.meta))


@dataclass
class BandFeature:
    band: str
    window_um: tuple[float, float]
    peak_um: float
    peak_cm: float
    height: float           # normalised to the maximum in the normalisation range
    fwhm_um: float
    fwhm_cm: float
    half_lo_cm: float       # where the band falls to half height, low-wavenumber (long-wavelength) side
    half_hi_cm: float


def _crossing(wn, y, k: int, half: float, step: int, lo_cm: float, hi_cm: float) -> float:
    """Wavenumber where y first falls below ``half`` walking from index k by ``step`` (+1/-1), or NaN."""
    j = k
    while 0 <= j + step < len(y) and lo_cm <= wn[j + step] <= hi_cm:
        if y[j + step] < half:
            a, b = y[j], y[j + step]
            t = (a - half) / (a - b) if a != b else 0.0
            return float(wn[j] + t * (wn[j + step] - wn[j]))
        j += step
    return float("nan")


def band_features(spectrum: Spectrum, bands: dict[str, tuple[float, float]] = BANDS_UM,
                  norm_range_um: tuple[float, float] = NORM_RANGE_UM, smooth_fwhm_cm: float = 0.0,
                  normalise: bool = True) -> list[BandFeature]:
    """Peak position, height and FWHM of each band of ``spectrum`` (normalised first, see the module doc)."""
    s = smoothed(spectrum, smooth_fwhm_cm)
    s = normalised_in(s, norm_range_um) if normalise else s.cropped(np.nextafter(0.0, 1.0), np.inf)
    wn, y = s.wavenumber, s.intensity
    n_lo, n_hi = _um_to_cm(*norm_range_um)
    out = []
    for name, (w_lo, w_hi) in bands.items():
        lo, hi = _um_to_cm(w_lo, w_hi)
        idx = np.flatnonzero((wn >= lo) & (wn <= hi))
        if len(idx) == 0:
            raise ValueError(f"spectrum {spectrum.meta.get('source', '')} has no points in the {name} window "
                             f"{w_lo:g}-{w_hi:g} µm")
        k = int(idx[np.argmax(y[idx])])
        peak, height = float(wn[k]), float(y[k])
        left = _crossing(wn, y, k, 0.5 * height, -1, n_lo, n_hi)
        right = _crossing(wn, y, k, 0.5 * height, +1, n_lo, n_hi)
        ok = height > 0 and math.isfinite(left) and math.isfinite(right)
        out.append(BandFeature(
            band=name, window_um=(w_lo, w_hi), peak_um=1.0e4 / peak, peak_cm=peak, height=height,
            fwhm_um=(1.0e4 / left - 1.0e4 / right) if ok else float("nan"),
            fwhm_cm=(right - left) if ok else float("nan"), half_lo_cm=left, half_hi_cm=right))
    return out


def compare_fig8(ours: Spectrum, paper: Spectrum, bands: dict[str, tuple[float, float]] = BANDS_UM,
                 norm_range_um: tuple[float, float] = NORM_RANGE_UM, smooth_fwhm_cm: float = 0.0) -> dict:
    """Bands of ``ours`` (km/mol per cm^-1) beside those of ``paper`` (arbitrary units), one row per band.

    Shifts are ours minus the paper's. ``shape``: cosine similarity, MAE and RMSE of the two normalised
    spectra over the normalisation range (ours interpolated on the paper's grid). ``ours_area_km_mol``: the
    integral of our (unnormalised, unsmoothed) spectrum over each window, and over the whole range."""
    from .compare import compare_spectra

    fo = band_features(ours, bands, norm_range_um, smooth_fwhm_cm)
    fp = band_features(paper, bands, norm_range_um, smooth_fwhm_cm)
    a = normalised_in(smoothed(paper, smooth_fwhm_cm), norm_range_um)
    b = normalised_in(smoothed(ours, smooth_fwhm_cm), norm_range_um)
    n_lo, n_hi = _um_to_cm(*norm_range_um)
    shape = compare_spectra(a, b, n_lo, n_hi, normalize="none")
    rows = []
    for o, p in zip(fo, fp):
        lo, hi = _um_to_cm(*o.window_um)
        window = compare_spectra(a, b, lo, hi, normalize="none")
        rows.append({
            "band": o.band, "window_um": list(o.window_um),
            "ours_peak_um": o.peak_um, "paper_peak_um": p.peak_um, "shift_um": o.peak_um - p.peak_um,
            "ours_peak_cm-1": o.peak_cm, "paper_peak_cm-1": p.peak_cm, "shift_cm-1": o.peak_cm - p.peak_cm,
            "ours_fwhm_um": o.fwhm_um, "paper_fwhm_um": p.fwhm_um, "fwhm_difference_um": o.fwhm_um - p.fwhm_um,
            "ours_fwhm_cm-1": o.fwhm_cm, "paper_fwhm_cm-1": p.fwhm_cm,
            "ours_height": o.height, "paper_height": p.height,
            "cosine_in_window": window["cosine_similarity"],
            "ours_area_km_mol": ours.integral(lo, hi),
        })
    return {
        "bands": rows,
        "normalisation_um": list(norm_range_um), "smooth_fwhm_cm-1": smooth_fwhm_cm,
        "shape": {"cosine_similarity": shape["cosine_similarity"], "mae": shape["mae"], "rmse": shape["rmse"],
                  "range_cm-1": shape["range_cm-1"]},
        "ours_area_km_mol": {"total": ours.integral(n_lo, n_hi), "range_um": list(norm_range_um),
                             "unit": "km/mol per average cluster of the sum (integral of km/mol per cm^-1)"},
        "ours": {"source": ours.meta.get("source", ""), "n_runs": ours.n_runs},
        "paper": {"source": paper.meta.get("source", ""), "sizes": paper.meta.get("sizes"),
                  "units": "arbitrary: shapes and positions only"},
        "features": {"ours": [asdict(f) for f in fo], "paper": [asdict(f) for f in fp]},
    }


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def write_fig8_csv(path: str | os.PathLike, result: dict) -> None:
    from .atomic import write_text

    def cell(v):
        if isinstance(v, (list, tuple)):
            return "-".join(f"{x:g}" for x in v)
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.6g}"
        return str(v)

    buf = _io.StringIO()
    buf.write(",".join(CSV_COLUMNS) + "\n")
    for row in result["bands"]:
        buf.write(",".join(cell(row[c]) for c in CSV_COLUMNS) + "\n")
    write_text(path, buf.getvalue())


def plot_fig8(path: str | os.PathLike, ours: Spectrum, paper: Spectrum, result: dict,
              labels: tuple[str, str] = ("ours", "paper (Fig. 8)"), title: str = "") -> None:
    """Both spectra normalised, against wavelength (5-40 µm), with each band's peak marked."""
    from .plotting import _pyplot, _save
    from .sums import SILICATE_BANDS_UM

    plt = _pyplot()
    smooth = float(result.get("smooth_fwhm_cm-1") or 0.0)
    norm = tuple(result.get("normalisation_um") or NORM_RANGE_UM)
    fig, ax = plt.subplots(figsize=(7, 4))
    for s, label, ls, color, key in ((ours, labels[0], "-", "tab:red", "ours_peak_um"),
                                     (paper, labels[1], "--", "k", "paper_peak_um")):
        n = normalised_in(smoothed(s, smooth), norm)
        lam = n.wavelength_um
        m = (lam >= norm[0]) & (lam <= norm[1])
        ax.plot(lam[m], n.intensity[m], ls=ls, color=color, lw=1.1, label=label)
        for row in result["bands"]:
            ax.axvline(row[key], color=color, ls=ls, lw=0.7, alpha=0.7)
    for band in SILICATE_BANDS_UM:
        ax.text(band, 1.0, f" {band:g} µm", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    text = "; ".join(f"{r['band']}: {r['ours_peak_um']:.2f} vs {r['paper_peak_um']:.2f} µm" for r in result["bands"])
    ax.set_xlim(*norm)
    ax.set_xlabel("wavelength / µm")
    ax.set_ylabel(f"intensity / maximum in {norm[0]:g}-{norm[1]:g} µm")
    ax.set_title(f"{title}\n{text}" if title else text, fontsize=9)
    ax.legend(frameon=False)
    try:
        _save(fig, path)
    finally:
        plt.close(fig)


def write_fig8(stem: str | os.PathLike, result: dict, ours: Spectrum, paper: Spectrum,
               labels: tuple[str, str] = ("ours", "paper (Fig. 8)"), title: str = "") -> dict:
    """``<stem>.csv`` (one row per band), ``<stem>.json`` (everything) and ``<stem>.png``; their paths."""
    from .atomic import write_json

    stem = Path(stem)
    paths = {k: stem.with_name(stem.name + ext) for k, ext in (("csv", ".csv"), ("json", ".json"), ("png", ".png"))}
    write_fig8_csv(paths["csv"], result)
    write_json(paths["json"], _json_safe(result))
    plot_fig8(paths["png"], ours, paper, result, labels, title)
    return {k: str(v) for k, v in paths.items()}


def _sizes_text(sizes: Sequence[int]) -> str:
    """``1-10`` for a contiguous run of sizes, else ``1,3,5``."""
    sizes = sorted(int(n) for n in sizes)
    contiguous = len(sizes) > 2 and sizes == list(range(sizes[0], sizes[-1] + 1))
    return f"{sizes[0]}-{sizes[-1]}" if contiguous else ",".join(map(str, sizes))


def fig8_against_paper(ours: Spectrum, composition: str, temperature: float, stem: str | os.PathLike | None = None,
                       sizes: Sequence[int] | None = None, paper_dir: str | os.PathLike | None = None,
                       smooth_fwhm_cm: float = 0.0) -> dict | None:
    """Our summed spectrum of ``composition`` at ``temperature`` K beside the paper's Fig. 8 array (the same
    ``sizes``), written to ``stem``.csv/.json/.png when ``stem`` is given; None when the paper has no array
    for it (or ``paper_dir``, default ``../shared/data/paper_ir``, is absent)."""
    path = paper_fig8_path(composition, temperature, paper_dir)
    if path is None:
        return None
    paper = read_paper_fig8(path, sizes)
    result = compare_fig8(ours, paper, smooth_fwhm_cm=smooth_fwhm_cm)
    result.update(composition=composition, temperature_K=float(temperature))
    if stem is not None:
        result["files"] = write_fig8(stem, result, ours, paper,
                                     labels=("ours", f"paper Fig. 8 (ML, N = {_sizes_text(paper.meta['sizes'])})"),
                                     title=f"{composition} {float(temperature):g} K")
    return result
