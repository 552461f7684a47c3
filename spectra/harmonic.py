"""Harmonic IR: frequencies (cm^-1) and intensities (km/mol) from any ASE calculator.

Two routes, same numbers:

* ``ase``: ASE ``Infrared`` (``Vibrations`` plus finite-difference dipoles), 6N+1 calculations. ASE keeps
  intensities in (D/Å)^2/amu; they are multiplied here by 42.2561 km/mol (``constants.KM_MOL_PER_D2_A2_AMU``).
* ``autograd``: for calculators with ``calc.hessian(atoms)`` ((3N, 3N) eV/Å^2) and
  ``calc.dipole_derivatives(atoms)`` ((N, 3, 3) in e, [atom, cartesian a, dipole component b]), the exact
  derivatives go through :func:`harmonic_from_derivatives` (one call instead of 6N+1).

Neither route projects out translations and rotations by default (as ASE), so at a non-stationary
geometry the six near-zero modes are not exactly zero; ``project=True`` removes them.
Imaginary frequencies are returned as negative numbers.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units

from .constants import HBAR_EV, KM_MOL_PER_D2_A2_AMU, KM_MOL_PER_E2_AMU
from .atomic import write_text

METHODS = ("auto", "ase", "autograd")


@dataclass
class HarmonicIR:
    """Harmonic frequencies (cm^-1, ascending, imaginary as negative) and intensities (km/mol): the one
    harmonic type of nanosil, for the ML committee and every reference backend alike.

    ``modes``: (3N, N, 3) Cartesian displacements of unit mass-weighted norm (ASE's convention: the
    eigenvector of the mass-weighted Hessian divided by sqrt(m_i), so sum_i m_i |mode_i|^2 = 1), or None.
    """

    frequencies: np.ndarray
    intensities: np.ndarray
    modes: np.ndarray | None = None
    method: str = ""

    def __post_init__(self):
        self.frequencies = np.asarray(self.frequencies, dtype=float)
        self.intensities = np.asarray(self.intensities, dtype=float)
        if self.frequencies.shape != self.intensities.shape or self.frequencies.ndim != 1:
            raise ValueError(
                f"frequencies {self.frequencies.shape} and intensities {self.intensities.shape} differ in shape"
            )


def _eigen_to_wavenumber(omega2: np.ndarray) -> np.ndarray:
    """Eigenvalues of the mass-weighted Hessian (eV/(Å^2 amu)) -> cm^-1, imaginary as negative."""
    energy = HBAR_EV * np.sqrt(np.abs(omega2))
    return np.sign(omega2) * energy / units.invcm


def _rigid_body_basis(masses: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Orthonormal mass-weighted translation and rotation vectors (columns), 5 or 6 of them."""
    n = len(masses)
    sqm = np.sqrt(masses)
    com = (masses[:, None] * positions).sum(0) / masses.sum()
    r = positions - com
    vecs = []
    for a in range(3):
        v = np.zeros((n, 3))
        v[:, a] = sqm
        vecs.append(v.ravel())
    for a in range(3):
        axis = np.zeros(3)
        axis[a] = 1.0
        vecs.append((np.cross(axis, r) * sqm[:, None]).ravel())
    q, rr = np.linalg.qr(np.array(vecs).T)
    keep = np.abs(np.diag(rr)) > 1e-6 * np.abs(rr).max()
    return q[:, keep]


def harmonic_from_derivatives(
    masses: np.ndarray,
    hessian: np.ndarray,
    dipole_derivatives: np.ndarray | None,
    positions: np.ndarray | None = None,
    project: bool = False,
) -> HarmonicIR:
    """Frequencies and intensities from a Cartesian Hessian and dipole derivatives.

    masses (N,) amu; hessian (3N, 3N) eV/Å^2 (symmetrised here); dipole_derivatives (N, 3, 3) in e with
    [atom i, cartesian a, dipole component b] = d mu_b / d r_{i,a}. ``project`` (needs ``positions``, Å)
    removes translations and rotations from the mass-weighted Hessian first. Without dipole derivatives
    (``None``: a committee without a dipole model) the intensities are NaN.
    """
    masses = np.asarray(masses, dtype=float)
    n = len(masses)
    h = np.asarray(hessian, dtype=float)
    if h.shape != (3 * n, 3 * n):
        raise ValueError(f"Hessian has shape {h.shape}, expected {(3 * n, 3 * n)} for {n} atoms")
    dmu = np.full((n, 3, 3), np.nan) if dipole_derivatives is None else np.asarray(dipole_derivatives, dtype=float)
    if dmu.shape != (n, 3, 3):
        raise ValueError(f"dipole derivatives have shape {dmu.shape}, expected {(n, 3, 3)}")
    h = 0.5 * (h + h.T)
    im = np.repeat(masses ** -0.5, 3)
    hm = im[:, None] * h * im[None, :]
    if project:
        if positions is None:
            raise ValueError("projection of translations and rotations needs the positions")
        b = _rigid_body_basis(masses, np.asarray(positions, dtype=float))
        p = np.eye(3 * n) - b @ b.T
        hm = p @ hm @ p
    omega2, vecs = np.linalg.eigh(hm)
    # d mu / d Q_k = sum_{i,a} d mu / d r_{ia} * vec[ia, k] / sqrt(m_i)   (e / sqrt(amu))
    dmu_dq = (dmu.reshape(3 * n, 3) * im[:, None]).T @ vecs  # (3, 3N)
    intensities = (dmu_dq**2).sum(axis=0) * KM_MOL_PER_E2_AMU
    modes = (vecs * im[:, None]).T.reshape(3 * n, n, 3)
    return HarmonicIR(_eigen_to_wavenumber(omega2), intensities, modes, "derivatives")


