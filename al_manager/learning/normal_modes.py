"""Modified normal-mode sampling (the paper's Sec. II B, Fig. 1): structures displaced from a minimum along
its reference normal modes, the candidates that farthest point sampling then thins out.

Amplitudes are thermal, so they mean the same for a stiff Si-O stretch and a floppy bend. With the
mass-weighted-normalised modes ``x_k`` (sum_i m_i |x_k,i|^2 = 1, ASE convention) and eigenvalues
``lambda_k = omega_k^2`` (eV/(Å^2 amu)), a displacement ``R = R0 + q x_k`` costs the harmonic energy
``lambda_k q^2 / 2``. For each non-zero mode and each temperature T of ``temperatures`` (K) the structure is
placed at both classical turning points of that mode carrying the energy k_B T::

    q = +-sqrt(2 k_B T / lambda_k)

(2 x len(temperatures) structures per mode). A few random combinations of all modes are added: a
classical harmonic Boltzmann sample at a temperature drawn from ``temperatures`` (each q_k Gaussian with
variance k_B T / lambda_k). Soft modes of a large amplitude are not harmonic any more (a linear move
along a torsion stretches bonds), so every displacement is scaled down, when needed, until no atom moves
more than ``max_displacement`` Å.

The rigid-body modes are the 6 (5 for a linear structure) with the smallest |frequency|; they are skipped.
An imaginary mode (a saddle point, when the structure was not relaxed) is displaced with |lambda_k|.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from spectra.constants import HBAR_EV



@dataclass
class Displacement:
    """One candidate: positions (Å) and where they come from."""

    positions: np.ndarray
    mode: int            # index into the harmonic analysis (-1: random combination)
    temperature: float   # K
    sign: int            # +1 / -1 (0: random combination)
    scale: float = 1.0   # < 1 when capped by max_displacement


def n_rigid_modes(atoms: Atoms, tol: float = 1e-3) -> int:
    """6, or 5 for a linear structure (all atoms on one line within ``tol`` Å)."""
    if len(atoms) < 3:
        return 5
    pos = atoms.positions - atoms.positions.mean(axis=0)
    sv = np.linalg.svd(pos, compute_uv=False)
    return 5 if sv[1] < tol else 6


def vibrational_indices(frequencies, atoms: Atoms) -> np.ndarray:
    """Indices of the vibrational (non-rigid-body) modes: all but the n_rigid with the smallest |frequency|,
    in ascending order of frequency."""
    freq = np.asarray(frequencies, dtype=float)
    order = np.argsort(np.abs(freq), kind="stable")
    keep = np.sort(order[n_rigid_modes(atoms):])
    return keep[np.argsort(freq[keep], kind="stable")]


def mode_eigenvalues(frequencies_cm) -> np.ndarray:
    """lambda_k = omega_k^2 in eV/(Å^2 amu) from frequencies in cm^-1 (|frequency| for imaginary modes)."""
    hnu = np.abs(np.asarray(frequencies_cm, dtype=float)) * units.invcm  # eV
    return (hnu / HBAR_EV) ** 2


def turning_point(frequency_cm: float, temperature: float) -> float:
    """Classical turning point q (Å sqrt(amu)) of a mode carrying k_B T: sqrt(2 k_B T / lambda)."""
    return float(np.sqrt(2.0 * units.kB * temperature / mode_eigenvalues([frequency_cm])[0]))


def _capped(disp: np.ndarray, max_displacement: float) -> tuple[np.ndarray, float]:
    largest = float(np.linalg.norm(disp, axis=1).max())
    if largest <= max_displacement:
        return disp, 1.0
    scale = max_displacement / largest
    return disp * scale, scale


def displacements(atoms: Atoms, frequencies, modes, temperatures=(100, 300, 600, 1000, 1500),
                  max_displacement: float = 0.3, n_random: int = 20,
                  rng: np.random.Generator | None = None) -> list[Displacement]:
    """Every candidate of the modified normal-mode sampling around ``atoms`` (a minimum).

    ``frequencies`` (3N,) cm^-1 and ``modes`` (3N, N, 3) as in :class:`spectra.harmonic.HarmonicIR`.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    modes = np.asarray(modes, dtype=float)
    freq = np.asarray(frequencies, dtype=float)
    if modes.shape != (len(freq), len(atoms), 3):
        raise ValueError(f"modes have shape {modes.shape}, expected ({len(freq)}, {len(atoms)}, 3)")
    if any(t <= 0 for t in temperatures):
        raise ValueError("temperatures must be > 0 K")
    r0 = atoms.positions
    vib = vibrational_indices(freq, atoms)
    lam = mode_eigenvalues(freq[vib])
    if np.any(lam <= 0):
        raise ValueError("a vibrational mode has zero frequency: the harmonic analysis is not usable")
    out: list[Displacement] = []
    for k, lam_k in zip(vib, lam):
        for t in temperatures:
            q = np.sqrt(2.0 * units.kB * t / lam_k)
            for sign in (1, -1):
                disp, scale = _capped(sign * q * modes[k], max_displacement)
                out.append(Displacement(r0 + disp, int(k), float(t), sign, scale))
    for _ in range(n_random):
        t = float(rng.choice(np.asarray(temperatures, dtype=float)))
        q = rng.normal(size=len(vib)) * np.sqrt(units.kB * t / lam)
        disp, scale = _capped(np.tensordot(q, modes[vib], axes=1), max_displacement)
        out.append(Displacement(r0 + disp, -1, t, 0, scale))
    return out


def harmonic_energy(frequencies, modes, masses, displacement) -> float:
    """Harmonic energy (eV) of a Cartesian displacement (N, 3) Å: sum_k lambda_k q_k^2 / 2 over the
    vibrational modes, with q_k = sum_i m_i x_k,i . d_i (the modes are mass-orthonormal)."""
    modes = np.asarray(modes, dtype=float)
    q = np.einsum("kia,i,ia->k", modes, np.asarray(masses, dtype=float), np.asarray(displacement, dtype=float))
    lam = mode_eigenvalues(frequencies)
    signs = np.sign(np.asarray(frequencies, dtype=float))
    return float(0.5 * np.sum(signs * lam * q**2))
