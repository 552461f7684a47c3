"""Readers of dipole time series: i-PI extras files, extxyz, npz and plain text.

Every reader returns a :class:`DipoleSeries` with the dipoles in e·Å and the time between frames in fs.
Bad input (missing or empty file, truncated last frame, NaN, wrong column count, unequal step spacing)
raises ``ValueError``/``FileNotFoundError`` with one line naming the file and, where there is one, the line.

Formats
-------
``ipi``
    i-PI's ``<trajectory filename='dipole' extra_type='dipole'> extras </trajectory>`` output, e.g.
    ``PREFIX.dipole_0``: for every printed step a header `` #EXTRAS(dipole)# Step:  N`` followed by one line
    of three numbers. i-PI passes the driver's numbers through unchanged: atomic units (e·Bohr) unless the
    driver says otherwise, hence the default unit ``au``. The step numbers give the stride.
``extxyz``
    frames with a per-frame ``dipole`` (``atoms.info['dipole']`` or calculator results), e·Å by default;
    an optional per-frame ``step`` in ``info`` gives the stride.
``npz``
    array ``dipoles`` (or ``dipole``) of shape (n, 3), e·Å by default; optional ``steps`` (n,).
``text``
    3 columns (mu_x mu_y mu_z) or 4 columns (step mu_x mu_y mu_z); ``#`` starts a comment; e·Å by default.

``timestep_fs`` is always the MD time step. When a file carries step numbers the time between frames is
``timestep_fs * stride``; without step numbers frames are taken one time step apart.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import dipole_unit_factor

FORMATS = ("ipi", "extxyz", "npz", "text")
DEFAULT_UNITS = {"ipi": "au", "extxyz": "eA", "npz": "eA", "text": "eA"}

_IPI_HEADER = re.compile(r"^#\s*(\w+)\((.*?)\)#\s*Step:\s*(-?\d+)")


@dataclass
class DipoleSeries:
    """A dipole time series: ``dipoles`` (n, 3) in e·Å, ``frame_interval_fs`` between frames."""

    dipoles: np.ndarray
    frame_interval_fs: float
    source: str = ""
    steps: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(len(self.dipoles))

    @property
    def duration_fs(self) -> float:
        return (self.n_frames - 1) * self.frame_interval_fs


def detect_format(path: str | os.PathLike) -> str:
    """``npz``/``extxyz`` by suffix; otherwise ``ipi`` when the first non-blank line is an i-PI extras header, else ``text``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    if suffix in (".xyz", ".extxyz"):
        return "extxyz"
    with open(path, "r", errors="replace") as fh:
        for line in fh:
            s = line.strip()
            if s:
                return "ipi" if _IPI_HEADER.match(s) else "text"
    return "text"


