"""PySCF backend: Kohn-Sham PBE0/def2-SVP with density fitting, the open same-level stand-in for ORCA.

The paper's ORCA input is ``PBE0 def2-SVP def2/J RIJCOSX TightSCF`` (fitted Coulomb, seminumerical
exchange). PySCF has no COSX; the choices are

* ``density_fit="rij"`` (default): fitted Coulomb (``def2-universal-jfit``, ``only_dfj=True``) + exact
  exchange, the analogue of ORCA's RIJ part with exchange left unfitted as COSX approximates it.
  On 3 strongly displaced P2 structures of the paper's data (up to 45 eV above the minimum) it agrees
  with the ORCA labels to 0.10 meV/atom (relative energies), 0.009 eV/Å (forces, MAE) and 0.0002 D.
* ``density_fit="rijk"``: Coulomb and exchange fitted with ``def2-universal-jkfit``: ~1.6x faster, but the
  exchange fitting error grows for compressed geometries: 0.93 meV/atom (max 1.4), 0.010 eV/Å, 0.001 D on
  the same structures. Use it for speed, or when PySCF's analytic Hessian is wanted (the Hessian of an
  RI-J SCF fits exchange with the SCF's basis and gives wrong frequencies).
* ``density_fit=None``: no fitting (slowest).

(``density_fit(auxbasis='def2-universal-jfit')`` without ``only_dfj`` would fit the exchange with a
Coulomb basis and be ~20 eV off.) ``bench/reference_accuracy.py`` measures these figures.

SCF: ``conv_tol`` 1e-9 Eh ("tight"); a non-converged SCF is retried from its last density with damping
and a level shift, then with second-order (Newton) SCF; still failing raises
:class:`~al_manager.reference.base.ReferenceError`. Gradients use ``grid_response=True`` (without it
the forces miss finite differences by ~1e-5 Eh/bohr and do not sum to zero). Dipoles are returned in
e·Å about the coordinate origin.

GPU: with ``use_gpu="auto"`` (default) the SCF and gradient run through gpu4pyscf (``mf.to_gpu()``)
when CUDA and gpu4pyscf are importable and a device is visible.
"""
from __future__ import annotations

import time
import warnings
from functools import lru_cache

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from .base import Label, ReferenceBackend, ReferenceError, _checked_label, check_structure, set_num_threads

_AUXBASIS = {"rijk": "def2-universal-jkfit", "rij": "def2-universal-jfit"}


@lru_cache(maxsize=1)
def gpu_available() -> bool:
    """True when gpu4pyscf and cupy import and at least one CUDA device is visible."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return False
        import gpu4pyscf  # noqa: F401
    except Exception:
        return False
    return True


def _numpy(x):
    """cupy -> numpy (gpu4pyscf results); numpy passes through."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    if hasattr(x, "get") and callable(x.get) and not isinstance(x, dict):
        return np.asarray(x.get())
    return np.asarray(x)


@lru_cache(maxsize=None)
def _basis_numbers(basis: str) -> frozenset:
    """Atomic numbers for which PySCF has ``basis``."""
    from ase.data import chemical_symbols
    from pyscf import gto

    ok = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "install basis-set-exchange" for every element not in the set
        for z in range(1, 87):
            try:
                if gto.basis.load(basis, chemical_symbols[z]):
                    ok.add(z)
            except Exception:
                pass
    return frozenset(ok)


