"""How good is a committee: its harmonic frequencies against the reference method's, per structure and
pooled (the paper's stopping criterion and Fig. 3 a), plus its validation errors.

Reference side (computed once per work directory and cached): each structure is relaxed with the reference
backend, then ``backend.harmonic`` gives its frequencies by finite differences on the :data:`STENCIL`; the
result is kept in
``WORKDIR/reference/harmonic.json`` (and one CSV per structure, and the relaxed geometry as extxyz) so a
resumed or repeated measurement never recomputes it.

Committee side: starting from the reference minimum, the structure is relaxed on the committee's mean
energy surface (``NanosilCalculator``, float64, BFGS), then the exact autograd Hessian gives the normal
modes through ASE's ``VibrationsData``. The six lowest frequencies (translations and rotations) are
dropped on both sides and the remaining 3N-6, sorted, are compared mode by mode; imaginary frequencies
count as negative numbers. Frequencies are in cm^-1.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms

from spectra.atomic import write_json, write_text, write_with
from spectra.harmonic import harmonic_from_derivatives, vibrational

# The yardstick's finite differences: ASE's 4-point central stencil (displacements +-delta and +-2 delta,
# error O(delta^4)). The 2-point one (+-delta, O(delta^2)) overestimates the curvature of the stiff modes by
# a few tenths of a cm^-1 at 0.01 Å (checked on a committee, whose exact Hessian is known), which is the size
# of the errors this module measures. It costs 12 N + 1 gradients instead of 6 N + 1.
STENCIL = {"delta": 0.01, "nfree": 4}


def stencil_name(backend: str) -> str:
    """How ``backend``'s yardstick frequencies are differentiated: its own analytic Hessian where it has
    one (ORCA's ``Freq``), else :data:`STENCIL`."""
    from al_manager.reference.base import backend_class

    analytic = backend_class(backend).analytic_hessian
    return analytic or f"{STENCIL['nfree']}-point central differences, {STENCIL['delta']:g} Å"


def clear_interrupted_cache(folder: str | os.PathLike) -> int:
    """Remove the entries of an ASE vibrations cache that a killed run left unfinished. ASE creates a
    displacement's file empty when its calculation starts (a lock for parallel workers) and fills it at
    the end; after a SIGKILL the empty file would make every rerun skip that displacement and then fail to
    read it. Only call this while holding the work directory's lock. Returns how many were removed."""
    removed = 0
    for path in Path(folder).glob("**/cache.*.json"):
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------- reference side
@dataclass
class ReferenceHarmonic:
    name: str
    atoms: Atoms                 # relaxed with the reference method (Å)
    frequencies: np.ndarray      # (3N,) cm^-1, ascending, imaginary negative
    intensities: np.ndarray      # (3N,) km/mol
    energy: float                # eV at the relaxed geometry
    method: str
    stencil: str = ""            # the finite differences the frequencies come from (stencil_name)

    @property
    def yardstick(self) -> str:
        return f"{self.method} ({self.stencil or 'unknown stencil'})"


def reference_harmonics(structures: dict[str, str], backend: str, cache_dir: str | os.PathLike,
                        backend_options: dict | None = None, relax: bool = True, fmax: float = 1e-3,
                        log: Callable[[str], None] = print, workers: int = 1) -> dict[str, ReferenceHarmonic]:
    """Reference harmonic analysis of every structure (name -> file), computed once and cached in
    ``cache_dir`` (``harmonic.json``, ``NAME_harmonic.csv``, ``NAME_relaxed.extxyz``). ``workers`` > 1:
    the missing structures are analysed in that many processes at once, the largest first (each is a
    serial chain of reference calculations: relaxation, then 6N + 1 gradients)."""
    cache_dir = Path(cache_dir)
    cache_file = cache_dir / "harmonic.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    method = None
    missing = []
    for name, path in structures.items():
        entry = cache.get(name)
        if entry is not None and method is None:
            method = _method(backend, backend_options, None)
        if entry is None or entry.get("method") != method or entry.get("stencil") != stencil_name(backend):
            missing.append(name)   # never computed, another method, or an older stencil
    if missing:
        from al_manager.reference.base import get_backend
        from ipi_inputs import read_cluster

        get_backend(backend, **(backend_options or {})).check_available()
        cache_dir.mkdir(parents=True, exist_ok=True)
        sizes = {name: len(read_cluster(str(structures[name]))) for name in missing}
        missing.sort(key=lambda n: -sizes[n])   # largest first: the longest chain starts at once
        for name in missing:
            log(f"reference harmonic frequencies of {name}: relaxing and {3 * STENCIL['nfree'] * sizes[name] + 1} gradients with "
                f"{backend}{' (in parallel with the others)' if workers > 1 and len(missing) > 1 else ''}")

        def store(name: str, entry: dict, messages: list[str]) -> None:
            for message in messages:
                log(message)
            cache[name] = entry
            write_json(cache_file, cache)
            vib = vibrational(entry["frequencies_cm-1"])
            log(f"reference harmonic frequencies of {name} ({entry['method']}): {len(vib)} modes, "
                f"{vib.min():.1f} to {vib.max():.1f} cm^-1")

        jobs = [(name, str(structures[name]), backend, backend_options, str(cache_dir), relax, fmax)
                for name in missing]
        if workers > 1 and len(missing) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            from al_manager.processes import end_pool

            pool = ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=mp.get_context("spawn"))
            try:
                futures = {pool.submit(_reference_one, *job): job[0] for job in jobs}
                for future in as_completed(futures):   # each stored as soon as it is done (a kill keeps it)
                    entry, messages = future.result()
                    store(futures[future], entry, messages)
            except BaseException:
                end_pool(pool)   # SIGTERM or a failure: the analyses in flight stop with us (their caches stay)
                raise
            pool.shutdown()
        else:
            for job in jobs:
                entry, messages = _reference_one(*job, log=log)
                store(job[0], entry, messages)
    out = {}
    for name in structures:
        entry = cache[name]
        atoms = Atoms(numbers=entry["numbers"], positions=entry["positions_A"])
        out[name] = ReferenceHarmonic(name, atoms, np.asarray(entry["frequencies_cm-1"]),
                                      np.asarray(entry["intensities_km/mol"]), float(entry["energy_eV"]),
                                      entry["method"], entry["stencil"])
    return out


