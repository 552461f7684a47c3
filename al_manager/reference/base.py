"""One interface for every reference method (ORCA, PySCF, GFN2-xTB).

A backend turns a structure into labels in ASE units::

    backend = get_backend("xtb")
    lab = backend.label(atoms)           # Label(energy eV, forces eV/Å, dipole e·Å)
    har = backend.harmonic(atoms)        # spectra.harmonic.HarmonicIR (frequencies cm^-1, intensities km/mol, modes)
    relaxed = backend.relax(atoms)       # a new Atoms at a local minimum

``backend.method`` is the string stored with every label (``method`` key of the dataset), and
``backend.calculator()`` returns an ASE calculator at the same level, for ASE tools (optimizers,
``Vibrations``, ``Infrared``, global search).

This module also owns what every backend shares: the input checks run before any calculation
(:func:`check_structure`: atoms closer than 0.5 Å, elements the method cannot treat, odd electron
counts without a multiplicity), the default :meth:`ReferenceBackend.label` through the backend's ASE
calculator, :meth:`ReferenceBackend.harmonic` through ASE ``Infrared`` (finite differences of forces and
dipoles) and :meth:`ReferenceBackend.relax` through an ASE optimizer.

Charge and spin: a backend has a default ``charge`` (0) and ``multiplicity`` (None = singlet when the
electron count is even, refused when odd); a structure may override both with
``atoms.info["charge"]`` / ``atoms.info["multiplicity"]``.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib
import inspect
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from driver.geometry_checks import non_finite, too_close
from spectra.harmonic import HarmonicIR, from_infrared

#: 1 (D/Å)^2 amu^-1 (ASE ``Infrared`` intensity unit) in km/mol.
#: Atoms closer than this (Å) are refused: such a frame is broken, not a high-energy configuration.
MIN_DISTANCE = 0.5


class ReferenceError(RuntimeError):
    """A reference calculation failed (SCF not converged, program crashed): the frame is recorded as failed."""


@dataclass
class Label:
    energy: float            # eV
    forces: np.ndarray       # (N, 3) eV/Å
    dipole: np.ndarray       # (3,) e·Å
    info: dict = field(default_factory=dict)




# --------------------------------------------------------------------------------------------------
# input checks

def spin_state(atoms: Atoms, charge: int = 0, multiplicity: int | None = None,
               frame: str = "structure") -> tuple[int, int]:
    """(charge, multiplicity) of a structure; ``atoms.info`` overrides the backend defaults.

    Raises ValueError naming ``frame`` when the electron count is odd and no multiplicity was given,
    or when the multiplicity cannot match the electron count.
    """
    charge = int(atoms.info.get("charge", charge))
    multiplicity = atoms.info.get("multiplicity", multiplicity)
    n_electrons = int(np.sum(atoms.numbers)) - charge
    if n_electrons <= 0:
        raise ValueError(f"{frame}: charge {charge:+d} leaves {n_electrons} electrons")
    if multiplicity is None:
        if n_electrons % 2:
            raise ValueError(f"{frame}: odd number of electrons ({n_electrons}, charge {charge:+d}) and no "
                             "multiplicity given; set one (atoms.info['multiplicity'] or the backend option "
                             "multiplicity=2)")
        return charge, 1
    multiplicity = int(multiplicity)
    unpaired = multiplicity - 1
    if unpaired < 0 or unpaired > n_electrons or (n_electrons - unpaired) % 2:
        raise ValueError(f"{frame}: multiplicity {multiplicity} is impossible with {n_electrons} electrons")
    return charge, multiplicity


def check_structure(atoms: Atoms, *, frame: str = "structure", supported_numbers=None,
                    charge: int = 0, multiplicity: int | None = None,
                    min_distance: float = MIN_DISTANCE, method: str = "") -> tuple[int, int]:
    """Refuse a structure no reference calculation should see; returns its (charge, multiplicity).

    Every message is one line starting with ``frame``.
    """
    if len(atoms) == 0:
        raise ValueError(f"{frame}: no atoms")
    why = non_finite(atoms.positions)
    if why:
        raise ValueError(f"{frame}: {why}")
    if atoms.pbc.any():
        raise ValueError(f"{frame}: periodic cell given; the reference backends treat isolated clusters only")
    if supported_numbers is not None:
        for z in sorted(set(int(z) for z in atoms.numbers)):
            if z not in supported_numbers:
                sym = chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"
                raise ValueError(f"{frame}: element {sym} is not available for {method or 'this method'}")
    why = too_close(atoms.numbers, atoms.positions, min_distance)
    if why:
        raise ValueError(f"{frame}: {why}")
    return spin_state(atoms, charge, multiplicity, frame)


def set_num_threads(n: int) -> None:
    """Limit OpenMP/BLAS threads of this process to ``n``.

    The environment variables only act on libraries loaded later; for an OpenMP runtime already
    loaded (tblite, PySCF) the thread count is also set through its C API.
    """
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    try:
        ctypes.CDLL("libgomp.so.1", mode=ctypes.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 0)).omp_set_num_threads(n)
    except (OSError, AttributeError):
        pass  # runtime not loaded yet: the environment variable will do
    if "pyscf" in sys.modules:
        sys.modules["pyscf"].lib.num_threads(n)


# --------------------------------------------------------------------------------------------------
# the interface

class ReferenceBackend:
    """Base class; subclasses set ``name`` and ``method`` and implement :meth:`calculator`.

    A subclass usually only provides ``_calculator_for(charge, multiplicity)`` (an ASE calculator
    returning energy, forces and dipole in ASE units) and ``supported_numbers``; :meth:`label`,
    :meth:`harmonic` and :meth:`relax` then work through it. Subclasses with a faster direct path
    (PySCF) override :meth:`label`.
    """

    name: str = ""
    method: str = ""
    #: how :meth:`harmonic` differentiates when it ignores ``delta``/``nfree`` (ORCA's ``Freq``); None:
    #: finite differences of :meth:`label` gradients
    analytic_hessian: str | None = None
    #: atomic numbers the method can treat (None: anything)
    supported_numbers: frozenset | None = None
    charge: int = 0
    multiplicity: int | None = None

    # -- hooks ------------------------------------------------------------------------------------
    def _calculator_for(self, charge: int, multiplicity: int):  # pragma: no cover - abstract
        raise NotImplementedError

    def calculator(self):
        """An ASE calculator at this backend's level, with the backend's charge and multiplicity
        (multiplicity 1 when none was set)."""
        return self._calculator_for(int(self.charge), int(self.multiplicity or 1))

    def check_available(self) -> None:
        """Raise FileNotFoundError/ImportError with a how-to-fix message when the backend cannot run."""

    def check(self, atoms: Atoms, frame: str = "structure") -> tuple[int, int]:
        """Input checks (see :func:`check_structure`); returns (charge, multiplicity)."""
        return check_structure(atoms, frame=frame, supported_numbers=self.supported_numbers,
                               charge=self.charge, multiplicity=self.multiplicity, method=self.method)

    def _fresh(self, atoms: Atoms, charge: int, multiplicity: int) -> Atoms:
        work = Atoms(numbers=atoms.numbers, positions=atoms.positions)
        work.calc = self._calculator_for(charge, multiplicity)
        return work

    # -- the interface ----------------------------------------------------------------------------
    def label(self, atoms: Atoms) -> Label:
        """Energy (eV), forces (eV/Å) and dipole (e·Å) of one structure.

        Raises ValueError for refused input and :class:`ReferenceError` when the calculation fails.
        """
        charge, mult = self.check(atoms)
        work = self._fresh(atoms, charge, mult)
        t0 = time.perf_counter()
        try:
            energy = float(work.get_potential_energy())
            forces = np.array(work.get_forces(), dtype=float)
            dipole = np.array(work.get_dipole_moment(), dtype=float).reshape(3)
        except ReferenceError:
            raise
        except Exception as exc:  # a crash of the program or library is a failed label, not a crash of ours
            raise ReferenceError(f"{self.name}: {type(exc).__name__}: {_one_line(exc)}") from exc
        return _checked_label(self.name, energy, forces, dipole,
                              {"seconds": time.perf_counter() - t0, "charge": charge, "multiplicity": mult})

    def harmonic(self, atoms: Atoms, *, delta: float = 0.01, nfree: int = 2,
                 workdir: str | Path | None = None) -> HarmonicIR:
        """Harmonic frequencies and IR intensities by finite differences (ASE ``Infrared``) at the given
        geometry (relax it first). ``delta`` in Å; displaced results are cached in ``workdir`` when given
        (a restarted run reuses them), in a temporary folder otherwise."""
        from ase.vibrations import Infrared

        charge, mult = self.check(atoms)
        work = self._fresh(atoms, charge, mult)
        with tempfile.TemporaryDirectory(prefix="nanosil-ir-") as tmp:
            cache = Path(workdir) if workdir is not None else Path(tmp)
            cache.mkdir(parents=True, exist_ok=True)
            # the cache is keyed by everything that changes the displaced results: never reuse stale ones
            key = hashlib.sha256(np.asarray(atoms.numbers, dtype=np.int64).tobytes()
                                 + np.round(atoms.positions, 8).tobytes()
                                 + f"{self.method}|{charge}|{mult}|{delta}|{nfree}".encode()).hexdigest()[:16]
            ir = Infrared(work, name=str(cache / f"ir-{key}"), delta=delta, nfree=nfree)
            try:
                ir.run()
                ir.read()
            except ReferenceError:
                raise
            except Exception as exc:
                raise ReferenceError(f"{self.name} harmonic: {type(exc).__name__}: {_one_line(exc)}") from exc
            return from_infrared(ir, method=self.method)

    def relax(self, atoms: Atoms, fmax: float = 0.01, *, steps: int = 1000, optimizer: str = "BFGS",
              logfile: str | None = None, trajectory: str | None = None) -> Atoms:
        """A new Atoms relaxed to max force ``fmax`` (eV/Å) with an ASE optimizer; it carries the final
        energy, forces and dipole. Raises :class:`ReferenceError` when not converged within ``steps``."""
        import ase.optimize
        from ase.calculators.singlepoint import SinglePointCalculator

        charge, mult = self.check(atoms)
        work = self._fresh(atoms, charge, mult)
        work.info.update({k: v for k, v in atoms.info.items() if k in ("charge", "multiplicity")})
        opt = getattr(ase.optimize, optimizer)(work, logfile=logfile, trajectory=trajectory)
        try:
            converged = opt.run(fmax=fmax, steps=steps)
            results = {"energy": work.get_potential_energy(), "forces": work.get_forces(),
                       "dipole": work.get_dipole_moment()}
        except ReferenceError:
            raise
        except Exception as exc:
            raise ReferenceError(f"{self.name} relax: {type(exc).__name__}: {_one_line(exc)}") from exc
        if not converged:
            raise ReferenceError(f"{self.name} relax: not converged to fmax={fmax} eV/Å in {steps} steps")
        out = Atoms(numbers=work.numbers, positions=work.positions, info=dict(atoms.info))
        out.calc = SinglePointCalculator(out, **results)
        return out


def _checked_label(name: str, energy, forces, dipole, info: dict) -> Label:
    if not (np.isfinite(energy) and np.all(np.isfinite(forces)) and np.all(np.isfinite(dipole))):
        raise ReferenceError(f"{name}: non-finite energy, forces or dipole (unconverged wavefunction?)")
    return Label(energy=float(energy), forces=np.asarray(forces, dtype=float),
                 dipole=np.asarray(dipole, dtype=float).reshape(3), info=info)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BACKENDS = {
    "xtb": "al_manager.reference.xtb:XTBBackend",
    "pyscf": "al_manager.reference.pyscf_backend:PySCFBackend",
    "orca": "al_manager.reference.orca:OrcaBackend",
}


def backend_class(name: str) -> type[ReferenceBackend]:
    """The class of a backend by name (``xtb``, ``pyscf``, ``orca``), not instantiated."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown reference backend {name!r}; choose from {', '.join(_BACKENDS)}")
    module, cls_name = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls_name)


def get_backend(name: str, **options) -> ReferenceBackend:
    """A backend by name (``xtb``, ``pyscf``, ``orca``); options go to its constructor."""
    cls = backend_class(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        known = ", ".join(p for p in inspect.signature(cls).parameters)
        raise ValueError(f"backend {name!r}: {exc}; its options are: {known}") from None
    return cls(**options)
