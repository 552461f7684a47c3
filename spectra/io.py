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

Per-member dipoles of a dipole committee (:func:`read_dipole_members`, for the committee band of a
spectrum) come as

``ipi``
    i-PI's ``<trajectory filename='dipole_members' extra_type='dipole_members'> extras </trajectory>``:
    the driver's extras key ``dipole_members``, a list of n_members lists of 3 numbers in e·Bohr like
    ``dipole``; i-PI prints, after each `` #EXTRAS(dipole_members)# Step:  N`` header, one line of three
    numbers per member (a single line of 3 x n_members numbers is read too).
``npz``
    array ``dipole_members`` of shape (n_members, n_frames, 3), e·Å by default; optional ``steps``.

``timestep_fs`` is always the MD time step. When a file carries step numbers the time between frames is
``timestep_fs * stride``; without step numbers frames are taken one time step apart.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import dipole_unit_factor

FORMATS = ("ipi", "extxyz", "npz", "text")
MEMBER_FORMATS = ("ipi", "npz")
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
        return int(self.dipoles.shape[-2])

    @property
    def duration_fs(self) -> float:
        return (self.n_frames - 1) * self.frame_interval_fs


@dataclass
class DipoleMembersSeries(DipoleSeries):
    """Dipoles of each committee member on one trajectory: ``dipoles`` (n_members, n_frames, 3) in e·Å."""

    @property
    def n_members(self) -> int:
        return int(self.dipoles.shape[0])


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
    path = _checked_file(path, timestep_fs)
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


def read_dipole_members(
    path: str | os.PathLike,
    timestep_fs: float,
    units: str | None = None,
    fmt: str | None = None,
) -> DipoleMembersSeries:
    """Per-member committee dipoles of one trajectory (formats ``ipi`` and ``npz``, module docstring).

    Same arguments as :func:`read_dipoles`; the result has ``dipoles`` (n_members, n_frames, 3) in e·Å.
    """
    path = _checked_file(path, timestep_fs)
    fmt = fmt or ("npz" if path.suffix.lower() == ".npz" else "ipi")
    if fmt not in MEMBER_FORMATS:
        raise ValueError(f"{path}: per-member dipoles are read from {' or '.join(MEMBER_FORMATS)} files, not {fmt!r}")
    factor = dipole_unit_factor(units or DEFAULT_UNITS[fmt])
    dipoles, steps = _read_ipi_members(path) if fmt == "ipi" else _read_npz_members(path)
    if dipoles.shape[1] < 3:
        raise ValueError(f"{path}: only {dipoles.shape[1]} frame(s); a spectrum needs many more")
    return DipoleMembersSeries(dipoles=dipoles * factor, frame_interval_fs=float(timestep_fs) * _stride(path, steps),
                               source=str(path), steps=None if steps is None else np.asarray(steps))


def check_same_trajectory(run: DipoleSeries, members: DipoleMembersSeries) -> None:
    """ValueError naming both files unless ``members`` has the frames of ``run`` (same interval, count, steps)."""
    if round(run.frame_interval_fs, 9) != round(members.frame_interval_fs, 9):
        raise ValueError(
            f"{members.source}: frames {members.frame_interval_fs:g} fs apart, but {run.source} has "
            f"{run.frame_interval_fs:g} fs: the per-member dipoles must come from the same run with the same stride"
        )
    if members.n_frames != run.n_frames:
        raise ValueError(f"{members.source}: {members.n_frames} frames, but {run.source} has {run.n_frames}: "
                         "not the same trajectory (or one file is truncated)")
    if run.steps is not None and members.steps is not None and not np.array_equal(run.steps, members.steps):
        k = int(np.argmax(np.asarray(run.steps) != np.asarray(members.steps)))
        raise ValueError(f"{members.source}: frame {k} is step {members.steps[k]}, but in {run.source} step "
                         f"{run.steps[k]}: not the same trajectory")