def _reference_one(name: str, path: str, backend: str, backend_options: dict | None, cache_dir: str,
                   relax: bool, fmax: float, log: Callable[[str], None] | None = None) -> tuple[dict, list[str]]:
    """One structure's reference analysis (in this process or a pool's): its cache entry, with its CSV and
    relaxed geometry written; the messages go to ``log`` when given, else they are returned."""
    from ase.io import write

    from al_manager.reference.base import get_backend
    from ipi_inputs import read_cluster

    messages: list[str] = []
    say = log or messages.append
    be = get_backend(backend, **(backend_options or {}))
    cache_dir = Path(cache_dir)
    atoms = read_cluster(path)
    relaxed = be.relax(atoms, fmax=fmax) if relax else atoms
    displacements = cache_dir / f"{name}_displacements"
    if clear_interrupted_cache(displacements):
        say(f"reference harmonic frequencies of {name}: redoing displacements interrupted by a kill")
    har = be.harmonic(relaxed, workdir=displacements, **STENCIL)
    followed = 0
    if relax:
        relaxed, har, followed = follow_imaginary_modes(be, relaxed, har, displacements, fmax=fmax, log=say, name=name)
    energy = float(be.label(relaxed).energy)
    entry = {"method": be.method, "stencil": stencil_name(backend), "file": str(path), "relaxed": relax,
             "energy_eV": energy,
             "imaginary_modes_followed": followed,
             "numbers": [int(z) for z in relaxed.numbers], "positions_A": relaxed.positions.tolist(),
             "frequencies_cm-1": np.asarray(har.frequencies, float).tolist(),
             "intensities_km/mol": np.asarray(har.intensities, float).tolist()}
    rows = ["mode,frequency_cm-1,intensity_km/mol"] + [
        f"{i},{f:.4f},{a:.4f}" for i, (f, a) in enumerate(zip(entry["frequencies_cm-1"], entry["intensities_km/mol"]))]
    write_text(cache_dir / f"{name}_harmonic.csv", "\n".join(rows) + "\n")
    write_with(cache_dir / f"{name}_relaxed.extxyz",
               lambda tmp: write(str(tmp), relaxed, format="extxyz"), suffix=".extxyz")
    return entry, messages


IMAGINARY_TOL_CM = 5.0   # |imaginary| frequencies below this are numerical noise of the finite differences


def follow_imaginary_modes(be, atoms: Atoms, har, cache: Path, fmax: float = 1e-3, rounds: int = 3,
                           step_A: float = 0.1, log: Callable[[str], None] = print, name: str = ""):
    """A true minimum for the harmonic yardstick: while the reference surface shows an imaginary vibrational
    mode (below -IMAGINARY_TOL_CM), displace along it by ``step_A`` (largest atomic move, Å) both ways, relax
    each with ``fmax`` / 3, keep the lower energy and redo the harmonic analysis. Returns (atoms, harmonic,
    number of rounds taken)."""
    for k in range(rounds):
        vib = vibrational(har.frequencies)
        if vib.min() >= -IMAGINARY_TOL_CM:
            return atoms, har, k
        mode = har.modes[int(np.argmin(har.frequencies))]
        disp = mode * (step_A / np.linalg.norm(mode, axis=1).max())
        log(f"reference of {name}: imaginary mode {vib.min():.1f} cm^-1 at the relaxed geometry: following it "
            f"(round {k + 1}, {step_A:g} Å both ways, tighter relaxation)")
        trials = []
        for sign in (1.0, -1.0):
            moved = Atoms(numbers=atoms.numbers, positions=atoms.positions + sign * disp)
            relaxed = be.relax(moved, fmax=fmax / 3, steps=2000)
            trials.append((float(relaxed.get_potential_energy()), relaxed))
        atoms = min(trials, key=lambda t: t[0])[1]
        har = be.harmonic(atoms, workdir=cache, **STENCIL)
    vib = vibrational(har.frequencies)
    if vib.min() < -IMAGINARY_TOL_CM:
        log(f"reference of {name}: still an imaginary mode ({vib.min():.1f} cm^-1) after {rounds} rounds")
    return atoms, har, rounds


