"""The labelled dataset: an ASE database (SQLite) of structures with reference labels.

Every row holds an ``Atoms`` with a single-point result: energy (eV), forces (eV/Å), dipole (e·Å),
and key-value metadata:

==============  ========================================================================
key             meaning
==============  ========================================================================
``cluster``     a name such as ``P2`` or ``pyroxene_N02_GM``
``origin``      ``normal_modes``, ``minimum``, ``al_iter_007``, ``test``, ``import`` ...
``temperature`` sampling temperature in K (AL frames), absent otherwise
``method``      reference method, e.g. ``xtb:GFN2-xTB`` or ``pyscf:PBE0/def2-SVP``
``hash``        :func:`structure_hash` of (numbers, positions, method): never label twice
==============  ========================================================================

Writes go one row per transaction (``ase.db`` commits every ``write``), so a crash loses at most
the calculations in flight. Concurrent writers are serialised by SQLite's own file locks, which the
kernel releases when a process dies (even by SIGKILL); ASE's ``DATA.db.lock`` file is not used, since a
process killed while holding it would leave it behind and every later run would wait forever.

A path that is a folder, a file that is not SQLite, or a damaged database raises :class:`DatasetError`
(a ValueError whose message names the file).
"""
from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

DEFAULT_SEED = 20231
VALIDATION_FRACTION = 0.1


def structure_hash(numbers, positions, method: str = "") -> str:
    """Stable identity of a structure for a given reference method (positions rounded to 1e-6 Å)."""
    h = hashlib.sha256()
    h.update(np.asarray(numbers, dtype=np.int64).tobytes())
    h.update(np.round(np.asarray(positions, dtype=np.float64), 6).tobytes())
    h.update(method.encode())
    return h.hexdigest()[:32]


SQLITE_MAGIC = b"SQLite format 3\x00"


class DatasetError(ValueError):
    """A dataset path that is not a readable ASE SQLite database (the message names the file)."""


def _check_database_file(path: Path) -> None:
    if path.is_dir():
        raise DatasetError(f"dataset {path} is a folder, not an ASE SQLite database file")
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise DatasetError(f"dataset {path} cannot be read: {exc.strerror or exc}") from None
        if head and head != SQLITE_MAGIC:  # an empty file is a new, empty database to SQLite
            raise DatasetError(f"dataset {path} is not an SQLite database (ASE .db); give a database "
                               f"written by `nanosil label` or ase.db")


def database_error(path, exc: sqlite3.Error) -> DatasetError:
    """One-line error for an sqlite3 failure on the dataset ``path``."""
    return DatasetError(f"dataset {path}: {' '.join(str(exc).split())} (SQLite)")


def connect(path: str | Path):
    """Open (or create) a dataset. The parent folder is created when missing.

    Uses SQLite's locking, not ASE's lock file (see the module docstring)."""
    import ase.db

    path = Path(path)
    _check_database_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return ase.db.connect(str(path), type="db", use_lock_file=False)


def add_labelled(db, atoms: Atoms, energy: float, forces, dipole=None, *, method: str,
                 cluster: str = "", origin: str = "", temperature: float | None = None,
                 **extra) -> int:
    """Write one labelled structure (one transaction) and return its row id."""
    atoms = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    results = {"energy": float(energy), "forces": np.asarray(forces, dtype=float).reshape(len(atoms), 3)}
    if dipole is not None:
        results["dipole"] = np.asarray(dipole, dtype=float).reshape(3)
    atoms.calc = SinglePointCalculator(atoms, **results)
    kv = dict(method=method, cluster=cluster, origin=origin,
              hash=structure_hash(atoms.numbers, atoms.positions, method), **extra)
    if temperature is not None:
        kv["temperature"] = float(temperature)
    try:
        return db.write(atoms, key_value_pairs=kv)
    except sqlite3.Error as exc:
        raise database_error(getattr(db, "filename", "?"), exc) from exc


def known_hashes(db) -> set[str]:
    try:
        return {row.get("hash") for row in db.select(columns=["key_value_pairs"]) if row.get("hash")}
    except sqlite3.Error as exc:
        raise database_error(getattr(db, "filename", "?"), exc) from exc


@dataclass
class Frame:
    """One labelled structure as arrays (what training consumes)."""

    numbers: np.ndarray        # (N,) atomic numbers
    positions: np.ndarray      # (N, 3) Å
    energy: float              # eV
    forces: np.ndarray         # (N, 3) eV/Å
    dipole: np.ndarray | None  # (3,) e·Å
    hash: str = ""
    origin: str = ""
    cluster: str = ""


