"""Reference (ground-truth) calculations behind one interface: see :mod:`al_manager.reference.base`."""
from .base import Label, Harmonic, ReferenceBackend, ReferenceError, get_backend

__all__ = ["Label", "Harmonic", "ReferenceBackend", "ReferenceError", "get_backend"]
