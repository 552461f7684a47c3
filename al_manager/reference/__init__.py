"""Reference (ground-truth) calculations behind one interface: see :mod:`al_manager.reference.base`.

``get_backend("xtb" | "pyscf" | "orca")`` gives a backend; :func:`label_structures` labels many
structures in parallel into the dataset (see :mod:`al_manager.reference.labelling`).
"""
from spectra.harmonic import HarmonicIR

from .base import Label, ReferenceBackend, ReferenceError, get_backend
from .labelling import LabelReport, label_structures

__all__ = ["Label", "HarmonicIR", "ReferenceBackend", "ReferenceError", "get_backend", "LabelReport",
           "label_structures"]
