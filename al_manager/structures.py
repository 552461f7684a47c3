"""Starting structures for a newcomer: low-energy isomers of a formula by global search on the reference PES.

The search is basin hopping (Wales & Doye 1997) with restarts, on the reference backend's ASE calculator::

    for each of ``starts`` random compact clusters:
        relax it (a local minimum), then ``hops`` times:
            perturb the current minimum (one of three moves), relax, record the minimum,
            accept it as the new current one with the Metropolis rule at ``kT``
    final tight relaxation of the lowest distinct minima; keep ``isomers`` of them

Moves: a random displacement of every atom (uniform in +-``step`` Å per component), an exchange of two
unlike cations (Mg <-> Si: the costly-to-find rearrangement in these mixed oxides), and a jump of one atom
to a random spot just outside the cluster surface. Starting clusters are random points in a sphere holding
``volume_per_atom`` Å^3 per atom, with no two atoms closer than 1.4 Å (cation-anion: 0.8 x the sum of
covalent radii if larger; two anions or two cations: 2.2 / 2.4 Å, so that no O-O bond or cation pair
is built in from the start).

Every minimum is checked before it is kept: no two atoms closer than 0.7 x their covalent radii (a
collapsed frame on which a semi-empirical SCF can converge to an absurd energy), and one connected
cluster (bonds up to 1.3 x the covalent radii). An SCF failure or any other error of the calculator is a
failed trial, counted and reported, never a crash. Two minima are the same isomer when their energies
agree within ``energy_tol`` and their sorted interatomic distances, per element pair, within ``distance_tol``.

Each start is independent (its own seeded random stream), so ``workers`` processes give the same result
as one. The default budget (6 starts x 20 hops) finds the GFN2-xTB global minimum of (MgSiO3)1,
(Mg2SiO4)1 and (MgSiO3)2 (tests/test_structures.py); raise ``starts``/``hops`` for larger clusters.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from driver.geometry_checks import collapsed_or_fragmented
from spectra.atomic import write_text, write_with

#: elements treated as anions when building starting clusters and choosing exchange moves
ANIONS = frozenset(atomic_numbers[s] for s in ("N", "O", "F", "S", "Cl", "Se", "Br", "I"))


@dataclass
class SearchSettings:
    """Global-search budget and knobs. Energies in eV, lengths in Å."""

    starts: int = 6                 # random starting clusters (independent basin-hopping walks)
    hops: int = 20                  # basin-hopping steps per start
    step: float = 0.5               # Å, max displacement per Cartesian component of the displacement move
    p_exchange: float = 0.2         # probability of the cation-exchange move
    p_jump: float = 0.2             # probability of the surface-jump move (the rest: displacement)
    kT: float = 0.1                 # eV, Metropolis temperature between minima
    fmax: float = 0.1               # eV/Å, local relaxations during the search
    final_fmax: float = 0.01        # eV/Å, final relaxation of the kept isomers
    max_relax_steps: int = 300      # a relaxation that takes longer is a failed trial
    volume_per_atom: float = 14.0   # Å^3, size of the sphere random starts are drawn in
    energy_tol: float = 0.01        # eV, same-isomer test
    distance_tol: float = 0.1       # Å, same-isomer test (max difference of sorted distances)
    seed: int = 0
    workers: int = 1                # processes running starts in parallel

    def __post_init__(self):
        for name in ("starts", "max_relax_steps", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hops < 0:
            raise ValueError(f"hops must be >= 0, got {self.hops}")
        for name in ("step", "kT", "fmax", "final_fmax", "volume_per_atom", "energy_tol", "distance_tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 <= self.p_exchange and 0 <= self.p_jump and self.p_exchange + self.p_jump <= 1):
            raise ValueError("p_exchange and p_jump must be >= 0 and sum to <= 1")


@dataclass
class Isomer:
    atoms: Atoms           # relaxed structure, carrying energy/forces (SinglePointCalculator)
    energy: float          # eV
    found: str = ""        # where the search met it, e.g. "start 3 hop 12"


@dataclass
class SearchResult:
    isomers: list[Isomer]                  # distinct, ascending energy
    n_relaxations: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)   # a few example reasons


# ------------------------------------------------------------------------------ composition
def formula_symbols(formula: str, units: int = 1) -> list[str]:
    """Chemical symbols of ``units`` formula units, e.g. ("MgSiO3", 2) -> 10 symbols. ValueError on bad input."""
    from ase.formula import Formula

    if units < 1:
        raise ValueError(f"--units must be >= 1, got {units}")
    try:
        counts = Formula(formula).count()
    except Exception as exc:
        raise ValueError(f"cannot parse formula {formula!r}: {exc}") from None
    bad = [s for s in counts if s not in atomic_numbers or s == "X"]
    if bad or not counts:
        raise ValueError(f"formula {formula!r}: unknown element(s) {', '.join(bad) or '(none given)'}")
    return [s for s, n in counts.items() for _ in range(n * units)]


# ------------------------------------------------------------------------------ geometry checks
def _min_start_distance(zi: int, zj: int) -> float:
    ai, aj = zi in ANIONS, zj in ANIONS
    if ai and aj:
        return 2.2
    if not ai and not aj:
        return 2.4
    return max(1.4, 0.8 * (covalent_radii[zi] + covalent_radii[zj]))


def random_cluster(numbers, rng: np.random.Generator, volume_per_atom: float = 14.0) -> Atoms:
    """Random compact cluster: atoms placed one by one uniformly in a sphere of ``volume_per_atom`` Å^3 per
    atom, respecting the minimum distances above (the sphere grows by 5% when it cannot hold them)."""
    numbers = list(numbers)
    radius = (3.0 * len(numbers) * volume_per_atom / (4.0 * math.pi)) ** (1.0 / 3.0)
    for _ in range(200):
        positions: list[np.ndarray] = []
        for i, z in enumerate(numbers):
            for _ in range(500):
                p = rng.uniform(-radius, radius, 3)
                if p @ p > radius * radius:
                    continue
                if all(np.linalg.norm(p - q) >= _min_start_distance(z, numbers[j]) for j, q in enumerate(positions)):
                    positions.append(p)
                    break
            else:
                break
        if len(positions) == len(numbers):
            return Atoms(numbers=numbers, positions=positions)
        radius *= 1.05
    raise RuntimeError("could not place the atoms of a random starting cluster")  # pragma: no cover


def structure_problem(atoms: Atoms) -> str | None:
    """Why a relaxed structure is not a sensible cluster minimum (None: it is): collapsed or fragmented."""
    return collapsed_or_fragmented(atoms.numbers, atoms.positions)


def distance_fingerprint(atoms: Atoms) -> dict[tuple[int, int], np.ndarray]:
    """Sorted interatomic distances (Å) per element pair: invariant to rotation, translation, reflection and
    the order of atoms."""
    d = atoms.get_all_distances()
    z = atoms.numbers
    out: dict[tuple[int, int], list[float]] = {}
    for i, j in zip(*np.triu_indices(len(atoms), 1)):
        key = (min(z[i], z[j]), max(z[i], z[j]))
        out.setdefault(key, []).append(d[i, j])
    return {k: np.sort(v) for k, v in out.items()}


def same_isomer(e1: float, fp1: dict, e2: float, fp2: dict, energy_tol: float, distance_tol: float) -> bool:
    if abs(e1 - e2) > energy_tol or fp1.keys() != fp2.keys():
        return False
    return all(np.max(np.abs(fp1[k] - fp2[k])) <= distance_tol for k in fp1)


# ------------------------------------------------------------------------------ the search
class _Pool:
    """Distinct minima met so far (energy, fingerprint, atoms, where)."""

    def __init__(self, energy_tol: float, distance_tol: float):
        self.items: list[tuple[float, dict, Atoms, str]] = []
        self.energy_tol, self.distance_tol = energy_tol, distance_tol

    def add(self, energy: float, atoms: Atoms, where: str) -> None:
        fp = distance_fingerprint(atoms)
        for k, (e, f, _, _) in enumerate(self.items):
            if same_isomer(energy, fp, e, f, self.energy_tol, self.distance_tol):
                if energy < e:
                    self.items[k] = (energy, fp, atoms, where)
                return
        self.items.append((energy, fp, atoms, where))


def _relax(atoms: Atoms, backend, fmax: float, steps: int) -> tuple[float, Atoms]:
    """Local relaxation with a fresh calculator (no wavefunction carried over from another geometry)."""
    from ase.optimize import BFGS

    work = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    work.calc = backend.calculator()
    opt = BFGS(work, logfile=None, maxstep=0.2)
    if not opt.run(fmax=fmax, steps=steps):
        raise RuntimeError(f"relaxation not converged to {fmax} eV/Å in {steps} steps")
    energy = float(work.get_potential_energy())
    if not math.isfinite(energy):
        raise RuntimeError("non-finite energy")
    problem = structure_problem(work)
    if problem:
        raise RuntimeError(problem)
    out = Atoms(numbers=work.numbers, positions=work.positions)
    return energy, out


def _move(atoms: Atoms, rng: np.random.Generator, s: SearchSettings) -> Atoms:
    new = atoms.copy()
    z = new.numbers
    u = rng.random()
    if u < s.p_exchange:
        cations = [i for i in range(len(new)) if z[i] not in ANIONS]
        pool = cations if len(set(z[cations])) > 1 else list(range(len(new)))
        if len(set(z[pool])) > 1:
            while True:
                i, j = rng.choice(pool, 2, replace=False)
                if z[i] != z[j]:
                    break
            pos = new.positions.copy()
            pos[[i, j]] = pos[[j, i]]
            new.positions = pos + rng.uniform(-0.1, 0.1, pos.shape)
            return new
    elif u < s.p_exchange + s.p_jump and len(new) > 2:
        i = int(rng.integers(len(new)))
        others = np.delete(new.positions, i, axis=0)
        centre = others.mean(axis=0)
        r_out = np.linalg.norm(others - centre, axis=1).max()
        for _ in range(200):
            v = rng.normal(size=3)
            p = centre + v / np.linalg.norm(v) * (r_out + rng.uniform(0.0, 1.0))
            dmin = np.linalg.norm(others - p, axis=1).min()
            if 1.6 <= dmin <= 2.4:  # touching the surface, not overlapping, not detached
                break
        pos = new.positions.copy()
        pos[i] = p
        new.positions = pos
        return new
    new.positions = new.positions + rng.uniform(-s.step, s.step, new.positions.shape)
    return new


def _walk(numbers: list[int], backend, s: SearchSettings, start: int,
          progress: Callable[[str], None] | None = None) -> tuple[list, int, list[str]]:
    """One basin-hopping walk from one random start; returns (minima, n_relaxations, failure reasons)."""
    rng = np.random.default_rng([s.seed, start])
    minima: list[tuple[float, Atoms, str]] = []
    failures: list[str] = []
    n_relax = 0

    def attempt(atoms: Atoms, where: str):
        nonlocal n_relax
        n_relax += 1
        try:
            energy, relaxed = _relax(atoms, backend, s.fmax, s.max_relax_steps)
        except Exception as exc:  # SCF failure, collapsed/fragmented frame, ...: a failed trial
            failures.append(f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            return None
        minima.append((energy, relaxed, where))
        return energy, relaxed

    current = None
    for _ in range(20):  # a start whose first relaxation fails is redrawn
        current = attempt(random_cluster(numbers, rng, s.volume_per_atom), f"start {start}")
        if current is not None:
            break
    if current is None:
        return minima, n_relax, failures
    for hop in range(s.hops):
        trial = attempt(_move(current[1], rng, s), f"start {start} hop {hop + 1}")
        if trial is None:
            continue
        if trial[0] <= current[0] or rng.random() < math.exp(-(trial[0] - current[0]) / s.kT):
            current = trial
    if progress:
        best = min(e for e, _, _ in minima)
        progress(f"start {start + 1}/{s.starts}: {len(minima)} minima, lowest {best:.4f} eV, "
                 f"{len(failures)} failed trial(s)")
    return minima, n_relax, failures


def _walk_in_worker(args):
    numbers, backend, settings, start = args
    return _walk(numbers, backend, settings, start)


def search_isomers(symbols, backend, settings: SearchSettings | None = None, n_isomers: int = 5,
                   progress: Callable[[str], None] | None = None) -> SearchResult:
    """The ``n_isomers`` lowest distinct minima of a cluster of ``symbols`` found by basin hopping on
    ``backend`` (a :class:`al_manager.reference.ReferenceBackend`), ascending in energy (eV)."""
    s = settings or SearchSettings()
    if n_isomers < 1:
        raise ValueError(f"isomers must be >= 1, got {n_isomers}")
    numbers = [atomic_numbers[x] if isinstance(x, str) else int(x) for x in symbols]
    t0 = time.perf_counter()
    walks = []
    if s.workers > 1 and s.starts > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(s.workers, s.starts), mp_context=ctx) as pool:
            jobs = [(numbers, backend, s, k) for k in range(s.starts)]
            for k, walk in enumerate(pool.map(_walk_in_worker, jobs)):
                walks.append(walk)
                if progress and walk[0]:
                    progress(f"start {k + 1}/{s.starts}: {len(walk[0])} minima, lowest "
                             f"{min(e for e, _, _ in walk[0]):.4f} eV, {len(walk[2])} failed trial(s)")
    else:
        walks = [_walk(numbers, backend, s, k, progress) for k in range(s.starts)]

    pool = _Pool(s.energy_tol, s.distance_tol)
    n_relax, failures = 0, []
    for minima, n, fails in walks:
        n_relax += n
        failures += fails
        for energy, atoms, where in minima:
            pool.add(energy, atoms, where)
    candidates = sorted(pool.items, key=lambda item: item[0])

    # Tight relaxation of the lowest candidates until enough distinct ones remain: loosely relaxed copies
    # of one minimum can look distinct until relaxed tightly, and some fail.
    final = _Pool(s.energy_tol, s.distance_tol)
    for tried, (energy, _, atoms, where) in enumerate(candidates):
        if len(final.items) >= n_isomers or tried >= 10 * n_isomers:
            break
        n_relax += 1
        try:
            e, relaxed = _relax(atoms, backend, s.final_fmax, 4 * s.max_relax_steps)
            # recomputed from scratch: an SCF that converged to nonsense by restarting from the wavefunction
            # of another geometry does not survive this
            labelled = _with_labels(relaxed, backend)
            if abs(labelled.get_potential_energy() - e) > 1e-3:
                raise RuntimeError(f"energy not reproducible from scratch ({e:.4f} vs "
                                   f"{labelled.get_potential_energy():.4f} eV)")
        except Exception as exc:
            failures.append(f"final relaxation ({where}): {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            continue
        final.add(float(labelled.get_potential_energy()), labelled, where)
    kept = sorted(final.items, key=lambda item: item[0])[:n_isomers]
    isomers = [Isomer(atoms=atoms, energy=energy, found=where) for energy, _, atoms, where in kept]
    return SearchResult(isomers=isomers, n_relaxations=n_relax, n_failed=len(failures),
                        seconds=time.perf_counter() - t0, failures=failures[:20])


def _with_labels(atoms: Atoms, backend) -> Atoms:
    """The structure carrying the backend's energy, forces and dipole (for the extxyz file)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    work = Atoms(numbers=atoms.numbers, positions=atoms.positions - atoms.get_center_of_mass())
    work.calc = backend.calculator()
    results = {"energy": float(work.get_potential_energy()), "forces": np.array(work.get_forces())}
    try:
        results["dipole"] = np.array(work.get_dipole_moment())
    except Exception:  # a calculator without dipoles still gives a usable structure
        pass
    out = Atoms(numbers=work.numbers, positions=work.positions)
    out.calc = SinglePointCalculator(out, **results)
    return out


