"""The compiled inference kernels of the Gaussian-moment descriptor (``_gm_kernels.c``) as autograd Functions.

At inference (energies and forces) the whole :class:`~driver.models.gaussian_moments.GaussianMomentDescriptor`
runs in C: neighbour sums, the members' radial contractions and the rotation invariants, with a hand-written
backward to the positions (none to the weights). :func:`features` / :func:`features_backward` are the two
calls on numpy arrays (what :meth:`EnergyModel.infer <driver.models.energy_model.EnergyModel.infer>` uses,
without autograd); :class:`DescriptorC` wraps them as one autograd Function for the autograd paths. It
computes in float64 whatever the model's dtype and gives the same numbers as the PyTorch definition (tested
to 1e-10 in float64). Its backward is not differentiable again: training and Hessians use PyTorch.

The extension is built by ``pip install`` where a C compiler exists (``setup.py``, optional). Where it is
missing, or with ``NANOSIL_C_KERNELS=0`` in the environment, :data:`AVAILABLE` is False and the model falls
back to PyTorch with no change but speed.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

try:
    from . import _gm_kernels
except ImportError:  # built without a compiler: the PyTorch path is used
    _gm_kernels = None

DISABLED = os.environ.get("NANOSIL_C_KERNELS", "1") == "0"
AVAILABLE = _gm_kernels is not None and not DISABLED
if _gm_kernels is None and not DISABLED:
    warnings.warn("nanosil: the compiled descriptor (driver.models._gm_kernels) is not built, so inference runs "
                  "the PyTorch version (same numbers, ~1.5x slower); reinstall with a C compiler to build it",
                  RuntimeWarning, stacklevel=2)


def _f64(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float64)


def features(pos: np.ndarray, species: np.ndarray, coefficients: np.ndarray, centres: np.ndarray, beta: float,
             cutoff: float, n_features: int) -> tuple[np.ndarray, tuple]:
    """Features (K, B, N, F) of K members for positions (B, N, 3) and species (B, N) (-1: padding), float64
    C-contiguous arrays; and what :func:`features_backward` needs. ``coefficients``: (K, S, S*n_basis,
    n_radial), divided by sqrt(n_basis)."""
    b, n = species.shape
    k, s, _, n_radial = coefficients.shape
    feats = np.empty((k, b, n, n_features))
    psi = np.empty((k, b, n, n_radial, 20))
    _gm_kernels.features(pos, species, b, n, s, centres, float(beta), float(cutoff), coefficients, k, n_radial,
                         feats, psi)
    return feats, (pos, species, s, centres, float(beta), float(cutoff), coefficients, k, n_radial, psi)


def features_backward(saved: tuple, grad: np.ndarray, replicas: int) -> np.ndarray:
    """Position gradients (R, B, N, 3) of sum(features * grad), grad (K, B, N, F) float64 C-contiguous:
    member k's own gradient in row k (R = K), or their sum (R = 1)."""
    pos, z, s, mu, beta, cutoff, c, k, n_radial, psi = saved
    b, n = z.shape
    out = np.empty((replicas, b, n, 3))
    _gm_kernels.features_backward(pos, z, b, n, s, mu, beta, cutoff, c, k, n_radial, psi, grad, replicas, out)
    return out


def coefficients(descriptor) -> tuple[np.ndarray, np.ndarray]:
    """A :class:`~driver.models.gaussian_moments.GaussianMomentDescriptor`'s radial contraction and Gaussian
    centres as the kernels take them (float64, computed in the model's dtype as :class:`DescriptorC`'s
    callers do), cached on the descriptor until its coefficients change."""
    c = descriptor.coefficients
    key = (c.data_ptr(), c._version, c.dtype, descriptor.basis.centres.data_ptr())
    cache = descriptor.__dict__.get("_kernel_inputs")
    if cache is None or cache[0] != key:
        k = c.shape[0]
        shaped = c.detach().reshape(k, descriptor.n_species, descriptor.n_species * descriptor.n_basis,
                                    descriptor.n_radial) / math.sqrt(descriptor.n_basis)
        cache = (key, _f64(shaped), _f64(descriptor.basis.centres))
        descriptor.__dict__["_kernel_inputs"] = cache
    return cache[1], cache[2]


class DescriptorC(torch.autograd.Function):
    """Gaussian-moment features of K members, (K, B, N, F), from R replicas of the positions (R, B, N, 3).

    R = K: member k's features are computed from replica k (copies of the same structures), so the
    backward of the sum of all member energies gives every member its own forces. R = 1: all members see
    the same positions and the backward gives the gradient of their sum (the mean force, times K). The
    neighbour sums are computed once either way. ``coefficients`` (K, S, S*n_basis, n_radial) are the
    members' radial contractions, divided by sqrt(n_basis); they get no gradient (inference only).
    """

    @staticmethod
    def forward(ctx, positions, species, coefficients, centres, beta, cutoff, n_features):
        r = positions.shape[0]
        if r > 1 and not torch.equal(positions[0], positions[-1]):
            raise ValueError("DescriptorC: the replicas of the positions differ (they must be copies)")
        k = coefficients.shape[0]
        if r not in (1, k):
            raise ValueError(f"DescriptorC: {r} position replicas for {k} members (must be 1 or {k})")
        z = np.ascontiguousarray(species.cpu().numpy(), dtype=np.int64)
        feats, ctx.saved = features(_f64(positions[0]), z, _f64(coefficients), _f64(centres), beta, cutoff,
                                    n_features)
        ctx.replicas = r
        return torch.from_numpy(feats).to(positions.dtype)

    @staticmethod
    def backward(ctx, grad):
        out = features_backward(ctx.saved, _f64(grad), ctx.replicas)
        return torch.from_numpy(out).to(grad.dtype), None, None, None, None, None, None
