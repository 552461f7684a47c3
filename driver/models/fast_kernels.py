"""The compiled inference kernels of the Gaussian-moment descriptor (``_gm_kernels.c``) as autograd Functions.

At inference (energies and forces) the whole :class:`~driver.models.gaussian_moments.GaussianMomentDescriptor`
runs in C as one autograd Function, :class:`DescriptorC`: neighbour sums, the members' radial contractions
and the rotation invariants, with a hand-written backward to the positions (none to the weights). It
computes in float64 whatever the model's dtype and gives the same numbers as the PyTorch definition (tested
to 1e-10 in float64). Its backward is not differentiable again: training and Hessians use PyTorch.

The extension is built by ``pip install`` where a C compiler exists (``setup.py``, optional). Where it is
missing, or with ``NANOSIL_C_KERNELS=0`` in the environment, :data:`AVAILABLE` is False and the model falls
back to PyTorch with no change but speed.
"""
from __future__ import annotations

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
        r, b, n, _ = positions.shape
        if r > 1 and not torch.equal(positions[0], positions[-1]):
            raise ValueError("DescriptorC: the replicas of the positions differ (they must be copies)")
        k, s, _, n_radial = coefficients.shape
        if r not in (1, k):
            raise ValueError(f"DescriptorC: {r} position replicas for {k} members (must be 1 or {k})")
        pos = _f64(positions[0])
        z = np.ascontiguousarray(species.cpu().numpy(), dtype=np.int64)
        c, mu = _f64(coefficients), _f64(centres)
        feats = np.empty((k, b, n, n_features))
        psi = np.empty((k, b, n, n_radial, 20))
        _gm_kernels.features(pos, z, b, n, s, mu, float(beta), float(cutoff), c, k, n_radial, feats, psi)
        ctx.saved = (pos, z, s, mu, float(beta), float(cutoff), c, k, n_radial, psi, r)
        return torch.from_numpy(feats).to(positions.dtype)

    @staticmethod
    def backward(ctx, grad):
        pos, z, s, mu, beta, cutoff, c, k, n_radial, psi, r = ctx.saved
        b, n = z.shape
        out = np.empty((r, b, n, 3))
        _gm_kernels.features_backward(pos, z, b, n, s, mu, beta, cutoff, c, k, n_radial, psi, _f64(grad), r, out)
        return torch.from_numpy(out).to(grad.dtype), None, None, None, None, None, None