def _checked_file(path: str | os.PathLike, timestep_fs: float) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    if not (timestep_fs > 0 and np.isfinite(timestep_fs)):
        raise ValueError(f"timestep must be a positive number of fs, got {timestep_fs!r}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    return path


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


def _ipi_blocks(path: Path, extra_type: str):
    """``(header line, step, [(line number, text), ...])`` for each printed step of an i-PI extras file."""
    blocks: list[tuple[int, int, list[tuple[int, str]]]] = []
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.strip()
            if not s:
                continue
            m = _IPI_HEADER.match(s)
            if m is None:
                if not blocks:
                    raise ValueError(f"{path}: line {lineno}: data before any '#EXTRAS({extra_type})# Step:' header")
                blocks[-1][2].append((lineno, s))
                continue
            if blocks and not blocks[-1][2]:
                raise ValueError(f"{path}: line {blocks[-1][0]}: header of step {blocks[-1][1]} has no data")
            kind, found = m.group(1), m.group(2).strip()
            if kind.upper() != "EXTRAS":
                raise ValueError(f"{path}: line {lineno}: {kind} output, expected EXTRAS (a per-bead extras file)")
            if found != extra_type:
                raise ValueError(f"{path}: line {lineno}: extras of type {found!r}, expected {extra_type!r} "
                                 f"({_EXTRAS_HINT.get(found, _EXTRAS_HINT[extra_type])})")
            blocks.append((lineno, int(m.group(3)), []))
    if not blocks:
        raise ValueError(f"{path}: no dipole frames found")
    if not blocks[-1][2]:
        raise ValueError(f"{path}: line {blocks[-1][0]}: header of step {blocks[-1][1]} has no data (truncated file?)")
    return blocks


_EXTRAS_HINT = {
    "dipole": "write them with <trajectory extra_type='dipole'> extras </trajectory>",
    "dipole_members": "per-member dipoles: read them as the committee band (--committee-band), "
                      "written with <trajectory extra_type='dipole_members'> extras </trajectory>",
}


def _read_ipi(path: Path):
    dipoles, steps = [], []
    for header, step, lines in _ipi_blocks(path, "dipole"):
        if len(lines) > 1:
            raise ValueError(f"{path}: line {lines[1][0]}: {len(lines)} data lines after the header of step {step} "
                             f"(line {header}), expected 1")
        dipoles.append(_floats(path, lines[0][0], lines[0][1], expected=3))
        steps.append(step)
    return np.asarray(dipoles), np.asarray(steps)


def _read_ipi_members(path: Path):
    """(n_members, n_frames, 3) and the steps; every step must list the same number of members."""
    blocks = _ipi_blocks(path, "dipole_members")
    frames, steps = [], []
    for k, (header, step, lines) in enumerate(blocks):
        values = []
        for lineno, text in lines:
            row = _floats(path, lineno, text)
            if len(row) % 3:
                raise ValueError(f"{path}: line {lineno}: {len(row)} numbers, expected 3 per member (x y z)")
            values.extend(row)
        n = len(values) // 3
        if frames and n != len(frames[0]):
            hint = " (truncated file?)" if k == len(blocks) - 1 and n < len(frames[0]) else ""
            raise ValueError(f"{path}: line {header}: step {step} has {n} members, "
                             f"the first step has {len(frames[0])}{hint}")
        frames.append(np.reshape(values, (n, 3)))
        steps.append(step)
    return np.transpose(np.asarray(frames), (1, 0, 2)), np.asarray(steps)


def _load_npz(path: Path, keys: tuple[str, ...], ndim: int, expected: str):
    """(array, its key, steps or None) of the first of ``keys`` in an ``.npz``, checked: ``ndim`` dimensions
    with 3 components last, finite frames (axis -2), steps one per frame. Errors name the file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            found = list(z.keys())
            key = next((k for k in keys if k in found), None)
            if key is None:
                raise ValueError(f"{path}: no '{keys[0]}' array (found: {', '.join(found) or 'nothing'})")
            dip = np.asarray(z[key], dtype=float)
            steps = np.asarray(z["steps"]) if "steps" in found else None
    except ValueError:
        raise
    except Exception as exc:  # zipfile/pickle errors of a damaged file
        raise ValueError(f"{path}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    if dip.ndim != ndim or dip.shape[-1] != 3:
        raise ValueError(f"{path}: '{key}' has shape {dip.shape}, expected {expected}")
    bad = ~np.all(np.isfinite(dip), axis=tuple(a for a in range(ndim) if a != ndim - 2))
    if np.any(bad):
        raise ValueError(f"{path}: frame {int(np.argmax(bad))}: NaN or inf dipole")
    n_frames = dip.shape[-2]
    if steps is not None and steps.shape != (n_frames,):
        raise ValueError(f"{path}: 'steps' has shape {steps.shape}, expected ({n_frames},)")
    return dip, key, steps


def _read_npz_members(path: Path):
    dip, _, steps = _load_npz(path, ("dipole_members",), 3, "(n_members, n_frames, 3)")
    return dip, steps


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
    dip, _, steps = _load_npz(path, ("dipoles", "dipole"), 2, "(n_frames, 3)")
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
    _write_npz(path, {"dipoles": np.asarray(dipoles_eA, dtype=float)}, steps)


def write_dipole_members_npz(path: str | os.PathLike, members_eA: np.ndarray,
                             steps: np.ndarray | None = None) -> None:
    """Write per-member dipoles (n_members, n_frames, 3) in e·Å as an ``.npz`` for :func:`read_dipole_members`."""
    _write_npz(path, {"dipole_members": np.asarray(members_eA, dtype=float)}, steps)


def _write_npz(path: str | os.PathLike, arrays: dict, steps) -> None:
    from .atomic import write_with

    if steps is not None:
        arrays = dict(arrays, steps=np.asarray(steps))
    write_with(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