def read_dipoles(
    path: str | os.PathLike,
    timestep_fs: float,
    units: str | None = None,
    fmt: str | None = None,
) -> DipoleSeries:
    """Read a dipole time series (see the module docstring for the formats).

    ``timestep_fs``: the MD time step in fs. ``units``: ``au`` (e·Bohr), ``eA`` or ``debye``; default per
    format (``au`` for i-PI, ``eA`` otherwise). ``fmt``: one of :data:`FORMATS`, default detected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    if not (timestep_fs > 0 and np.isfinite(timestep_fs)):
        raise ValueError(f"timestep must be a positive number of fs, got {timestep_fs!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown dipole file format {fmt!r}; choose from {', '.join(FORMATS)}")
    factor = dipole_unit_factor(units or DEFAULT_UNITS[fmt])
    reader = {"ipi": _read_ipi, "extxyz": _read_extxyz, "npz": _read_npz, "text": _read_text}[fmt]
    dipoles, steps = reader(path)
    if len(dipoles) < 3:
        raise ValueError(f"{path}: only {len(dipoles)} frame(s); a spectrum needs many more")
    stride = _stride(path, steps)
    return DipoleSeries(
        dipoles=np.asarray(dipoles, dtype=float) * factor,
        frame_interval_fs=float(timestep_fs) * stride,
        source=str(path),
        steps=None if steps is None else np.asarray(steps),
    )


def _stride(path: Path, steps) -> int:
    if steps is None:
        return 1
    steps = np.asarray(steps)
    d = np.diff(steps)
    if np.any(d <= 0):
        k = int(np.argmax(d <= 0))
        raise ValueError(
            f"{path}: step numbers do not increase (step {steps[k]} then {steps[k + 1]}, frame {k + 1}); "
            "a restarted run? give each segment as its own file or remove the repeated steps"
        )
    if np.any(d != d[0]):
        k = int(np.argmax(d != d[0]))
        raise ValueError(
            f"{path}: frames are not equally spaced (step {steps[k]} then {steps[k + 1]}, "
            f"expected stride {d[0]})"
        )
    return int(d[0])


def _floats(path: Path, lineno: int, text: str, expected: int | None = None) -> list[float]:
    parts = text.split()
    if expected is not None and len(parts) != expected:
        hint = " (truncated file?)" if len(parts) < expected else ""
        raise ValueError(f"{path}: line {lineno}: expected {expected} numbers, found {len(parts)}{hint}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ValueError(f"{path}: line {lineno}: not a number in {text.strip()!r}") from None
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{path}: line {lineno}: NaN or inf value")
    return values


def _read_ipi(path: Path):
    dipoles: list[list[float]] = []
    steps: list[int] = []
    pending: tuple[int, int] | None = None  # (line number, step) of a header still waiting for its data
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            if not s:
                continue
            m = _IPI_HEADER.match(s)
            if m:
                if pending is not None:
                    raise ValueError(f"{path}: line {pending[0]}: header of step {pending[1]} has no data")
                kind, extra_type, step = m.group(1), m.group(2).strip(), int(m.group(3))
                if kind.upper() != "EXTRAS":
                    raise ValueError(f"{path}: line {lineno}: {kind} output, expected EXTRAS (a per-bead extras file)")
                if extra_type != "dipole":
                    raise ValueError(
                        f"{path}: line {lineno}: extras of type {extra_type!r}, expected 'dipole' "
                        "(write them with <trajectory extra_type='dipole'> extras </trajectory>)"
                    )
                pending = (lineno, step)
                continue
            if pending is None:
                raise ValueError(f"{path}: line {lineno}: data before any '#EXTRAS(dipole)# Step:' header")
            dipoles.append(_floats(path, lineno, s, expected=3))
            steps.append(pending[1])
            pending = None
    if pending is not None:
        raise ValueError(f"{path}: line {pending[0]}: header of step {pending[1]} has no data (truncated file?)")
    if not dipoles:
        raise ValueError(f"{path}: no dipole frames found")
    return np.asarray(dipoles), np.asarray(steps)


def _read_text(path: Path):
    rows: list[list[float]] = []
    width = None
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            n = len(s.split())
            if width is None:
                if n not in (3, 4):
                    raise ValueError(
                        f"{path}: line {lineno}: expected 3 columns (mu_x mu_y mu_z) or 4 (step mu_x mu_y mu_z), found {n}"
                    )
                width = n
            rows.append(_floats(path, lineno, s, expected=width))
    if not rows:
        raise ValueError(f"{path}: no data rows")
    data = np.asarray(rows)
    if width == 4:
        if np.any(data[:, 0] != np.round(data[:, 0])):
            raise ValueError(f"{path}: first of 4 columns must be an integer step number")
        return data[:, 1:], data[:, 0].astype(np.int64)
    return data, None


def _read_npz(path: Path):
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "dipoles" if "dipoles" in keys else ("dipole" if "dipole" in keys else None)
            if key is None:
                raise ValueError(f"{path}: no 'dipoles' array (found: {', '.join(keys) or 'nothing'})")
            dip = np.asarray(z[key], dtype=float)
            steps = np.asarray(z["steps"]) if "steps" in keys else None
    except ValueError:
        raise
    except Exception as exc:  # zipfile/pickle errors of a damaged file
        raise ValueError(f"{path}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if dip.ndim != 2 or dip.shape[1] != 3:
        raise ValueError(f"{path}: '{key}' has shape {dip.shape}, expected (n_frames, 3)")
    bad = ~np.all(np.isfinite(dip), axis=1)
    if np.any(bad):
        raise ValueError(f"{path}: frame {int(np.argmax(bad))}: NaN or inf dipole")
    if steps is not None and steps.shape != (len(dip),):
        raise ValueError(f"{path}: 'steps' has shape {steps.shape}, expected ({len(dip)},)")
    return dip, steps


def _read_extxyz(path: Path):
    from ase.io import read

    try:
        frames = read(str(path), index=":", format="extxyz")
    except Exception as exc:  # ASE raises many kinds for a malformed file
        raise ValueError(f"{path}: not a readable extxyz file ({exc.__class__.__name__}: {exc})") from None
    if not frames:
        raise ValueError(f"{path}: no frames")
    dipoles, steps = [], []
    for k, atoms in enumerate(frames):
        d = atoms.info.get("dipole")
        if d is None and atoms.calc is not None and "dipole" in getattr(atoms.calc, "results", {}):
            d = atoms.calc.results["dipole"]
        if d is None:
            raise ValueError(f"{path}: frame {k}: no dipole (expected a per-frame 'dipole' property)")
        d = np.asarray(d, dtype=float).reshape(-1)
        if d.shape != (3,):
            raise ValueError(f"{path}: frame {k}: dipole has {d.size} components, expected 3")
        if not np.all(np.isfinite(d)):
            raise ValueError(f"{path}: frame {k}: NaN or inf dipole")
        dipoles.append(d)
        steps.append(atoms.info.get("step"))
    has_steps = all(s is not None for s in steps)
    return np.asarray(dipoles), (np.asarray(steps, dtype=np.int64) if has_steps else None)


def write_dipoles_npz(path: str | os.PathLike, dipoles_eA: np.ndarray, steps: np.ndarray | None = None) -> None:
    """Write dipoles (e·Å) and optional step numbers as an ``.npz`` readable by :func:`read_dipoles` (atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent or ".")
    os.close(fd)
    try:
        arrays = {"dipoles": np.asarray(dipoles_eA, dtype=float)}
        if steps is not None:
            arrays["steps"] = np.asarray(steps)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