def _method(backend: str, options: dict | None, be) -> str:
    if be is not None:
        return be.method
    from al_manager.reference.base import get_backend

    return get_backend(backend, **(options or {})).method


# ---------------------------------------------------------------------- committee side
def committee_frequencies(calc, start: Atoms, fmax: float = 1e-3, steps: int = 300) -> tuple[np.ndarray, dict]:
    """Relax ``start`` on the committee surface (``calc``: a NanosilCalculator) and return its 3N
    frequencies (cm^-1, ascending, imaginary negative) and a small note (converged, steps, rmsd Å)."""
    from ase.optimize import BFGS

    atoms = Atoms(numbers=start.numbers, positions=start.positions)
    atoms.calc = calc
    opt = BFGS(atoms, logfile=None, maxstep=0.1)
    try:
        converged = bool(opt.run(fmax=fmax, steps=steps))
    except Exception as exc:  # a committee far from converged can produce NaN forces
        return np.full(3 * len(atoms), np.nan), {"converged": False, "error": str(exc)[:200]}
    if not np.all(np.isfinite(atoms.positions)):
        return np.full(3 * len(atoms), np.nan), {"converged": False, "error": "non-finite positions"}
    freqs = harmonic_from_derivatives(atoms.get_masses(), calc.hessian(atoms), None).frequencies
    rmsd = float(np.sqrt(np.mean(np.sum((atoms.positions - start.positions) ** 2, axis=1))))
    return np.sort(freqs), {"converged": converged, "steps": int(opt.nsteps), "rmsd_A": rmsd}


def harmonic_errors(models_dir: str | os.PathLike, references: dict[str, ReferenceHarmonic]) -> dict:
    """MAE and RMSE (cm^-1) of the committee's harmonic frequencies against the reference, pooled over
    every vibrational mode of every structure, and per structure."""
    from driver.calculator import NanosilCalculator

    calc = NanosilCalculator(str(models_dir))
    per, pooled = {}, []
    for name, ref in references.items():
        freqs, note = committee_frequencies(calc, ref.atoms)
        diff = vibrational(freqs) - vibrational(ref.frequencies)
        if not np.all(np.isfinite(diff)):
            per[name] = {"mae_cm-1": float("nan"), "rmse_cm-1": float("nan"), **note}
            pooled.append(np.full(len(diff), np.nan))
            continue
        per[name] = {"mae_cm-1": float(np.abs(diff).mean()), "rmse_cm-1": float(np.sqrt((diff**2).mean())),
                     "max_abs_cm-1": float(np.abs(diff).max()), **note}
        pooled.append(diff)
    alld = np.concatenate(pooled) if pooled else np.array([np.nan])
    return {"mae_cm-1": float(np.abs(alld).mean()), "rmse_cm-1": float(np.sqrt((alld**2).mean())),
            "n_modes": int(alld.size), "structures": per, "yardstick": yardstick(references)}


def yardstick(references: dict[str, ReferenceHarmonic]) -> str:
    """What the harmonic errors are measured against: the reference method and its stencil."""
    return "; ".join(sorted({ref.yardstick for ref in references.values()}))


def training_uncertainty(models_dir: str | os.PathLike, db_path: str | os.PathLike, criterion: str,
                         max_frames: int = 200, seed: int = 0) -> np.ndarray:
    """The committee's calibrated uncertainty on (up to ``max_frames`` of) its own training data: energy std
    per atom (eV/atom) for ``criterion="energy"``, max per-atom force std (eV/Å) for ``"force"``."""
    import torch

    from driver.data import read_frames
    from driver.models.committee import load_committee

    committee = load_committee(models_dir, dtype=torch.float32)
    frames = read_frames(db_path)
    if len(frames) > max_frames:
        pick = np.random.default_rng(seed).choice(len(frames), max_frames, replace=False)
        frames = [frames[i] for i in sorted(pick)]
    values = []
    for f in frames:
        p = committee.predict(f.numbers, f.positions, forces=criterion == "force", member_forces=criterion == "force")
        values.append(p.max_force_std if criterion == "force" else p.energy_std_per_atom)
    return np.asarray(values, dtype=float)


def validation_errors(models_dir: str | os.PathLike) -> dict:
    """The committee's validation errors as recorded at training time (``committee.json`` metadata)."""
    meta_file = Path(models_dir) / "committee.json"
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    errors = (meta.get("metadata") or {}).get("errors") or {}
    return dict(errors.get("validation") or {})