class PySCFBackend(ReferenceBackend):
    """PBE0/def2-SVP (by default) with PySCF; see the module docstring for the choices.

    Options: ``xc``, ``basis``, ``density_fit`` ("rij" | "rijk" | None), ``auxbasis`` (overrides the
    default fitting basis), ``grid_level`` (PySCF grid level, 3 ~ ORCA DEFGRID2), ``conv_tol`` (Eh),
    ``max_cycle``, ``charge``, ``multiplicity``, ``threads`` (OpenMP threads, None = leave as is),
    ``max_memory`` (MB), ``use_gpu`` ("auto" | True | False), ``verbose`` (PySCF verbosity).
    """

    name = "pyscf"

    def __init__(self, *, xc: str = "PBE0", basis: str = "def2-svp", density_fit: str | None = "rij",
                 auxbasis: str | None = None, grid_level: int = 3, conv_tol: float = 1e-9,
                 max_cycle: int = 100, charge: int = 0, multiplicity: int | None = None,
                 threads: int | None = None, max_memory: int = 4000, use_gpu="auto", verbose: int = 0):
        if density_fit not in ("rijk", "rij", None):
            raise ValueError(f"density_fit must be 'rijk', 'rij' or None, not {density_fit!r}")
        if use_gpu not in ("auto", True, False):
            raise ValueError(f"use_gpu must be 'auto', True or False, not {use_gpu!r}")
        self.xc, self.basis, self.density_fit = xc, basis, density_fit
        self.auxbasis = auxbasis or _AUXBASIS.get(density_fit or "", None)
        self.grid_level, self.conv_tol, self.max_cycle = int(grid_level), float(conv_tol), int(max_cycle)
        self.charge, self.multiplicity = int(charge), multiplicity
        self.threads, self.max_memory, self.verbose = threads, int(max_memory), int(verbose)
        self.use_gpu = use_gpu
        basis_name = {"def2-svp": "def2-SVP"}.get(basis.lower(), basis)
        self.method = f"pyscf:{xc}/{basis_name}"

    # -- set-up --------------------------------------------------------------------------------------
    @property
    def supported_numbers(self) -> frozenset:
        return _basis_numbers(self.basis)

    @property
    def on_gpu(self) -> bool:
        if self.use_gpu == "auto":
            return gpu_available()
        if self.use_gpu and not gpu_available():
            raise ImportError("use_gpu=True but gpu4pyscf/cupy or a CUDA device is not available "
                              "(pip install gpu4pyscf-cuda12x)")
        return bool(self.use_gpu)

    def check_available(self) -> None:
        import pyscf  # noqa: F401  (ImportError names the package)
        self.on_gpu  # noqa: B018  (raises when a GPU was demanded and is missing)

    def _mole(self, atoms: Atoms, charge: int, multiplicity: int):
        from pyscf import gto

        mol = gto.Mole()
        mol.atom = [(s, tuple(p)) for s, p in zip(atoms.get_chemical_symbols(), atoms.positions)]
        mol.unit = "Angstrom"
        mol.basis = self.basis
        if self.basis.lower().startswith("def2") and int(np.max(atoms.numbers)) > 36:
            mol.ecp = self.basis  # def2 sets use effective core potentials from Rb on
        mol.charge = charge
        mol.spin = multiplicity - 1
        mol.verbose = self.verbose
        mol.max_memory = self.max_memory
        mol.build()
        return mol

    def _scf(self, mol):
        from pyscf import dft

        mf = dft.RKS(mol) if mol.spin == 0 else dft.UKS(mol)
        mf.xc = self.xc
        mf.grids.level = self.grid_level
        mf.conv_tol = self.conv_tol
        mf.max_cycle = self.max_cycle
        mf.max_memory = self.max_memory
        if self.density_fit == "rijk":
            mf = mf.density_fit(auxbasis=self.auxbasis)
        elif self.density_fit == "rij":
            mf = mf.density_fit(auxbasis=self.auxbasis, only_dfj=True)
        if self.on_gpu:
            mf = mf.to_gpu()
        return mf

    # -- the calculation -----------------------------------------------------------------------------
    def run_scf(self, atoms: Atoms, charge: int, multiplicity: int, dm0=None):
        """A converged SCF object for ``atoms`` (retries with damping/level shift, then Newton)."""
        if self.threads:
            set_num_threads(self.threads)
        mol = self._mole(atoms, charge, multiplicity)
        attempts = (("default", None), ("damping + level shift", "damp"), ("second-order (Newton)", "newton"))
        dm, last = dm0, None
        for n, (what, how) in enumerate(attempts, start=1):
            try:
                mf = self._scf(mol)
                if how == "damp":
                    mf.damp, mf.level_shift, mf.diis_start_cycle = 0.5, 0.3, 4
                    mf.max_cycle = 2 * self.max_cycle
                elif how == "newton":
                    mf = mf.newton()
                    mf.max_cycle = self.max_cycle
                energy = mf.kernel(dm0=dm)
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if mf.converged and np.isfinite(energy):
                mf._nanosil_attempts = n
                return mf
            last = f"not converged ({what}, {mf.max_cycle} cycles)"
            dm = mf.make_rdm1()  # the next attempt starts where this one stopped
        raise ReferenceError(f"pyscf: SCF not converged after {len(attempts)} attempts (default, damping + "
                             f"level shift, Newton); last: {last}")

    def compute(self, atoms: Atoms, charge: int, multiplicity: int, dm0=None) -> tuple[Label, object]:
        """Energy, forces and dipole (ASE units) and the converged SCF object."""
        t0 = time.perf_counter()
        mf = self.run_scf(atoms, charge, multiplicity, dm0=dm0)
        try:
            g = mf.nuc_grad_method()
            g.grid_response = True
            g.verbose = self.verbose
            grad = _numpy(g.kernel())  # Eh/bohr
            dip = _numpy(mf.dip_moment(mf.mol, mf.make_rdm1(), unit="AU", verbose=0))  # e·bohr, origin 0
        except Exception as exc:
            raise ReferenceError(f"pyscf: gradient/dipole failed: {type(exc).__name__}: {exc}") from exc
        info = {"seconds": time.perf_counter() - t0, "scf_attempts": getattr(mf, "_nanosil_attempts", 1),
                "charge": charge, "multiplicity": multiplicity, "gpu": self.on_gpu}
        label = _checked_label(self.name, float(mf.e_tot) * Hartree, -grad * Hartree / Bohr, dip * Bohr, info)
        return label, mf

    def label(self, atoms: Atoms) -> Label:
        charge, mult = self.check(atoms)
        label, _ = self.compute(atoms, charge, mult)
        return label

    def _calculator_for(self, charge: int, multiplicity: int):
        return PySCFCalculator(self, charge=charge, multiplicity=multiplicity)


class PySCFCalculator(Calculator):
    """ASE calculator around :class:`PySCFBackend` (energy eV, forces eV/Å, dipole e·Å).

    Every call computes energy, forces and dipole together; the previous density matrix is the
    starting guess of the next geometry (fewer SCF cycles in relaxations and finite differences).
    """

    implemented_properties = ["energy", "free_energy", "forces", "dipole"]

    def __init__(self, backend: PySCFBackend | None = None, *, charge: int = 0, multiplicity: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.backend = backend or PySCFBackend()
        self.charge, self.multiplicity = int(charge), int(multiplicity)
        self._dm = None
        self._dm_key = None

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        check_structure(self.atoms, supported_numbers=self.backend.supported_numbers, charge=self.charge,
                        multiplicity=self.multiplicity, method=self.backend.method)
        key = (tuple(self.atoms.numbers), self.charge, self.multiplicity)
        dm0 = self._dm if key == self._dm_key else None
        label, mf = self.backend.compute(self.atoms, self.charge, self.multiplicity, dm0=dm0)
        self._dm, self._dm_key = mf.make_rdm1(), key
        self.results = {"energy": label.energy, "free_energy": label.energy, "forces": label.forces,
                        "dipole": label.dipole}
