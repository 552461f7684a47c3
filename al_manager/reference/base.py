"""One interface for every reference method (ORCA, PySCF, GFN2-xTB).

A backend turns a structure into labels in ASE units::

    backend = get_backend("xtb")
    lab = backend.label(atoms)           # Label(energy eV, forces eV/Å, dipole e·Å)
    har = backend.harmonic(atoms)        # Harmonic(frequencies cm^-1, intensities km/mol, modes)
    relaxed = backend.relax(atoms)       # a new Atoms at a local minimum

``backend.method`` is the string stored with every label (``method`` key of the dataset), and
``backend.calculator()`` returns an ASE calculator at the same level, for ASE tools (optimizers,
``Vibrations``, ``Infrared``, global search).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms


class ReferenceError(RuntimeError):
    """A reference calculation failed (SCF not converged, program crashed): the frame is recorded as failed."""


@dataclass
class Label:
    energy: float            # eV
    forces: np.ndarray       # (N, 3) eV/Å
    dipole: np.ndarray       # (3,) e·Å
    info: dict = field(default_factory=dict)


@dataclass
class Harmonic:
    frequencies: np.ndarray  # (3N,) cm^-1, ascending; imaginary modes as negative numbers
    intensities: np.ndarray  # (3N,) km/mol
    modes: np.ndarray        # (3N, N, 3) mass-weighted-normalised Cartesian displacements (ASE convention)


class ReferenceBackend:
    """Base class; subclasses set ``name`` and ``method`` and implement :meth:`calculator`."""

    name: str = ""
    method: str = ""

    def calculator(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self, atoms: Atoms) -> Label:  # pragma: no cover - implemented by subclasses/helpers
        raise NotImplementedError

    def harmonic(self, atoms: Atoms) -> Harmonic:  # pragma: no cover
        raise NotImplementedError

    def relax(self, atoms: Atoms, fmax: float = 0.01) -> Atoms:  # pragma: no cover
        raise NotImplementedError


_BACKENDS = {
    "xtb": "al_manager.reference.xtb:XTBBackend",
    "pyscf": "al_manager.reference.pyscf_backend:PySCFBackend",
    "orca": "al_manager.reference.orca:OrcaBackend",
}


def get_backend(name: str, **options) -> ReferenceBackend:
    """A backend by name (``xtb``, ``pyscf``, ``orca``); options go to its constructor."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown reference backend {name!r}; choose from {', '.join(_BACKENDS)}")
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
