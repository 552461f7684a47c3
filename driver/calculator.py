"""The committee as an ASE calculator, so every ASE tool (optimizers, Vibrations, Infrared, MD) works with it.

Results: ``energy`` (eV, committee mean), ``forces`` (eV/Å), ``dipole`` (e·Å; only with a dipole model),
and the committee statistics ``energy_std_per_atom`` (eV), ``max_force_std`` (eV/Å), ``dipole_std`` (e·Å).
:meth:`NanosilCalculator.hessian` and :meth:`NanosilCalculator.dipole_derivatives` are exact (autograd)
and agree with ASE's finite differences.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .models.committee import Committee, load_committee
from .models.geometry import Batch


class NanosilCalculator(Calculator):
    implemented_properties = ["energy", "free_energy", "forces", "dipole",
                              "energy_std_per_atom", "max_force_std", "dipole_std"]

    def __init__(self, model: Committee | str | Path, dtype: torch.dtype = torch.float64,
                 member_forces: bool = True, device=None, **kwargs):
        """``model``: a :class:`Committee` or a model folder. float64 by default (optimisations and finite
        differences want it); float32 is ~2x faster for MD. ``member_forces=False`` skips the per-member
        forces (``max_force_std`` is then NaN) for a cheaper single backward pass. ``device``: ``cpu``,
        ``cuda`` or ``auto`` (:func:`driver.device.resolve_device`); None keeps a given committee where it is
        and loads a folder onto the CPU. A given committee is converted in place."""
        super().__init__(**kwargs)
        if isinstance(model, (str, Path)):
            committee = load_committee(model, dtype=dtype, device="cpu" if device is None else device)
        else:
            committee = model.to(dtype, device)
        self.committee = committee
        self.member_forces = member_forces

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        c = self.committee
        c.validate(self.atoms.numbers, self.atoms.positions)
        p = c.predict(self.atoms.numbers, self.atoms.positions, member_forces=self.member_forces)
        self.results = {"energy": p.energy, "free_energy": p.energy, "forces": p.forces,
                        "energy_std_per_atom": p.energy_std_per_atom, "max_force_std": p.max_force_std}
        if p.dipole is not None:
            self.results["dipole"] = p.dipole
            self.results["dipole_std"] = p.dipole_std if p.dipole_std is not None else 0.0

    # -------------------------------------------------------------- exact derivatives
    def _tensors(self, atoms):
        c = self.committee
        idx = torch.as_tensor(c.species_index(atoms.numbers)).to(c.device)[None]
        pos = torch.as_tensor(atoms.positions, dtype=c.dtype).to(c.device)
        return idx, pos

    def hessian(self, atoms=None) -> np.ndarray:
        """(3N, 3N) second derivatives of the committee-mean energy, eV/Å^2, by autograd."""
        atoms = atoms if atoms is not None else self.atoms
        c = self.committee
        idx, pos = self._tensors(atoms)
        mask = idx >= 0

        def energy(flat):
            e = c.energy_model(Batch(idx, flat.reshape(1, -1, 3), mask))
            return e.mean(0).sum()

        h = torch.autograd.functional.hessian(energy, pos.reshape(-1))
        return h.detach().cpu().double().numpy()

    def dipole_derivatives(self, atoms=None) -> np.ndarray:
        """(N, 3, 3) array d mu_b / d r_{i,a} in e (index order [atom i, Cartesian a, dipole component b])."""
        atoms = atoms if atoms is not None else self.atoms
        c = self.committee
        if c.dipole_model is None:
            raise ValueError("this committee has no dipole model: train with --dipole")
        idx, pos = self._tensors(atoms)
        mask = idx >= 0

        def dipole(p):
            return c.dipole_model(Batch(idx, p[None], mask), c.config.total_charge).mean(0)[0]

        jac = torch.autograd.functional.jacobian(dipole, pos)          # (3 b, N i, 3 a)
        return jac.permute(1, 2, 0).detach().cpu().double().numpy()
