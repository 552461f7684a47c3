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

Speed (``bench/model_speed.py`` times it; at these sizes the number of tensor operations, not the
arithmetic, sets the cost):

- the moments are symmetric, so the neighbour sums keep their 20 independent components
  (:data:`MONOMIALS`) instead of 40 Cartesian ones;
- the neighbour sums ``M[i, (z, s'), m] = sum_{j of species z} g_s'(d_ij) f_c(d_ij) A_m(u_ij)`` do not
  depend on the learnable coefficients: they are computed once and shared by all committee members,
  and at inference (:class:`_MomentSums`) with a hand-written backward that gives every member its own
  forces without recomputing them; training on forces (:class:`MomentForces`) uses that backward and its
  adjoint, the JVP, so that the geometry is never differentiated twice;
- the invariants are a few dense products with fixed contraction tables built from the table above
  (:func:`invariants`); :func:`invariants_cartesian` is the readable one-einsum-per-contraction definition
  they are tested against;
- at inference the whole descriptor runs in compiled C where the optional extension was built
  (:mod:`driver.models.fast_kernels`): one call forward, one backward; the PyTorch version above stays
  the definition for training and Hessians.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import fast_kernels
from .geometry import Batch, Pairs, pair_geometry
from .radial import GaussianBasis, gaussian

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


def invariants_cartesian(psi: torch.Tensor, idx: dict[str, torch.Tensor]) -> torch.Tensor:
    """The feature table above from the full Cartesian moments ``psi`` (..., n_radial, 40), written as
    one einsum per contraction: the readable definition, kept as the reference :func:`invariants` is
    tested against."""
    lead = psi.shape[:-2]
    n = psi.shape[-2]
    p0 = psi[..., 0]
    p1 = psi[..., 1:4]
    p2 = psi[..., 4:13].reshape(*lead, n, 3, 3)
    p3 = psi[..., 13:40].reshape(*lead, n, 3, 3, 3)
    flat2 = lambda x: x.reshape(*lead, n * n)
    flat3 = lambda x: x.reshape(*lead, n * n * n)
    # index_select, not advanced indexing: several times faster here, forward and backward
    f11 = flat2(torch.einsum("...sa,...ta->...st", p1, p1)).index_select(-1, idx["11"])
    f22 = flat2(torch.einsum("...sab,...tab->...st", p2, p2)).index_select(-1, idx["22"])
    f33 = flat2(torch.einsum("...sabc,...tabc->...st", p3, p3)).index_select(-1, idx["33"])
    a22 = torch.einsum("...sab,...tbc->...stac", p2, p2)
    f222 = flat3(torch.einsum("...stac,...uca->...stu", a22, p2)).index_select(-1, idx["222"])
    w12 = torch.einsum("...sa,...uab->...sub", p1, p2)
    f112 = flat3(torch.einsum("...sub,...tb->...stu", w12, p1)).index_select(-1, idx["112"])
    t33 = torch.einsum("...tacd,...ubcd->...tuab", p3, p3)
    f233 = flat3(torch.einsum("...sab,...tuab->...stu", p2, t33)).index_select(-1, idx["233"])
    w23 = torch.einsum("...tbc,...uabc->...tua", p2, p3)
    f123 = flat3(torch.einsum("...sa,...tua->...stu", p1, w23))
    return torch.cat([p0, f11, f22, f33, f222, f112, f233, f123], dim=-1)


# The moments are symmetric tensors, so the neighbour sums need only their 20 independent components
# (1 + 3 + 6 + 10 monomials u_a u_b u_c, a <= b <= c) instead of the 40 Cartesian ones; the invariants
# are written on the full tensors, rebuilt from the 20 by an index (``SYMMETRIC_TO_FULL``).
# Each monomial is e[a] e[b] e[c] with e = (1, u_x, u_y, u_z): index 0 stands for a missing factor.
MONOMIALS = ([(0, 0, 0)] + [(0, 0, a) for a in (1, 2, 3)]
             + [(0, a, b) for a in (1, 2, 3) for b in (1, 2, 3) if a <= b]
             + [(a, b, c) for a in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2, 3) if a <= b <= c])
N_MOMENTS = len(MONOMIALS)  # 20


def _symmetric_to_full() -> torch.Tensor:
    lookup = {m: k for k, m in enumerate(MONOMIALS)}
    full = [(0, 0, 0)]
    full += [(0, 0, a) for a in (1, 2, 3)]
    full += [tuple(sorted((0, a, b))) for a in (1, 2, 3) for b in (1, 2, 3)]
    full += [tuple(sorted((a, b, c))) for a in (1, 2, 3) for b in (1, 2, 3) for c in (1, 2, 3)]
    return torch.tensor([lookup[m] for m in full])


SYMMETRIC_TO_FULL = _symmetric_to_full()  # (40,): full Cartesian component -> symmetric component


def angular_moments(unit: torch.Tensor) -> torch.Tensor:
    """The 20 independent components of [1, u, u(x)u, u(x)u(x)u] in the order of ``MONOMIALS``:
    (..., 3) -> (..., 20). Built from slices (no gathers: they dominate the cost at this size)."""
    x, y, z = unit[..., 0:1], unit[..., 1:2], unit[..., 2:3]
    quad = torch.cat([x * unit, y * unit[..., 1:], z * unit[..., 2:]], dim=-1)          # xx xy xz yy yz zz
    cubic = torch.cat([x * quad, y * quad[..., 3:], z * quad[..., 5:]], dim=-1)         # xxx ... zzz
    return torch.cat([torch.ones_like(x), unit, quad, cubic], dim=-1)


def _angular_jacobian_table() -> torch.Tensor:
    """T[m, x, m'] with d A_m / d u_x = sum_m' T[m, x, m'] A_m'(u) (m' over the 10 monomials of order <= 2):
    each factor u_x of A_m contributes the monomial of the other two factors."""
    lookup = {m: k for k, m in enumerate(MONOMIALS)}
    table = torch.zeros(N_MOMENTS, 3, 10, dtype=torch.float64)
    for k, mono in enumerate(MONOMIALS):
        for pos, factor in enumerate(mono):
            if factor:
                rest = tuple(sorted((0,) + mono[:pos] + mono[pos + 1:]))
                table[k, factor - 1, lookup[rest]] += 1.0
    return table


ANGULAR_JACOBIAN = _angular_jacobian_table()


def _full_index(*cartesian: int) -> int:
    """Position of a Cartesian component (indices 0-2) in the 40-component layout [1, u, uu, uuu]."""
    if len(cartesian) == 1:
        return 1 + cartesian[0]
    if len(cartesian) == 2:
        return 4 + 3 * cartesian[0] + cartesian[1]
    return 13 + 9 * cartesian[0] + 3 * cartesian[1] + cartesian[2]


def _contraction_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The contractions of the feature table as fixed tensors on the 20 symmetric components:
    pair blocks P[blk, m, m'] (11, 22, 33) with f_st = psi_s P psi_t, and triple blocks T[blk, m, m', m'']
    (222, 112, 233, 123) with f_stu = sum T psi_s,m psi_t,m' psi_u,m''. Built by enumerating the
    Cartesian indices of each contraction exactly as the table (and :func:`invariants_cartesian`) states."""
    full_to_sym = SYMMETRIC_TO_FULL.tolist()
    r = range(3)
    pair = torch.zeros(3, N_MOMENTS, N_MOMENTS, dtype=torch.float64)
    triple = torch.zeros(4, N_MOMENTS, N_MOMENTS, N_MOMENTS, dtype=torch.float64)

    def add(table, blk, *full):
        table[(blk, *(full_to_sym[f] for f in full))] += 1.0

    for a in r:
        add(pair, 0, _full_index(a), _full_index(a))                                         # 11
        for b in r:
            add(pair, 1, _full_index(a, b), _full_index(a, b))                               # 22
            add(triple, 1, _full_index(a), _full_index(b), _full_index(a, b))               # 112
            for c in r:
                add(pair, 2, _full_index(a, b, c), _full_index(a, b, c))                     # 33
                add(triple, 0, _full_index(a, b), _full_index(b, c), _full_index(c, a))      # 222
                add(triple, 3, _full_index(a), _full_index(b, c), _full_index(a, b, c))     # 123
                for d in r:
                    add(triple, 2, _full_index(a, b), _full_index(a, c, d), _full_index(b, c, d))  # 233
    return pair, triple


# Triple blocks grouped by the orders of their three moments, so each dense product stays small:
# (blocks, components of psi_s, of psi_t, of psi_u) in the 20-component layout (0 | 1-3 | 4-9 | 10-19).
TRIPLE_GROUPS = (((0, 1), slice(1, 10), slice(1, 10), slice(4, 10)),     # 222, 112: psi_u of order 2
                 ((2, 3), slice(1, 10), slice(4, 20), slice(10, 20)))   # 233, 123: psi_u of order 3


def _feature_index(n: int) -> torch.Tensor:
    """Where each feature of the table sits in [psi0 (n) | pair (s, blk, t) | triple groups (u, s, blk, t)]."""
    pair_at = lambda blk, s, t: n + (s * 3 + blk) * n + t
    starts, offset = {}, n + 3 * n * n
    for blocks, *_ in TRIPLE_GROUPS:
        for k, blk in enumerate(blocks):
            starts[blk] = (offset, k, len(blocks))
        offset += n * n * n * len(blocks)

    def triple_at(blk, s, t, u):
        start, k, width = starts[blk]
        return start + ((u * n + s) * width + k) * n + t

    r = range(n)
    index = list(range(n))
    for blk in range(3):
        index += [pair_at(blk, s, t) for s in r for t in r if s <= t]
    for blk, keep in enumerate((lambda s, t, u: s <= t <= u, lambda s, t, u: s <= t,
                                lambda s, t, u: t <= u, lambda s, t, u: True)):
        index += [triple_at(blk, s, t, u) for s, t, u in itertools.product(r, r, r) if keep(s, t, u)]
    return torch.tensor(index)


PAIR_TABLE, TRIPLE_TABLE = _contraction_tables()


def _triple_group_tables() -> list[torch.Tensor]:
    """Per group, T[blk, m, m', m''] restricted to its components and laid out (m'', m blk m')."""
    out = []
    for blocks, s_part, t_part, u_part in TRIPLE_GROUPS:
        t = TRIPLE_TABLE[list(blocks)][:, s_part, t_part, u_part]                 # (blk, m, m', m'')
        out.append(t.permute(3, 1, 0, 2).reshape(t.shape[3], -1))
    return out


def invariants(psi: torch.Tensor, index: torch.Tensor, pair_table: torch.Tensor,
               triple_tables: list[torch.Tensor]) -> torch.Tensor:
    """The feature table from the symmetric moments ``psi`` (M, n_radial, 20) -> (M, n_features), as a few
    dense products with fixed tables: ``pair_table`` (20, 3*20) = P[blk, m, m'] laid out (m, blk m') and,
    per group of :data:`TRIPLE_GROUPS`, T[blk, m, m', m''] laid out (m'', m blk m'). Fewer, larger
    operations than one einsum per contraction: at these sizes the count of operations sets the cost."""
    m, n, c = psi.shape
    pair = torch.matmul(torch.matmul(psi, pair_table).reshape(m, n * 3, c), psi.transpose(1, 2))
    parts = [psi[..., 0], pair.reshape(m, -1)]
    for (blocks, s_part, t_part, u_part), table in zip(TRIPLE_GROUPS, triple_tables):
        ps, pt, pu = psi[..., s_part], psi[..., t_part], psi[..., u_part]
        cs, nb = ps.shape[-1], len(blocks)
        v = torch.matmul(pu, table)                                                # (M, u, m blk m')
        x = torch.matmul(v.reshape(m, n * cs * nb, -1), pt.transpose(1, 2))       # (M, u m blk, t)
        triple = torch.matmul(ps[:, None], x.reshape(m, n, cs, nb * n))          # (M, u, s, blk t)
        parts.append(triple.reshape(m, -1))
    return torch.cat(parts, dim=-1).index_select(-1, index)


@dataclass
class PairTerms:
    """The pair terms of the neighbour sums M of a batch: they depend on the positions only, not on any
    learnable weight, and hold what the first derivatives of M need (all (B, N, N, ...))."""

    by_species: torch.Tensor   # g_s'(d_ij) f_c(d_ij) in the slot (Z_j, s'), (B, N, N, S*n_basis)
    ang: torch.Tensor          # A_m(u_ij), (B, N, N, 20)
    dradial: torch.Tensor      # d [g_s' f_c] / d d_ij, (B, N, N, n_basis)
    unit: torch.Tensor         # u_ij, (B, N, N, 3); 0 where the pair does not exist
    d: torch.Tensor            # d_ij Å; 1 where the pair does not exist
    species: torch.Tensor      # (B, N)
    n_species: int


def pair_terms(r: torch.Tensor, species: torch.Tensor, mask: torch.Tensor, n_species: int, centres: torch.Tensor,
               beta: float, cutoff: float) -> tuple[torch.Tensor, PairTerms]:
    """The neighbour sums M (B, N, S*n_basis, 20) of positions ``r`` (B, N, 3) Å, and their pair terms."""
    b, n, _ = r.shape
    rij = r[:, None, :, :] - r[:, :, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=r.device)
    real = mask[:, :, None] & mask[:, None, :] & ~eye
    d = torch.sqrt(torch.where(real, (rij * rij).sum(-1), torch.ones_like(rij[..., 0])))
    within = (real & (d < cutoff)).to(r.dtype)
    unit = rij / d[..., None] * real[..., None]
    arg = d * (math.pi / cutoff)
    fc = 0.5 * (torch.cos(arg) + 1.0) * within
    dfc = -0.5 * (math.pi / cutoff) * torch.sin(arg) * within
    diff = d[..., None] - centres
    g = gaussian(-beta * diff * diff)                                              # (B, N, N, n_basis)
    radial = g * fc[..., None]
    dradial = g * (dfc[..., None] - 2.0 * beta * diff * fc[..., None])            # d radial / d d_ij
    onehot = nn.functional.one_hot(species.clamp(min=0), n_species).to(r.dtype) * mask[..., None]
    by_species = (onehot[:, None, :, :, None] * radial[:, :, :, None, :]).reshape(b, n, n, -1)
    ang = angular_moments(unit)                                                    # (B, N, N, 20)
    m = torch.matmul(by_species.transpose(-1, -2), ang)                           # (B, N, Q, 20)
    return m, PairTerms(by_species, ang, dradial, unit, d, species, n_species)


def moment_sums_vjp(t: PairTerms, grad: torch.Tensor) -> torch.Tensor:
    """dL/dr (R, B, N, 3) from R cotangents dL/dM (R, B, N, Q, 20): the position gradient of the sums."""
    s, nb = t.n_species, t.dradial.shape[-1]
    d_by_species = torch.matmul(t.ang[None], grad.transpose(-1, -2))              # (R, B, N, N, Q)
    d_ang = torch.matmul(t.by_species[None], grad)                                # (R, B, N, N, 20)
    index = t.species.clamp(min=0)[None, :, None, :, None, None].expand(*d_by_species.shape[:4], 1, nb)
    d_radial = torch.gather(d_by_species.reshape(*d_by_species.shape[:4], s, nb), 4, index)[..., 0, :]
    d_dist = (d_radial * t.dradial).sum(-1)                                        # (R, B, N, N)
    # dL/du_x = sum_m dL/dA_m dA_m/du_x, with dA_m/du_x linear in the monomials of order <= 2
    table = ANGULAR_JACOBIAN.to(device=grad.device, dtype=grad.dtype).reshape(N_MOMENTS, 30)
    d_unit = (torch.matmul(d_ang, table).unflatten(-1, (3, 10)) * t.ang[None, ..., None, :10]).sum(-1)
    radial_part = (d_unit * t.unit).sum(-1, keepdim=True)
    g_rij = d_dist[..., None] * t.unit + (d_unit - radial_part * t.unit) / t.d[..., None]  # dL/d(r_j - r_i)
    return g_rij.sum(-3) - g_rij.sum(-2)                                           # (R, B, N, 3)


def moment_sums_jvp(t: PairTerms, dr: torch.Tensor) -> torch.Tensor:
    """dM (B, N, Q, 20) for a displacement dr (B, N, 3) Å: the adjoint of :func:`moment_sums_vjp`."""
    b, n = t.d.shape[:2]
    drij = dr[:, None, :, :] - dr[:, :, None, :]                                   # d(r_j - r_i)
    dd = (drij * t.unit).sum(-1, keepdim=True)                                     # d d_ij
    du = (drij - dd * t.unit) / t.d[..., None]                                     # d u_ij
    onehot = nn.functional.one_hot(t.species.clamp(min=0), t.n_species).to(dr.dtype)
    d_radial = dd * t.dradial                                                      # (B, N, N, n_basis)
    # the one-hot of j puts each term in its species slot; padding atoms have zero pair terms anyway
    d_by_species = (onehot[:, None, :, :, None] * d_radial[:, :, :, None, :]).reshape(b, n, n, -1)
    table = ANGULAR_JACOBIAN.to(device=dr.device, dtype=dr.dtype).reshape(N_MOMENTS, 30)
    d_ang = torch.matmul((du[..., :, None] * t.ang[..., None, :10]).reshape(b, n, n, 30), table.t())
    return (torch.matmul(t.by_species.transpose(-1, -2), d_ang)
            + torch.matmul(d_by_species.transpose(-1, -2), t.ang))


class _MomentSums(torch.autograd.Function):
    """M[r, b, i, (z, s'), m] = sum_{j of species z} g_s'(d_ij) f_c(d_ij) A_m(u_ij) with a hand-written
    backward, for inference (forces without ``create_graph``).

    ``positions`` is (R, B, N, 3): R identical replicas (R = K committee members when every member needs
    its own forces, else 1). The sums are computed once, from replica 0, and returned R times; the backward
    takes R different cotangents (one per member) and returns R position gradients, i.e. every member's
    forces, for about the cost of R backward passes through the pair terms alone. Autograd through
    :meth:`GaussianMomentDescriptor.shared_moments` gives the same numbers (tested) and is what Hessians
    use: this backward is not differentiable again (training uses :class:`MomentForces`)."""

    @staticmethod
    def forward(ctx, positions, species, mask, n_species, centres, beta, cutoff):
        if positions.shape[0] > 1 and not torch.equal(positions[0], positions[-1]):
            raise ValueError("_MomentSums: the replicas of the positions differ (they must be copies)")
        m, ctx.terms = pair_terms(positions[0], species, mask, n_species, centres, beta, cutoff)
        return m.expand(positions.shape[0], *m.shape)

    @staticmethod
    def backward(ctx, grad):
        return moment_sums_vjp(ctx.terms, grad), None, None, None, None, None, None


class MomentForces(torch.autograd.Function):
    """dE/dr (B, N, 3) from dE/dM (B, N, Q, 20), for training on forces: the positions are data, so the
    pair terms are constants and this map is linear in dE/dM; its backward, the JVP of M, gives the force
    loss its gradient with respect to dE/dM (hence to every weight) without second derivatives of the
    geometry. Equal to double backward through :meth:`GaussianMomentDescriptor.shared_moments` (tested)."""

    @staticmethod
    def forward(ctx, grad_m, terms: PairTerms):
        ctx.terms = terms
        return moment_sums_vjp(terms, grad_m[None])[0]

    @staticmethod
    def backward(ctx, grad_r):
        return moment_sums_jvp(ctx.terms, grad_r), None


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
        self.register_buffer("feature_index", _feature_index(n_radial), persistent=False)
        c = N_MOMENTS
        self.register_buffer("pair_table", PAIR_TABLE.permute(1, 0, 2).reshape(c, 3 * c).float().clone(),
                             persistent=False)
        for k, table in enumerate(_triple_group_tables()):
            self.register_buffer(f"triple_table_{k}", table.float().clone(), persistent=False)
        self.n_features = n_features(n_radial)

    @property
    def index(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"idx_{name}") for name in ("11", "22", "33", "222", "112", "233")}

    def shared_moments(self, batch: Batch, pairs: Pairs | None = None) -> torch.Tensor:
        """M[b, i, (z, s'), m]: neighbour sums split by neighbour species, independent of the members
        (m: the 20 symmetric moment components). Plain autograd: differentiable to any order."""
        pairs = pair_geometry(batch, self.cutoff) if pairs is None else pairs
        radial = self.basis(pairs.distances) * pairs.cutoff[..., None]            # (B, N, N, n_basis)
        onehot = nn.functional.one_hot(batch.species.clamp(min=0), self.n_species).to(radial.dtype)
        onehot = onehot * batch.mask[..., None]
        by_species = radial[:, :, :, None, :] * onehot[:, None, :, :, None]        # (B, N, N, S, n_basis)
        b, n = batch.species.shape
        by_species = by_species.reshape(b, n, n, self.n_species * self.n_basis)
        ang = angular_moments(pairs.unit)                                          # (B, N, N, 20)
        return torch.matmul(by_species.transpose(-1, -2), ang)                    # (B, N, S*n_basis, 20)

    @staticmethod
    def _replicas(batch: Batch, replicas: int) -> tuple[torch.Tensor, int]:
        """The positions of a batch of ``replicas`` x B copies (member-major) as (replicas, B, N, 3), and B."""
        b = batch.species.shape[0] // replicas
        return batch.positions.reshape(replicas, b, *batch.positions.shape[1:]), b

    def _fast_moments(self, batch: Batch, replicas: int) -> torch.Tensor:
        positions, b = self._replicas(batch, replicas)
        return _MomentSums.apply(positions, batch.species[:b], batch.mask[:b], self.n_species,
                                 self.basis.centres.to(positions.dtype), self.basis.beta, self.cutoff)

    def forward(self, batch: Batch, per_member: bool = False, fast: bool = False) -> torch.Tensor:
        """(K, B, N, n_features). With ``per_member=True`` the batch holds K x B structures, member-major
        (member k sees only structures k*B .. k*B+B-1, copies of the same B structures): backpropagating
        the sum of all member energies then gives every member's own forces in a single backward pass.

        ``fast=True`` computes the neighbour sums once, even for K copies, with a hand-written backward:
        for energies and forces at inference, not for training or Hessians (no second derivatives). With
        frozen coefficients it runs the compiled descriptor (:class:`~driver.models.fast_kernels.DescriptorC`)
        where it is built and the batch is on the CPU, else :class:`_MomentSums` and the PyTorch invariants."""
        k = self.coefficients.shape[0]
        c = self.coefficients.reshape(k, self.n_species, self.n_species * self.n_basis, self.n_radial)
        if (fast and fast_kernels.AVAILABLE and not self.coefficients.requires_grad
                and batch.positions.device.type == "cpu"):
            positions, b = self._replicas(batch, k if per_member else 1)
            return fast_kernels.DescriptorC.apply(positions, batch.species[:b], c / math.sqrt(self.n_basis),
                                                  self.basis.centres, self.basis.beta, self.cutoff,
                                                  self.n_features)
        if per_member:
            n = batch.species.shape[1]
            species = batch.species.clamp(min=0).reshape(k, -1, n)                 # (K, B, N)
            c_i = c[torch.arange(k, device=species.device)[:, None, None], species] / math.sqrt(self.n_basis)
            if fast:
                m = self._fast_moments(batch, k)                                   # (K, B, N, Q, 20)
            else:
                m = self.shared_moments(batch)
                m = m.reshape(k, -1, *m.shape[1:])
            psi = torch.einsum("kbiqs,kbiqm->kbism", c_i, m)                       # (K, B, N, n_radial, 20)
        else:
            m = self._fast_moments(batch, 1)[0] if fast else self.shared_moments(batch)
            psi = torch.einsum("kbiqs,biqm->kbism", self.centre_coefficients(batch.species), m)
        return self.features_from_moments(psi)

    def centre_coefficients(self, species: torch.Tensor) -> torch.Tensor:
        """(K, B, N, S*n_basis, n_radial): every member's radial contraction for the species of each centre
        atom, divided by sqrt(n_basis); psi = einsum("kbiqs,biqm->kbism", this, M)."""
        k = self.coefficients.shape[0]
        c = self.coefficients.reshape(k, self.n_species, self.n_species * self.n_basis, self.n_radial)
        return c[:, species.clamp(min=0)] / math.sqrt(self.n_basis)

    def features_from_moments(self, psi: torch.Tensor) -> torch.Tensor:
        """Features (..., n_features) from the moments psi (..., n_radial, 20)."""
        lead = psi.shape[:-2]
        tables = [getattr(self, f"triple_table_{k}").to(psi.dtype) for k in range(len(TRIPLE_GROUPS))]
        feats = invariants(psi.reshape(-1, *psi.shape[-2:]), self.feature_index, self.pair_table.to(psi.dtype),
                           tables)
        return feats.reshape(*lead, -1)


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
