"""Geometry checks of a cluster, in one place: non-finite positions, atoms too close, a cluster that fell
apart, a structure that drifted from its reference. Each check returns None when the structure is fine, or
one line saying what is wrong, so every caller (reference inputs, global search, sampling restarts, the
trust region of production runs) words it the same way. Lengths in Å.
"""
from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols, covalent_radii

__all__ = ["non_finite", "closest_pair", "too_close", "fragments", "collapsed_or_fragmented", "drifted"]


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else f"Z={z}"


def non_finite(positions) -> str | None:
    """A line when any coordinate is NaN or infinite."""
    pos = np.asarray(positions, dtype=float)
    if not np.all(np.isfinite(pos)):
        atoms = sorted({int(i) for i in np.argwhere(~np.isfinite(pos))[:, 0]})
        return f"non-finite positions (NaN or infinity) at atom(s) {', '.join(map(str, atoms[:5]))}"
    return None


def closest_pair(positions) -> tuple[int, int, float]:
    """(i, j, distance) of the closest pair of atoms (needs at least 2 atoms)."""
    pos = np.asarray(positions, dtype=float)
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(int(np.argmin(d)), d.shape)
    return int(min(i, j)), int(max(i, j)), float(d[i, j])


def too_close(numbers, positions, min_distance: float) -> str | None:
    """A line when two atoms are closer than ``min_distance`` Å."""
    if len(positions) < 2:
        return None
    i, j, d = closest_pair(positions)
    if d < min_distance:
        return (f"atoms {i} ({_symbol(int(numbers[i]))}) and {j} ({_symbol(int(numbers[j]))}) are {d:.3f} Å apart "
                f"(< {min_distance:g} Å)")
    return None


def fragments(positions, distance: float) -> list[int]:
    """Sizes (largest first) of the connected parts of the graph of atoms closer than ``distance`` (Å)."""
    from scipy.sparse.csgraph import connected_components

    pos = np.asarray(positions, dtype=float)
    if len(pos) < 2:
        return [len(pos)]
    near = np.linalg.norm(pos[:, None] - pos[None], axis=-1) < distance
    _, labels = connected_components(near, directed=False)
    return sorted(np.bincount(labels).tolist(), reverse=True)


def collapsed_or_fragmented(numbers, positions, min_ratio: float = 0.7, bond_factor: float = 1.3) -> str | None:
    """A line when two atoms sit closer than ``min_ratio`` x the sum of their covalent radii (collapsed), or
    when the graph of bonds (shorter than ``bond_factor`` x that sum) falls into several pieces."""
    from scipy.sparse.csgraph import connected_components

    numbers, pos = np.asarray(numbers), np.asarray(positions, dtype=float)
    if len(pos) < 2:
        return None
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    rsum = covalent_radii[numbers][:, None] + covalent_radii[numbers][None, :]
    iu = np.triu_indices(len(pos), 1)
    ratio = d[iu] / rsum[iu]
    if ratio.min() < min_ratio:
        k = int(np.argmin(ratio))
        i, j = int(iu[0][k]), int(iu[1][k])
        return f"atoms {i} ({_symbol(int(numbers[i]))}) and {j} ({_symbol(int(numbers[j]))}) collapsed to {d[i, j]:.2f} Å"
    n_parts, _ = connected_components(d < bond_factor * rsum, directed=False)
    if n_parts > 1:
        return f"fragmented into {n_parts} pieces"
    return None


def drifted(atoms, reference, min_distance: float = 0.6, max_extra_spread: float = 4.0) -> str | None:
    """A line when ``atoms`` no longer looks like the cluster ``reference`` (other atoms, atoms closer than
    ``min_distance``, or an atom more than ``max_extra_spread`` Å farther from the centre than any in the
    reference)."""
    if len(atoms) != len(reference) or list(atoms.numbers) != list(reference.numbers):
        return "atoms differ from the reference structure"
    why = non_finite(atoms.positions) or too_close(atoms.numbers, atoms.positions, min_distance)
    if why:
        return why
    spread = np.linalg.norm(atoms.positions - atoms.positions.mean(0), axis=1).max()
    ref_spread = np.linalg.norm(reference.positions - reference.positions.mean(0), axis=1).max()
    if spread > ref_spread + max_extra_spread:
        return f"an atom {spread:.1f} Å from the centre (reference {ref_spread:.1f} Å)"
    return None
