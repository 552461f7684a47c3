"""The compiled descriptor kernels (driver/models/_gm_kernels.c) against their PyTorch definitions, in float64:
the invariants and the whole descriptor, forward, and their backward against autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from driver.models import fast_kernels
from driver.models import gaussian_moments as gm
from driver.models.geometry import Batch, make_batch

pytestmark = pytest.mark.skipif(fast_kernels._gm_kernels is None,
                                reason="the C extension driver.models._gm_kernels is not built")
kernels = fast_kernels._gm_kernels


def test_invariants_and_their_gradient_match_the_cartesian_definition():
    torch.manual_seed(0)
    for n in (5, 3):
        psi = torch.randn(7, n, 20, dtype=torch.float64, requires_grad=True)
        reference = gm.invariants_cartesian(psi[..., gm.SYMMETRIC_TO_FULL], gm._block_indices(n))
        feats = np.empty((7, gm.n_features(n)))
        kernels.invariants(psi.detach().numpy().copy(), 7, n, feats)
        np.testing.assert_allclose(feats, reference.detach().numpy(), rtol=1e-12, atol=1e-12)
        cotangent = torch.randn_like(reference)
        (expected,) = torch.autograd.grad((reference * cotangent).sum(), psi)
        grad = np.empty((7, n, 20))
        kernels.invariants_backward(psi.detach().numpy().copy(), cotangent.numpy().copy(), 7, n, grad)
        np.testing.assert_allclose(grad, expected.numpy(), rtol=1e-12, atol=1e-12)


def test_descriptor_and_its_gradient_match_autograd():
    """Neighbour sums, radial contraction and invariants in one call, against the PyTorch descriptor:
    features of 3 members, per-member position gradients (one replica each) and the gradient of the sum."""
    desc = gm.GaussianMomentDescriptor(3, n_members=3).double()
    rng = np.random.default_rng(1)
    # two structures of different sizes (padding), some pairs beyond the 5 Å cutoff
    batch = make_batch([rng.integers(0, 3, 12), rng.integers(0, 3, 9)],
                       [rng.uniform(0, 7, (12, 3)), rng.uniform(0, 7, (9, 3))], dtype=torch.float64)
    coefficients = desc.coefficients.detach().reshape(3, 3, 21, 5) / np.sqrt(desc.n_basis)
    reference = desc(batch)                                                       # (K, B, N, F)
    cotangent = torch.randn_like(reference)
    for replicas in (3, 1):
        positions = batch.positions[None].repeat(replicas, 1, 1, 1).requires_grad_(True)
        feats = fast_kernels.DescriptorC.apply(positions, batch.species, coefficients, desc.basis.centres,
                                               desc.basis.beta, desc.cutoff, desc.n_features)
        torch.testing.assert_close(feats, reference, rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad((feats * cotangent).sum(), positions)
        for r in range(replicas):
            p = batch.positions.clone().requires_grad_(True)
            f = desc(Batch(batch.species, p, batch.mask))
            loss = (f[r] * cotangent[r]).sum() if replicas > 1 else (f * cotangent).sum()
            (expected,) = torch.autograd.grad(loss, p)
            torch.testing.assert_close(grad[r], expected, rtol=1e-10, atol=1e-12)


def test_wrong_buffer_sizes_and_replicas_are_refused():
    with pytest.raises(ValueError, match="psi has"):
        kernels.invariants(np.zeros((2, 5, 20)), 3, 5, np.empty((3, 360)))
    desc = gm.GaussianMomentDescriptor(3, n_members=2).double()
    positions = torch.zeros(2, 1, 4, 3, dtype=torch.float64)
    positions[1, 0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="replicas"):
        fast_kernels.DescriptorC.apply(positions, torch.zeros(1, 4, dtype=torch.long),
                                       desc.coefficients.reshape(2, 3, 21, 5), desc.basis.centres,
                                       desc.basis.beta, desc.cutoff, 360)
