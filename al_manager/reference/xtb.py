"""GFN2-xTB backend through tblite's ASE calculator: the fast embedded default for demos and tests.

Facts that shaped it (see ../shared/notes/reference-backends.md):

* one OpenMP thread per process: parallelism comes from processes (on a busy 2-core machine two
  threads were 20-60x slower);
* tblite's ASE calculator returns the dipole in e·Å (ASE units), although its docstring says Debye;
* the SCF can fail on larger clusters ("SCF not converged in 250 cycles"): tblite raises, and
  :meth:`ReferenceBackend.label` turns that into a :class:`ReferenceError`, i.e. a recorded failure.

GFN2-xTB dipoles are only qualitative for these clusters (7.6 D vs PBE0 11.9 D for MgSiO3).
"""
from __future__ import annotations

from .base import ReferenceBackend, set_num_threads


class XTBBackend(ReferenceBackend):
    """GFN2-xTB (tblite). Options: ``charge``, ``multiplicity``, ``accuracy``, ``electronic_temperature`` (K),
    ``max_iterations`` (SCF cycles), ``guess`` ("sad" | "eeq"), ``threads`` (OpenMP threads, default 1)."""

    name = "xtb"
    method = "xtb:GFN2-xTB"
    supported_numbers = frozenset(range(1, 87))  # GFN2-xTB parameters: H to Rn

    def __init__(self, *, charge: int = 0, multiplicity: int | None = None, accuracy: float = 1.0,
                 electronic_temperature: float = 300.0, max_iterations: int = 250, guess: str = "sad",
                 threads: int = 1):
        self.charge, self.multiplicity = int(charge), multiplicity
        self.accuracy = float(accuracy)
        self.electronic_temperature = float(electronic_temperature)
        self.max_iterations = int(max_iterations)
        self.guess = guess
        self.threads = int(threads)

    def check_available(self) -> None:
        import tblite.ase  # noqa: F401  (ImportError names the package)

    def _calculator_for(self, charge: int, multiplicity: int):
        set_num_threads(self.threads)  # before tblite loads its OpenMP runtime, where possible
        from tblite.ase import TBLite

        return TBLite(method="GFN2-xTB", charge=charge, multiplicity=multiplicity, accuracy=self.accuracy,
                      electronic_temperature=self.electronic_temperature,
                      max_iterations=self.max_iterations, guess=self.guess, verbosity=0)
