"""Initial training data of one cluster (the paper's Sec. II B): optional relaxation with the reference
backend, its harmonic analysis, modified normal-mode sampling (:mod:`al_manager.learning.normal_modes`), then
farthest point sampling (:mod:`al_manager.learning.fps`) down to ``n_select`` (default 3 x N_atoms) displaced
structures plus the minimum itself, taking the temperatures in turn (``balance_temperatures``).

The structures come back unlabelled, each tagged in ``atoms.info``: ``cluster`` (the name), ``origin``
(``minimum`` or ``normal_modes``) and, for displaced ones, ``mode`` (index in the harmonic analysis, -1
for a random combination), ``mode_temperature`` (K) and ``sign``. Labelling is done by
:func:`al_manager.reference.labelling.label_structures`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms

from . import fps, normal_modes


@dataclass
class InitialDataSettings:
    """The ``[initial_data]`` section of the active-learning configuration."""

    relax: bool = True                 # relax with the reference backend before the harmonic analysis
    relax_fmax: float = 0.01           # eV/Å
    temperatures: list[float] = field(default_factory=lambda: [100.0, 300.0, 600.0, 1000.0, 1500.0])
    # K: amplitudes are the classical turning points of a mode carrying k_B T (see al_manager.learning.normal_modes)
    max_displacement: float = 0.3      # Å: no atom of a candidate moves further from the minimum
    n_random: int = 10                 # random combinations of all modes (thermal samples)
    n_select: int | None = None        # displaced structures kept by FPS; default 3 x N_atoms
    # FPS takes the candidates of each temperature in turn (coldest first), so each amplitude keeps an equal
    # share. One FPS over all of them (false, the paper's) keeps almost only the hottest, farthest out: then
    # no label lies near the minimum, whose curvatures the harmonic frequencies are (bench/label_efficiency.py
    # compares both).
    balance_temperatures: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.temperatures:
            raise ValueError("temperatures must list at least one temperature (K)")
        for k, t in enumerate(self.temperatures):
            if not t > 0:
                raise ValueError(f"temperatures[{k}] = {t}: must be > 0 K")
        if not self.max_displacement > 0:
            raise ValueError(f"max_displacement must be > 0 Å, got {self.max_displacement}")
        if not self.relax_fmax > 0:
            raise ValueError(f"relax_fmax must be > 0 eV/Å, got {self.relax_fmax}")
        if self.n_random < 0:
            raise ValueError(f"n_random must be >= 0, got {self.n_random}")
        if self.n_select is not None and self.n_select < 1:
            raise ValueError(f"n_select must be >= 1, got {self.n_select}")


def make_initial_data(atoms: Atoms, backend, settings: InitialDataSettings | None = None, *,
                      name: str | None = None, workdir: str | os.PathLike | None = None,
                      log: Callable[[str], None] | None = None, stencil: dict | None = None) -> list[Atoms]:
    """The minimum followed by ``n_select`` FPS-chosen normal-mode displacements of ``atoms``.

    ``backend``: a :class:`al_manager.reference.ReferenceBackend`; ``name``: the cluster tag (default
    ``atoms.info['cluster']`` or the formula); ``workdir``: where the harmonic analysis caches its
    displaced calculations (a rerun reuses them); ``stencil``: the finite differences of that analysis (``delta``
    and ``nfree`` of ``backend.harmonic``; the active-learning loop passes its yardstick's, whose displaced
    calculations on the same minimum are then already there). Raises :class:`al_manager.reference.ReferenceError`
    when the relaxation or the harmonic analysis fails.
    """
    s = settings or InitialDataSettings()
    name = name or atoms.info.get("cluster") or atoms.get_chemical_formula()
    minimum = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    if s.relax:
        minimum = backend.relax(minimum, fmax=s.relax_fmax)
        minimum = Atoms(numbers=minimum.numbers, positions=minimum.positions)
        if log:
            log(f"{name}: relaxed to fmax {s.relax_fmax} eV/Å")
    harmonic_kw = {**(stencil or {}), **({"workdir": str(workdir)} if workdir is not None else {})}
    har = backend.harmonic(minimum, **harmonic_kw)
    rng = np.random.default_rng(s.seed)
    cands = normal_modes.displacements(minimum, har.frequencies, har.modes, temperatures=s.temperatures,
                                       max_displacement=s.max_displacement, n_random=s.n_random, rng=rng)
    vib = normal_modes.vibrational_indices(har.frequencies, minimum)
    n_imag = int(np.sum(har.frequencies[vib] < 0))
    if log:
        log(f"{name}: {len(vib)} vibrational modes ({har.frequencies[vib].min():.0f} to "
            f"{har.frequencies[vib].max():.0f} cm^-1{f', {n_imag} imaginary' if n_imag else ''}), "
            f"{len(cands)} candidate displacements")

    pool = [minimum] + [Atoms(numbers=minimum.numbers, positions=c.positions) for c in cands]
    n_select = s.n_select if s.n_select is not None else 3 * len(minimum)
    features = fps.global_descriptor(pool)
    groups = [-1.0] + [c.temperature for c in cands] if s.balance_temperatures else None
    chosen = fps.farthest_point_sampling(features, n_select + 1, first=0, groups=groups)
    if log and groups is not None:
        taken = np.asarray(groups)[chosen[1:]]
        log(f"{name}: FPS kept " + ", ".join(f"{int(np.sum(taken == t))} at {t:g} K" for t in sorted(set(groups[1:]))))

    out = []
    for idx in chosen:
        a = pool[idx].copy()
        a.info = {"cluster": name}
        if idx == 0:
            a.info["origin"] = "minimum"
        else:
            c = cands[idx - 1]
            a.info.update(origin="normal_modes", mode=c.mode, mode_temperature=c.temperature, sign=c.sign,
                          scale=round(c.scale, 6))
        out.append(a)
    return out


def initial_data_from_file(name: str, path: str | os.PathLike, backend, settings: InitialDataSettings | None = None,
                           *, workdir: str | os.PathLike | None = None,
                           log: Callable[[str], None] | None = None) -> list[Atoms]:
    """:func:`make_initial_data` for the first structure of a file (what the active-learning loop calls)."""
    from ase.io import read

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    return make_initial_data(read(str(path), index=0), backend, settings, name=name, workdir=workdir, log=log)