def frame_from_atoms(atoms: Atoms, **meta) -> Frame:
    """A :class:`Frame` from an ``Atoms`` carrying a calculator with energy and forces (dipole optional)."""
    calc = atoms.calc
    if calc is None:
        raise ValueError("structure has no labels (energy/forces)")
    dip = calc.results.get("dipole")
    return Frame(numbers=atoms.numbers.copy(), positions=atoms.positions.copy(),
                 energy=float(atoms.get_potential_energy()), forces=np.array(atoms.get_forces()),
                 dipole=None if dip is None else np.asarray(dip, dtype=float),
                 hash=meta.get("hash") or structure_hash(atoms.numbers, atoms.positions),
                 origin=meta.get("origin", ""), cluster=meta.get("cluster", ""))


def label_methods(db) -> dict[str, int]:
    """Reference method -> number of labels in the database ``db``."""
    counts: dict[str, int] = {}
    try:
        for row in db.select(columns=["key_value_pairs"]):
            m = row.get("method", "")
            counts[m] = counts.get(m, 0) + 1
    except sqlite3.Error as exc:
        raise database_error(getattr(db, "filename", "?"), exc) from exc
    return counts


def read_frames(path: str | Path, selection=None, method: str | None = None) -> list[Frame]:
    """All labelled rows of a database (or an ASE-readable file such as .traj / extxyz). A database that
    holds labels of several reference methods is refused unless ``method`` picks one: they are different
    potential-energy surfaces and are never mixed silently.

    Raises FileNotFoundError for a missing path and :class:`DatasetError` (naming the file, and the row
    or frame) for a folder, an empty file, a file that is not a database or not readable, or a structure
    without labels."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    if path.is_dir():
        raise DatasetError(f"dataset {path} is a folder, not a database or structure file")
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset {path} is an empty file (no structures)")
    if path.suffix == ".db":
        db = connect(path)
        frames = []
        methods = label_methods(db)
        if method is None and len(methods) > 1:
            raise DatasetError(f"dataset {path} mixes labels of several reference methods ("
                               + ", ".join(f"{m}: {n}" for m, n in methods.items())
                               + "); a model learns one surface: give one method (e.g. --method NAME)")
        if method is not None:
            if method not in methods:
                raise DatasetError(f"dataset {path} has no labels of method {method!r}; it holds "
                                   + (", ".join(methods) or "none"))
            selection = f"method={method}" if selection is None else f"{selection},method={method}"
        try:
            for row in db.select(selection):
                atoms = row.toatoms(add_additional_information=False)
                try:
                    frames.append(frame_from_atoms(atoms, hash=row.get("hash", ""), origin=row.get("origin", ""),
                                                   cluster=row.get("cluster", "")))
                except ValueError as exc:
                    raise DatasetError(f"dataset {path} row {row.id}: {exc}") from None
        except sqlite3.Error as exc:
            raise database_error(path, exc) from None
        return frames
    from ase.io import read

    try:
        images = read(str(path), index=":")
    except Exception as exc:  # ASE raises many kinds for a malformed file
        from ipi_inputs.files import xyz_problem

        problem = xyz_problem(path) if path.suffix.lower() in (".xyz", ".extxyz") else None
        raise DatasetError(problem or f"dataset {path} cannot be read: {' '.join(str(exc).split())}") from None
    frames = []
    for i, atoms in enumerate(images):
        try:
            frames.append(frame_from_atoms(atoms))
        except ValueError as exc:
            raise DatasetError(f"dataset {path} frame {i}: {exc}") from None
        except Exception as exc:  # ASE's PropertyNotImplementedError and kin: energy or forces missing
            raise DatasetError(f"dataset {path} frame {i}: no energy/forces labels ({type(exc).__name__})") from None
    return frames


def split_train_validation(frames: list[Frame], seed: int = DEFAULT_SEED,
                           validation_fraction: float = VALIDATION_FRACTION) -> tuple[list[Frame], list[Frame]]:
    """Fixed 9:1 split. Frames are ordered by a seeded hash of their identity, so a frame keeps its side
    of the split as active learning adds data; ``origin == 'test'`` frames are never used."""
    usable = [f for f in frames if f.origin != "test"]
    keyed = sorted(usable, key=lambda f: hashlib.sha256(f"{seed}:{f.hash or structure_hash(f.numbers, f.positions)}".encode()).hexdigest())
    n_val = max(1, int(round(validation_fraction * len(keyed)))) if len(keyed) >= 2 else 0
    return keyed[n_val:], keyed[:n_val]