def harmonic_autograd(atoms: Atoms, calc, project: bool = False) -> HarmonicIR:
    """Harmonic IR from ``calc.hessian(atoms)`` and ``calc.dipole_derivatives(atoms)`` (exact derivatives)."""
    for name in ("hessian", "dipole_derivatives"):
        if not callable(getattr(calc, name, None)):
            raise ValueError(f"calculator {type(calc).__name__} has no {name}(atoms); use method 'ase'")
    atoms = atoms.copy()
    atoms.calc = calc
    hess = np.asarray(calc.hessian(atoms), dtype=float)
    dmu = np.asarray(calc.dipole_derivatives(atoms), dtype=float)
    res = harmonic_from_derivatives(atoms.get_masses(), hess, dmu, atoms.get_positions(), project)
    res.method = "autograd"
    return res


def harmonic_ase(atoms: Atoms, calc, delta: float = 0.01, nfree: int = 2, workdir: str | None = None) -> HarmonicIR:
    """Harmonic IR through ASE ``Infrared`` (finite differences, step ``delta`` Å, ``nfree`` 2 or 4).

    ASE's cache goes to ``workdir`` (kept, so an interrupted run resumes) or to a temporary folder.
    """
    from ase.vibrations import Infrared

    atoms = atoms.copy()
    atoms.calc = calc

    def _run(folder: str) -> HarmonicIR:
        ir = Infrared(atoms, name=os.path.join(folder, "ir"), delta=delta, nfree=nfree)
        ir.run()
        ir.read()
        return from_infrared(ir)

    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        return _run(str(workdir))
    with tempfile.TemporaryDirectory(prefix="nanosil-ir-") as tmp:
        return _run(tmp)


def real_wavenumbers(complex_frequencies) -> np.ndarray:
    """ASE's complex frequencies (cm^-1, or energies in any unit) as reals, imaginary ones negative."""
    c = np.asarray(complex_frequencies, dtype=complex)
    return np.where(np.abs(c.imag) > np.abs(c.real), -np.abs(c.imag), c.real)


def from_infrared(ir, method: str = "ase") -> HarmonicIR:
    """:class:`HarmonicIR` from an ASE ``Infrared`` object after ``read()``, ascending, with its modes."""
    freq = real_wavenumbers(ir.hnu) / units.invcm
    order = np.argsort(freq, kind="stable")
    n = len(ir.atoms)
    modes = np.zeros((len(freq), n, 3))
    for k, i in enumerate(order):
        modes[k][ir.indices] = ir.get_mode(int(i))[ir.indices]
    return HarmonicIR(freq[order], np.asarray(ir.intensities, dtype=float)[order] * KM_MOL_PER_D2_A2_AMU,
                      modes, method)


def vibrational(frequencies, n_rigid: int = 6) -> np.ndarray:
    """The vibrational frequencies (cm^-1), sorted: the ``n_rigid`` closest to zero (translations and
    rotations of a non-linear cluster) are dropped."""
    f = np.asarray(frequencies, dtype=float)
    keep = np.sort(np.argsort(np.abs(f), kind="stable")[n_rigid:])
    return np.sort(f[keep])


def harmonic_ir(atoms: Atoms, calc, method: str = "auto", **kwargs) -> HarmonicIR:
    """Harmonic IR by ``method``: ``autograd``, ``ase``, or ``auto`` (autograd when the calculator can)."""
    if method not in METHODS:
        raise ValueError(f"unknown harmonic method {method!r}; choose from {', '.join(METHODS)}")
    has_derivs = callable(getattr(calc, "hessian", None)) and callable(getattr(calc, "dipole_derivatives", None))
    if method == "autograd" or (method == "auto" and has_derivs):
        return harmonic_autograd(atoms, calc, project=kwargs.get("project", False))
    return harmonic_ase(atoms, calc, **{k: v for k, v in kwargs.items() if k in ("delta", "nfree", "workdir")})


def write_harmonic(path: str | os.PathLike, result: HarmonicIR) -> None:
    """Two columns, ``frequency_cm-1 intensity_km_mol`` (imaginary as negative), atomic write."""
    lines = [f"# harmonic IR ({result.method}): frequency_cm-1 intensity_km_mol"]
    lines += [f"{f:12.4f} {i:14.6f}" for f, i in zip(result.frequencies, result.intensities)]
    write_text(path, "\n".join(lines) + "\n")


def read_harmonic(path: str | os.PathLike) -> HarmonicIR:
    """Frequencies and intensities from a 2-column text file (``#`` comments), e.g. ORCA's table extract."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    freq, inten = [], []
    with open(path, "r", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            s = line.split("#", 1)[0].strip()
            if not s:
                continue
            parts = s.split()
            if len(parts) != 2:
                raise ValueError(
                    f"{path}: line {lineno}: expected 2 columns (frequency_cm-1 intensity_km_mol), found {len(parts)}"
                )
            try:
                f, i = float(parts[0]), float(parts[1])
            except ValueError:
                raise ValueError(f"{path}: line {lineno}: not a number in {s!r}") from None
            if not (np.isfinite(f) and np.isfinite(i)):
                raise ValueError(f"{path}: line {lineno}: NaN or inf value")
            freq.append(f)
            inten.append(i)
    if not freq:
        raise ValueError(f"{path}: no modes found")
    return HarmonicIR(np.array(freq), np.array(inten), None, "file")
