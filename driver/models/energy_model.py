"""GM-NN energies: Gaussian moments -> atomic network -> per-species scaled atomic energies (eV).

E_k = sum_i [ scale_k[Z_i] * net_k(G_i) ] for each of the K stacked members. The per-species energy
shifts (a ridge regression of energies on composition) are added outside, in float64, by the committee:
absolute energies of these clusters are ~ -4e4 eV, beyond float32's resolution.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import atomic_network, fast_kernels
from .gaussian_moments import GaussianMomentDescriptor
from .geometry import Batch
from .layers import StackedLinear


class EnergyModel(nn.Module):
    def __init__(self, n_species: int, n_members: int = 1, hidden: tuple[int, ...] = (512, 512),
                 n_basis: int = 7, n_radial: int = 5, r_min: float = 0.5, cutoff: float = 5.0):
        super().__init__()
        self.n_members = n_members
        self.descriptor = GaussianMomentDescriptor(n_species, n_members, n_basis, n_radial, r_min, cutoff)
        sizes = (self.descriptor.n_features, *hidden, 1)
        self.layers = nn.ModuleList(StackedLinear(n_members, a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        # Fixed feature standardisation (set from training data by `fit_normalisation`), per member.
        self.register_buffer("feature_mean", torch.zeros(n_members, 1, self.descriptor.n_features))
        self.register_buffer("feature_std", torch.ones(n_members, 1, self.descriptor.n_features))
        self.atomic_scale = nn.Parameter(torch.ones(n_members, n_species))

    def network_trainable(self) -> bool:
        """Whether any weight of the atomic network takes a gradient (training): then autograd runs it."""
        return any(t is not None and t.requires_grad for layer in self.layers for t in (layer.weight, layer.bias))

    def features(self, batch: Batch, per_member: bool = False, fast: bool = False) -> torch.Tensor:
        return self.descriptor(batch, per_member, fast)  # (K, B, N, F)

    def atomic_energies(self, batch: Batch, per_member: bool = False, fast: bool = False) -> torch.Tensor:
        """(K, B, N) atomic energies in eV (without the per-species shift), zero on padding.
        ``per_member``, ``fast``: see :meth:`GaussianMomentDescriptor.forward` (B structures per member;
        ``fast`` for inference forces only). With ``fast`` and frozen weights the atomic network runs as
        :class:`~driver.models.atomic_network.InferenceNetwork` (same math, GEMM library per
        ``NANOSIL_GEMM``)."""
        g = self.features(batch, per_member, fast)
        k, b, n, f = g.shape
        if fast and not self.network_trainable() and atomic_network.requested() != "autograd":
            # inference: the network with its hand-written input gradient, in the fastest GEMM library
            out = atomic_network.atomic_outputs(self, g.reshape(k, b * n, f)).reshape(k, b, n)
        else:
            x = ((g.reshape(k, b * n, f) - self.feature_mean) / self.feature_std)
            for layer in self.layers[:-1]:
                x = nn.functional.silu(layer(x))
            out = self.layers[-1](x).reshape(k, b, n)
        species = batch.species.clamp(min=0)
        if per_member:
            species, mask = species.reshape(k, b, n), batch.mask.reshape(k, b, n)
            scale = self.atomic_scale[torch.arange(k, device=species.device)[:, None, None], species]  # (K, B, N)
            return out * scale * mask
        scale = self.atomic_scale[:, species]                                       # (K, B, N)
        return out * scale * batch.mask

    def forward(self, batch: Batch, per_member: bool = False, fast: bool = False) -> torch.Tensor:
        """(K, B) total energies in eV (without shifts)."""
        return self.atomic_energies(batch, per_member, fast).sum(-1)

    # ------------------------------------------------------------ inference without autograd
    def can_infer(self) -> bool:
        """Whether :meth:`infer` can run: the compiled descriptor is built, the weights are on the CPU (it is
        CPU code; on a GPU the PyTorch path runs), no weight takes a gradient, and ``NANOSIL_GEMM`` is not
        ``autograd``."""
        return (fast_kernels.AVAILABLE and self.atomic_scale.device.type == "cpu"
                and not self.descriptor.coefficients.requires_grad
                and not self.atomic_scale.requires_grad and not self.network_trainable()
                and atomic_network.requested() != "autograd")

    @torch.no_grad()
    def infer(self, species, positions, replicas: int | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Energies and their position gradients at inference, without autograd: the compiled descriptor
        (:func:`~driver.models.fast_kernels.features`), the network and its input gradient
        (:class:`~driver.models.atomic_network.Prepared`), the descriptor's backward -- the same math as
        ``forward(batch, fast=True)`` and autograd, a few graph nodes' and conversions' cost cheaper.

        ``species`` (B, N) indices, -1 for padding; ``positions`` (B, N, 3) Å, rounded to the model's dtype as
        the autograd paths do. Returns the (K, B) energies (eV, without shifts) and, unless ``replicas`` is
        None, dE/dr (R, B, N, 3): member k's own in row k for ``replicas`` = K, that of the members' sum for 1;
        both float64. Only where :meth:`can_infer`."""
        dtype = self.atomic_scale.dtype
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        pos = np.asarray(positions, dtype=np_dtype).astype(np.float64)
        z = np.ascontiguousarray(np.asarray(species), dtype=np.int64)
        desc = self.descriptor
        coefficients, centres = fast_kernels.coefficients(desc)
        feats, saved = fast_kernels.features(pos, z, coefficients, centres, desc.basis.beta, desc.cutoff,
                                             desc.n_features)
        k, b, n, f = feats.shape
        net = atomic_network.prepared(self)
        out, pre = net.forward(torch.from_numpy(feats).reshape(k, b * n, f).to(dtype), replicas is not None)
        scale = torch.from_numpy(self.atomic_scale.numpy()[:, np.maximum(z, 0)] * (z >= 0))   # (K, B, N)
        energies = (out.reshape(k, b, n) * scale).sum(-1).double().numpy()
        if replicas is None:
            return energies, None
        d_feats = net.backward(scale.reshape(k, b * n), pre)                       # (K, B*N, F)
        grad = np.ascontiguousarray(d_feats.numpy(), dtype=np.float64).reshape(k, b, n, f)
        return energies, fast_kernels.features_backward(saved, grad, replicas)

    @torch.no_grad()
    def fit_normalisation(self, batches: list[Batch]) -> None:
        feats = []
        for batch in batches:
            g = self.features(batch)
            feats.append(g[:, batch.mask])                                         # (K, n_atoms, F)
        g = torch.cat(feats, dim=1)
        self.feature_mean.copy_(g.mean(1, keepdim=True))
        self.feature_std.copy_(g.std(1, keepdim=True).clamp(min=1e-6))
