"""Farthest point sampling (FPS) on a global structure descriptor: a small, spread-out subset of many
candidate structures (the paper's Fig. 1).

:func:`farthest_point_sampling` is the greedy max-min rule: start from ``first``, then repeatedly add the
point whose Euclidean distance to the nearest already chosen point is largest.

:func:`global_descriptor` gives one fixed vector per structure: the Gaussian-moment invariants of the
model (:func:`driver.models.gaussian_moments.global_features`, an untrained member with a fixed seed so
every call agrees), averaged over the atoms of each species. It is rotation-, translation- and
permutation-invariant and smooth in the positions, which is what distances between structures need.
"""
from __future__ import annotations

import numpy as np

DEFAULT_SPECIES = ("Mg", "Si", "O")


def farthest_point_sampling(features, n: int, first: int = 0, groups=None) -> np.ndarray:
    """Indices of ``n`` rows of ``features`` (M, F) chosen by greedy farthest point sampling, starting with
    row ``first``; all M rows (``first`` leading) when n >= M. Ties go to the lowest index.

    ``groups`` (M labels, optional): the picks take the groups in turn, in ascending order of label, each
    pick the farthest row of its group from everything chosen so far; a group with no row left is skipped.
    Every group so keeps its share, where plain FPS would spend the whole budget on the group that lies
    farthest out."""
    x = np.asarray(features, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (structures x features), got shape {x.shape}")
    m = len(x)
    if m == 0 or n <= 0:
        return np.zeros(0, dtype=int)
    if not 0 <= first < m:
        raise ValueError(f"first={first} is not a row index of {m} structures")
    n = min(int(n), m)
    labels = None
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape != (m,):
            raise ValueError(f"groups must give one label per structure ({m}), got shape {labels.shape}")
        turns = np.unique(labels)
    chosen = [int(first)]
    nearest = np.linalg.norm(x - x[first], axis=1)
    turn = 0
    for _ in range(n - 1):
        nearest[chosen] = -np.inf
        if labels is None:
            k = int(np.argmax(nearest))
        else:
            while True:   # the next group that still has a row (one exists: fewer than m are chosen)
                member = (labels == turns[turn % len(turns)]) & (nearest > -np.inf)
                turn += 1
                if member.any():
                    break
            k = int(np.argmax(np.where(member, nearest, -np.inf)))
        chosen.append(k)
        nearest = np.minimum(nearest, np.linalg.norm(x - x[k], axis=1))
    return np.asarray(chosen, dtype=int)


def descriptor_species(structures) -> tuple[str, ...]:
    """Species order of the descriptor: the model default (Mg, Si, O) when it covers every element,
    otherwise all elements present by atomic number."""
    from ase.data import chemical_symbols

    present = sorted({int(z) for a in structures for z in a.numbers})
    symbols = [chemical_symbols[z] for z in present]
    if set(symbols) <= set(DEFAULT_SPECIES):
        return DEFAULT_SPECIES
    return tuple(symbols)


def global_descriptor(structures, species: tuple[str, ...] | None = None) -> np.ndarray:
    """(M, F) array: one fixed global Gaussian-moment vector per structure (ASE ``Atoms``)."""
    from driver.models.gaussian_moments import global_features

    structures = list(structures)
    if not structures:
        return np.zeros((0, 0))
    species = tuple(species) if species is not None else descriptor_species(structures)
    return np.stack([global_features(a.numbers, a.positions, species=species) for a in structures])


def min_pairwise_distance(features, indices=None) -> float:
    """Smallest Euclidean distance between two of the chosen rows (the quantity FPS keeps large)."""
    x = np.asarray(features, dtype=float)
    if indices is not None:
        x = x[np.asarray(indices, dtype=int)]
    if len(x) < 2:
        return float("inf")
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)
    return float(d[np.triu_indices(len(x), 1)].min())
