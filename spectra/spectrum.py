"""The ``Spectrum`` record (wavenumber grid, intensity, standard error) and its files.

The CSV written here is the project's spectrum file: columns exactly
``wavenumber_cm-1,wavelength_um,intensity,stderr`` in ascending wavenumber, plus ``std_committee`` when the
spectrum carries a dipole-committee band (``stderr``: runs; ``std_committee``: model). ``read_spectrum`` also reads
the paper's ``.npy`` spectra (column 0 = wavenumber, further columns = one spectrum each: several columns
give their mean and standard error) and plain text tables of 2 to 4 columns.
"""
from __future__ import annotations

import io as _io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import write_text

CSV_COLUMNS = ("wavenumber_cm-1", "wavelength_um", "intensity", "stderr")
#: optional fifth CSV column: the dipole committee's std of the spectrum (km/mol per cm^-1)
COMMITTEE_COLUMN = "std_committee"

# numpy >= 2 renamed trapz to trapezoid; the project allows numpy >= 1.24
trapezoid = getattr(np, "trapezoid", None) or getattr(np, "trapz")


def wavelength_um(wavenumber_cm: np.ndarray) -> np.ndarray:
    """Wavelength in µm of a wavenumber in cm^-1 (``inf`` at 0)."""
    wn = np.asarray(wavenumber_cm, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(wn > 0, 1.0e4 / np.where(wn > 0, wn, 1.0), np.inf)


@dataclass
class Spectrum:
    """An IR spectrum on an ascending wavenumber grid.

    ``intensity`` is in km/mol per cm^-1 for MD spectra and area-normalised broadened spectra (then the
    integral over wavenumber is in km/mol), or in km/mol for height-normalised broadened spectra (the paper's
    harmonic plots). ``stderr`` is the standard error of the mean over ``n_runs`` runs (0 for one run): the
    sampling noise of the MD. ``std_committee`` (optional, same unit) is the std over the dipole committee
    members of their spectra on the same trajectories: the model uncertainty of the dipole surface.
    """

    wavenumber: np.ndarray
    intensity: np.ndarray
    stderr: np.ndarray | None = None
    n_runs: int = 1
    meta: dict = field(default_factory=dict)
    std_committee: np.ndarray | None = None

    def __post_init__(self):
        self.wavenumber = np.asarray(self.wavenumber, dtype=float)
        self.intensity = np.asarray(self.intensity, dtype=float)
        if self.stderr is None:
            self.stderr = np.zeros_like(self.intensity)
        self.stderr = np.asarray(self.stderr, dtype=float)
        if not (self.wavenumber.shape == self.intensity.shape == self.stderr.shape) or self.wavenumber.ndim != 1:
            raise ValueError(
                f"spectrum arrays differ in shape: wavenumber {self.wavenumber.shape}, "
                f"intensity {self.intensity.shape}, stderr {self.stderr.shape}"
            )
        if self.std_committee is not None:
            self.std_committee = np.asarray(self.std_committee, dtype=float)
            if self.std_committee.shape != self.intensity.shape:
                raise ValueError(f"std_committee has shape {self.std_committee.shape}, "
                                 f"intensity {self.intensity.shape}")

    @property
    def wavelength_um(self) -> np.ndarray:
        return wavelength_um(self.wavenumber)

    def integral(self, lo: float = -np.inf, hi: float = np.inf) -> float:
        """Trapezoidal integral of the intensity over wavenumber in [lo, hi] (km/mol for MD spectra)."""
        m = (self.wavenumber >= lo) & (self.wavenumber <= hi)
        return float(trapezoid(self.intensity[m], self.wavenumber[m]))

    def cropped(self, lo: float = 0.0, hi: float = np.inf) -> "Spectrum":
        m = (self.wavenumber >= lo) & (self.wavenumber <= hi)
        band = None if self.std_committee is None else self.std_committee[m]
        return Spectrum(self.wavenumber[m], self.intensity[m], self.stderr[m], self.n_runs, dict(self.meta), band)

    def on_grid(self, grid: np.ndarray) -> "Spectrum":
        """Linear interpolation onto ``grid`` (zero outside this spectrum's range)."""
        grid = np.asarray(grid, dtype=float)
        i = np.interp(grid, self.wavenumber, self.intensity, left=0.0, right=0.0)
        e = np.interp(grid, self.wavenumber, self.stderr, left=0.0, right=0.0)
        band = (None if self.std_committee is None
                else np.interp(grid, self.wavenumber, self.std_committee, left=0.0, right=0.0))
        return Spectrum(grid, i, e, self.n_runs, dict(self.meta), band)


def write_spectrum_csv(path: str | os.PathLike, spectrum: Spectrum) -> None:
    """The project's spectrum CSV (atomic write); ``inf`` wavelength at wavenumber 0.

    A spectrum with a committee band gets the fifth column ``std_committee`` after ``stderr``.
    """
    buf = _io.StringIO()
    columns = [spectrum.wavenumber, spectrum.wavelength_um, spectrum.intensity, spectrum.stderr]
    header = list(CSV_COLUMNS)
    if spectrum.std_committee is not None:
        columns.append(spectrum.std_committee)
        header.append(COMMITTEE_COLUMN)
    buf.write(",".join(header) + "\n")
    table = np.column_stack(columns)
    np.savetxt(buf, table, delimiter=",", fmt="%.10g")
    write_text(path, buf.getvalue())


def _from_columns(path: Path, data: np.ndarray) -> Spectrum:
    if data.ndim != 2 or data.shape[1] < 2:
        raise ValueError(f"{path}: expected at least 2 columns (wavenumber, intensity), found shape {data.shape}")
    if not np.all(np.isfinite(data[:, 0])):
        raise ValueError(f"{path}: wavenumber column has NaN or inf")
    wn = data[:, 0]
    if data.shape[1] == 2:
        spec = Spectrum(wn, data[:, 1])
    else:
        runs = data[:, 1:]
        n = runs.shape[1]
        mean = runs.mean(axis=1)
        err = runs.std(axis=1, ddof=1) / np.sqrt(n)
        spec = Spectrum(wn, mean, err, n_runs=n)
    order = np.argsort(spec.wavenumber, kind="stable")
    if np.any(np.diff(spec.wavenumber[order]) <= 0):
        raise ValueError(f"{path}: wavenumbers are not distinct")
    return Spectrum(spec.wavenumber[order], spec.intensity[order], spec.stderr[order], spec.n_runs)


def read_spectrum(path: str | os.PathLike) -> Spectrum:
    """A spectrum from the project's CSV, a ``.npy`` array (paper layout) or a whitespace text table.

    CSV: the four columns of :data:`CSV_COLUMNS`, optionally :data:`COMMITTEE_COLUMN` as a fifth. ``.npy``:
    column 0 wavenumber, columns 1.. spectra (several give mean and standard error). Text: 2 columns
    (wavenumber, intensity) or 3 (plus stderr).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises several kinds for a damaged file
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
        return _from_columns(path, np.asarray(data, dtype=float))
    text = path.read_text()
    lines = text.splitlines()
    if not any(s.strip() for s in lines):
        raise ValueError(f"{path}: empty file")
    first = next(s for s in lines if s.strip())
    if first.strip().startswith("wavenumber_cm-1"):
        header = [h.strip() for h in first.strip().split(",")]
        if tuple(header) not in (CSV_COLUMNS, CSV_COLUMNS + (COMMITTEE_COLUMN,)):
            raise ValueError(f"{path}: header {first.strip()!r}, expected {','.join(CSV_COLUMNS)}"
                             f"[,{COMMITTEE_COLUMN}]")
        rows = _parse_rows(path, lines, sep=",", ncols=(len(header),), skip_first=True)
        if len(rows) == 0:
            raise ValueError(f"{path}: no data rows after the header")
        band = rows[:, 4] if len(header) == 5 else None
        return Spectrum(rows[:, 0], rows[:, 2], rows[:, 3], std_committee=band)
    rows = _parse_rows(path, lines, sep=None, ncols=(2, 3), skip_first=False)
    if len(rows) == 0:
        raise ValueError(f"{path}: no data rows")
    if rows.shape[1] == 3:  # wavenumber, intensity, stderr
        order = np.argsort(rows[:, 0], kind="stable")
        return Spectrum(rows[order, 0], rows[order, 1], rows[order, 2])
    return _from_columns(path, rows)


def _parse_rows(path: Path, lines: list[str], sep, ncols: tuple[int, ...], skip_first: bool) -> np.ndarray:
    rows = []
    width = None
    seen_first = False
    for lineno, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if skip_first and not seen_first:
            seen_first = True
            continue
        parts = [p for p in (s.split(sep) if sep else s.split())]
        if len(parts) not in ncols or (width is not None and len(parts) != width):
            want = width if width is not None else " or ".join(map(str, ncols))
            raise ValueError(f"{path}: line {lineno}: expected {want} columns, found {len(parts)}")
        width = len(parts)
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{path}: line {lineno}: not a number in {s!r}") from None
        if not np.all(np.isfinite(values[:1] + values[2:] if sep == "," else values)):
            raise ValueError(f"{path}: line {lineno}: NaN or inf value")
        rows.append(values)
    return np.asarray(rows, dtype=float).reshape(len(rows), width or (ncols[0]))