# ------------------------------------------------------------------------------ output
def write_isomers(result: SearchResult, formula: str, units: int, out_dir: str | os.PathLike,
                  method: str = "") -> tuple[list[Path], Path]:
    """``OUT/<formula>_<units>_isomerNN.xyz`` (extxyz with energy, forces, dipole) and
    ``OUT/<formula>_<units>_isomers.csv`` (rank, file, energy, relative energy). Returns (xyz files, csv)."""
    from ase.io import write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{formula}_{units}"
    if not result.isomers:
        raise RuntimeError("the search found no valid minimum")
    e0 = result.isomers[0].energy
    files = []
    for k, iso in enumerate(result.isomers, start=1):
        path = out / f"{stem}_isomer{k:02d}.xyz"
        atoms = iso.atoms
        atoms.info.update({"name": f"{stem}_isomer{k:02d}", "relative_energy_eV": iso.energy - e0,
                           "method": method, "found": iso.found})
        write_with(path, lambda p, a=atoms: write(str(p), a, format="extxyz"))
        files.append(path)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "file", "n_atoms", "energy_eV", "relative_energy_eV", "method"])
    for k, (iso, path) in enumerate(zip(result.isomers, files), start=1):
        w.writerow([k, path.name, len(iso.atoms), f"{iso.energy:.6f}", f"{iso.energy - e0:.6f}", method])
    csv_path = out / f"{stem}_isomers.csv"
    write_text(csv_path, buf.getvalue())
    return files, csv_path


__all__ = ["SearchSettings", "Isomer", "SearchResult", "formula_symbols", "random_cluster", "search_isomers",
           "structure_problem", "distance_fingerprint", "same_isomer", "write_isomers"]
