"""Padded batches of finite clusters and their pair geometry.

Clusters here have at most ~100 atoms and a 5 Å cutoff covers most of them, so every pair is kept in
a dense (B, N, N) layout with masks; it is faster on CPU than index-based neighbour lists at this size
and needs no periodic-image logic (clusters have no cell).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    species: torch.Tensor    # (B, N) long, index into the model's species list; -1 for padding
    positions: torch.Tensor  # (B, N, 3) Å
    mask: torch.Tensor       # (B, N) bool, True for real atoms

    @property
    def n_atoms(self) -> torch.Tensor:
        return self.mask.sum(-1)


def make_batch(species_list, positions_list, dtype=torch.float32, device="cpu") -> Batch:
    """Pad a list of (species indices, positions Å) into one :class:`Batch` on ``device`` (padded on the CPU,
    then moved in one copy per tensor)."""
    n_max = max(len(s) for s in species_list)
    b = len(species_list)
    species = torch.full((b, n_max), -1, dtype=torch.long)
    positions = torch.zeros((b, n_max, 3), dtype=dtype)
    for k, (s, r) in enumerate(zip(species_list, positions_list)):
        species[k, : len(s)] = torch.as_tensor(np.asarray(s), dtype=torch.long)
        positions[k, : len(s)] = torch.as_tensor(np.asarray(r), dtype=dtype)
    species, positions = species.to(device), positions.to(device)
    return Batch(species=species, positions=positions, mask=species >= 0)


@dataclass
class Pairs:
    distances: torch.Tensor  # (B, N, N) Å; 1.0 where the pair does not exist (keeps gradients finite)
    unit: torch.Tensor       # (B, N, N, 3) unit vectors from i to j; 0 where the pair does not exist
    within: torch.Tensor     # (B, N, N) bool: a real pair i != j closer than the cutoff
    cutoff: torch.Tensor     # (B, N, N) cosine cutoff value (0 outside)


def pair_geometry(batch: Batch, cutoff: float) -> Pairs:
    r = batch.positions
    rij = r[:, None, :, :] - r[:, :, None, :]  # rij[b, i, j] = r_j - r_i
    n = r.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=r.device)
    real = batch.mask[:, :, None] & batch.mask[:, None, :] & ~eye
    d2 = (rij * rij).sum(-1)
    d = torch.sqrt(torch.where(real, d2, torch.ones_like(d2)))
    within = real & (d < cutoff)
    fc = torch.where(within, 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0), torch.zeros_like(d))
    unit = torch.where(real[..., None], rij / d[..., None], torch.zeros_like(rij))
    return Pairs(distances=d, unit=unit, within=within, cutoff=fc)
