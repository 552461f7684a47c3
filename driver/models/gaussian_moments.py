"""The Gaussian-moment descriptor of GM-NN (Zaverkin & Kästner), with weights stacked over committee members.

For atom i, neighbours j within the cutoff r_c, unit vectors u_ij and distance d_ij (Å)::

    R_s(d_ij) = 1/sqrt(n_basis) * sum_s' c[Z_i, Z_j, s, s'] * exp(-beta (d_ij - mu_s')^2) * f_c(d_ij)
    Psi^(L)_{i,s} = sum_j R_s(d_ij) u_ij (x) ... (x) u_ij        (L = 0, 1, 2, 3 copies of u_ij)

with ``n_basis`` = 7 Gaussians on [r_min, r_c] = [0.5, 5.0] Å, a cosine cutoff f_c, and learnable
coefficients ``c`` for every ordered species pair (Z_i, Z_j) contracting them to ``n_radial`` = 5 radial
functions. The features are the rotation invariants (s, t, u index radial functions; a, b, c, d are
Cartesian indices summed over):

=====================  =======================================================  =========================  ======
name                   contraction                                              radial indices kept        count
=====================  =======================================================  =========================  ======
``0``                  Psi0_s                                                   all s                       5
``11``                 Psi1_sa Psi1_ta                                          s <= t                      15
``22``                 Psi2_sab Psi2_tab                                        s <= t                      15
``33``                 Psi3_sabc Psi3_tabc                                      s <= t                      15
``222``                Psi2_sab Psi2_tbc Psi2_uca                               s <= t <= u                 35
``112``                Psi1_sa Psi1_tb Psi2_uab                                 s <= t, all u               75
``233``                Psi2_sab Psi3_tacd Psi3_ubcd                             t <= u, all s               75
``123``                Psi1_sa Psi2_tbc Psi3_uabc                               all s, t, u                 125
=====================  =======================================================  =========================  ======

360 features for 5 radial functions (:func:`n_features` gives the count for other sizes). The index
restrictions drop exact duplicates that the symmetry of a contraction creates.

Speed: the neighbour sums do not depend on the learnable coefficients, so ``M[i, z, s', m] =
sum_{j of species z} exp(..)f_c u^m`` is computed once and shared by all committee members; each
member only contracts M with its own coefficients.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from .geometry import Batch, Pairs, pair_geometry
from .radial import GaussianBasis

FEATURE_BLOCKS = ("0", "11", "22", "33", "222", "112", "233", "123")


def _pair_index(n: int) -> torch.Tensor:
    return torch.tensor([s * n + t for s in range(n) for t in range(s, n)], dtype=torch.long)


def _block_indices(n: int) -> dict[str, torch.Tensor]:
    """Flat indices into the full (n, n[, n]) tensor of each contraction, after the symmetry restriction."""
    r = range(n)
    return {
        "11": _pair_index(n), "22": _pair_index(n), "33": _pair_index(n),
        "222": torch.tensor([(s * n + t) * n + u for s, t, u in itertools.product(r, r, r) if s <= t <= u]),
        "112": torch.tensor([(s * n + t) * n + u for s, t, u in itertools.product(r, r, r) if s <= t]),
        "233": torch.tensor([(s * n + t) * n + u for s, t, u in itertools.product(r, r, r) if t <= u]),
    }


def n_features(n_radial: int) -> int:
    n = n_radial
    pairs = n * (n + 1) // 2
    return n + 3 * pairs + n * (n + 1) * (n + 2) // 6 + 2 * pairs * n + n**3


def invariants(psi: torch.Tensor, idx: dict[str, torch.Tensor]) -> torch.Tensor:
    """The feature table above from moments ``psi`` of shape (..., n_radial, 40) -> (..., n_features)."""
    lead = psi.shape[:-2]
    n = psi.shape[-2]
    p0 = psi[..., 0]
    p1 = psi[..., 1:4]
    p2 = psi[..., 4:13].reshape(*lead, n, 3, 3)
    p3 = psi[..., 13:40].reshape(*lead, n, 3, 3, 3)
    flat2 = lambda x: x.reshape(*lead, n * n)
    flat3 = lambda x: x.reshape(*lead, n * n * n)
    f11 = flat2(torch.einsum("...sa,...ta->...st", p1, p1))[..., idx["11"]]
    f22 = flat2(torch.einsum("...sab,...tab->...st", p2, p2))[..., idx["22"]]
    f33 = flat2(torch.einsum("...sabc,...tabc->...st", p3, p3))[..., idx["33"]]
    a22 = torch.einsum("...sab,...tbc->...stac", p2, p2)
    f222 = flat3(torch.einsum("...stac,...uca->...stu", a22, p2))[..., idx["222"]]
    w12 = torch.einsum("...sa,...uab->...sub", p1, p2)
    f112 = flat3(torch.einsum("...sub,...tb->...stu", w12, p1))[..., idx["112"]]
    t33 = torch.einsum("...tacd,...ubcd->...tuab", p3, p3)
    f233 = flat3(torch.einsum("...sab,...tuab->...stu", p2, t33))[..., idx["233"]]
    w23 = torch.einsum("...tbc,...uabc->...tua", p2, p3)
    f123 = flat3(torch.einsum("...sa,...tua->...stu", p1, w23))
    return torch.cat([p0, f11, f22, f33, f222, f112, f233, f123], dim=-1)


def angular_moments(unit: torch.Tensor) -> torch.Tensor:
    """[1, u, u(x)u, u(x)u(x)u] flattened: (..., 3) -> (..., 40)."""
    one = torch.ones_like(unit[..., :1])
    uu = unit[..., :, None] * unit[..., None, :]
    uuu = uu[..., :, :, None] * unit[..., None, None, :]
    return torch.cat([one, unit, uu.flatten(-2), uuu.flatten(-3)], dim=-1)


class GaussianMomentDescriptor(nn.Module):
    """Per-atom Gaussian-moment invariants for K stacked members: (K, B, N, n_features)."""

    def __init__(self, n_species: int, n_members: int = 1, n_basis: int = 7, n_radial: int = 5,
                 r_min: float = 0.5, cutoff: float = 5.0):
        super().__init__()
        self.n_species, self.n_basis, self.n_radial, self.cutoff = n_species, n_basis, n_radial, cutoff
        self.basis = GaussianBasis(n_basis, r_min, cutoff)
        # c[k, Z_i, Z_j, s', s]: the contraction of the 7 Gaussians to 5 radial functions per ordered pair.
        self.coefficients = nn.Parameter(torch.randn(n_members, n_species, n_species, n_basis, n_radial))
        for name, index in _block_indices(n_radial).items():
            self.register_buffer(f"idx_{name}", index, persistent=False)
        self.n_features = n_features(n_radial)

    @property
    def index(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"idx_{name}") for name in ("11", "22", "33", "222", "112", "233")}

    def shared_moments(self, batch: Batch, pairs: Pairs | None = None) -> torch.Tensor:
        """M[b, i, (z, s'), m]: neighbour sums split by neighbour species, independent of the members."""
        pairs = pair_geometry(batch, self.cutoff) if pairs is None else pairs
        radial = self.basis(pairs.distances) * pairs.cutoff[..., None]            # (B, N, N, n_basis)
        onehot = nn.functional.one_hot(batch.species.clamp(min=0), self.n_species).to(radial.dtype)
        onehot = onehot * batch.mask[..., None]
        by_species = radial[:, :, :, None, :] * onehot[:, None, :, :, None]        # (B, N, N, S, n_basis)
        b, n = batch.species.shape
        by_species = by_species.reshape(b, n, n, self.n_species * self.n_basis)
        ang = angular_moments(pairs.unit)                                          # (B, N, N, 40)
        return torch.einsum("bijq,bijm->biqm", by_species, ang)                    # (B, N, S*n_basis, 40)

    def forward(self, batch: Batch, per_member: bool = False) -> torch.Tensor:
        """(K, B, N, n_features). With ``per_member=True`` the batch holds K x B structures, member-major
        (member k sees only structures k*B .. k*B+B-1): backpropagating the sum of all member energies then
        gives every member's own forces in a single backward pass. The result is then (K, B, N, n_features)."""
        m = self.shared_moments(batch)
        k = self.coefficients.shape[0]
        # Coefficients of the centre atom's species: (K, B, N, S*n_basis, n_radial).
        c = self.coefficients.reshape(k, self.n_species, self.n_species * self.n_basis, self.n_radial)
        if per_member:
            n = batch.species.shape[1]
            species = batch.species.clamp(min=0).reshape(k, -1, n)                 # (K, B, N)
            c_i = c[torch.arange(k)[:, None, None], species] / math.sqrt(self.n_basis)
            psi = torch.einsum("kbiqs,kbiqm->kbism", c_i, m.reshape(k, -1, *m.shape[1:]))  # (K, B, N, n_radial, 40)
        else:
            c_i = c[:, batch.species.clamp(min=0)] / math.sqrt(self.n_basis)
            psi = torch.einsum("kbiqs,biqm->kbism", c_i, m)                       # (K, B, N, n_radial, 40)
        return invariants(psi, self.index)


@torch.no_grad()
def global_features(numbers, positions, species=("Mg", "Si", "O"), seed: int = 0) -> np.ndarray:
    """A fixed global descriptor of a structure for farthest point sampling: the Gaussian-moment invariants
    of one untrained member (fixed seed, so every call agrees), averaged over the atoms of each species
    and concatenated: (n_species * n_features,). Signed square roots tame the triple products."""
    from ase.data import chemical_symbols

    sym = [chemical_symbols[z] for z in numbers]
    unknown = sorted(set(sym) - set(species))
    if unknown:
        raise ValueError(f"element(s) {', '.join(unknown)} not in species {', '.join(species)}")
    gen = torch.Generator().manual_seed(seed)
    desc = GaussianMomentDescriptor(len(species)).double()
    desc.coefficients.copy_(torch.randn(desc.coefficients.shape, generator=gen, dtype=torch.float64))
    from .geometry import make_batch

    index = [species.index(s) for s in sym]
    batch = make_batch([index], [positions], dtype=torch.float64)
    feats = desc(batch)[0, 0]                                                       # (N, n_features)
    feats = torch.sign(feats) * torch.abs(feats) ** (1.0 / 3.0)
    out = []
    for z in range(len(species)):
        sel = torch.tensor(index) == z
        out.append(feats[sel].mean(0) if sel.any() else torch.zeros(desc.n_features, dtype=torch.float64))
    return torch.cat(out).numpy()
