"""The paper's test set and the committee's own uncertainty on it (paper Sec. II D, Table I).

The paper's test frames come from MD with the final model at 400/800/1200 K, drawn at random and labelled
by the reference, none of them trained on. :func:`sample_md_frames` runs that MD with the committee as an
ASE calculator (Langevin, 0.5 fs, in this process: the frames only need to be where the model's own
dynamics go), :func:`label_test_set` labels them into a database of their own, and
:func:`uncertainty_report` answers "does the calibrated committee std rank the actual errors?": the
Spearman correlation and the ratio of actual to predicted error, for the energy per atom and for the
per-atom force criterion. Units: eV, Å, e·Å inside; meV/atom, eV/Å and D in the report keys.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units

TEST_TEMPERATURES = (400.0, 800.0, 1200.0)   # K, the paper's
E_DEBYE = 1.0 / units.Debye                   # 1 e·Å in D


def sample_md_frames(models: str | Path, structures: dict[str, str], temperatures=TEST_TEMPERATURES, *,
                     ps: float = 2.0, frames_per_run: int = 10, equilibration_ps: float = 0.5, seed: int = 0,
                     timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
                     log: Callable[[str], None] = print) -> list[Atoms]:
    """MD of every structure at every temperature with the committee; ``frames_per_run`` frames drawn at
    random (``seed``) after ``equilibration_ps``. A run whose committee disagreement explodes (non-finite
    forces, or atoms flying apart) stops early and keeps the frames it had; each frame carries
    ``info['cluster']``, ``info['temperature']``, ``info['md_step']``."""
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md import velocitydistribution as vd

    from driver.calculator import NanosilCalculator
    from driver.geometry_checks import fragments
    from ipi_inputs.files import read_cluster

    calc = NanosilCalculator(str(models), dtype=__import__("torch").float32, member_forces=False)
    rng = np.random.default_rng(seed)
    n_steps = int(round(ps * 1000.0 / timestep_fs))
    n_equil = int(round(equilibration_ps * 1000.0 / timestep_fs))
    out: list[Atoms] = []
    for name, path in structures.items():
        start = read_cluster(path)
        for temperature in temperatures:
            atoms = Atoms(numbers=start.numbers, positions=start.positions)
            atoms.calc = calc
            # thermalize_momenta from ASE 3.29 on, where MaxwellBoltzmannDistribution is deprecated (same draws)
            getattr(vd, "thermalize_momenta", vd.MaxwellBoltzmannDistribution)(atoms, temperature_K=temperature,
                                                                             rng=rng)
            vd.Stationary(atoms)
            vd.ZeroRotation(atoms)
            atoms.set_constraint(FixCom())   # a free cluster: no drift of the centre of mass
            dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature,
                           friction=friction_per_fs / units.fs, rng=rng, fixcm=False)
            picks = set(rng.choice(np.arange(n_equil, n_steps), size=min(frames_per_run, n_steps - n_equil),
                                   replace=False).tolist())
            kept, reason = [], "done"
            for step in range(n_steps):
                dyn.run(1)
                if not np.all(np.isfinite(atoms.positions)) or len(fragments(atoms.positions, 4.0)) > 1:
                    reason = f"left the trusted region at step {step}"
                    break
                if step in picks:
                    frame = Atoms(numbers=atoms.numbers, positions=atoms.positions.copy())
                    frame.info.update(cluster=name, temperature=float(temperature), md_step=step)
                    kept.append(frame)
            log(f"test MD {name} {temperature:g} K: {len(kept)} frame(s), {reason}")
            out.extend(kept)
    return out


def label_test_set(frames: list[Atoms], backend: str, db_path: str | Path, *, workers: int = 1,
                   backend_options: dict | None = None):
    """Label ``frames`` with the reference into ``db_path`` (a database of its own: never the training
    database). Returns the labelling report."""
    from al_manager.reference.labelling import label_structures

    metadata = [{"cluster": a.info.get("cluster", ""), "origin": "test_md",
                 "temperature": a.info.get("temperature")} for a in frames]
    return label_structures(frames, backend, db_path, workers=workers, backend_options=backend_options,
                            metadata=metadata)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def uncertainty_report(models: str | Path, frames) -> dict:
    """Actual errors of the committee on labelled ``frames`` (:class:`driver.data.Frame`) next to its
    calibrated uncertainty. Keys: the paper's MAE/RMSE (``test_energy_mae_meV_per_atom``,
    ``test_force_mae_eV_per_A``, ``test_dipole_mae_D``, ...), and for the energy-per-atom and the per-atom
    force criteria the Spearman correlation of predicted std against actual error and the ratio
    actual / predicted (median over frames, resp. over atoms)."""
    import torch

    from driver.models.committee import load_committee

    committee = load_committee(models, dtype=torch.float64)
    alpha_e = committee.calibration.get("energy", 1.0)
    alpha_f = committee.calibration.get("forces", 1.0)
    e_err, e_std, f_err, f_std, f_all, mu_err, clusters = [], [], [], [], [], [], []
    for fr in frames:
        clusters.append(fr.cluster or "?")
        out = committee.member_outputs(fr.numbers, fr.positions, forces=True)
        n = len(fr.numbers)
        energies = np.asarray(out.energies, float)
        forces = np.asarray(out.forces, float)                       # (K, N, 3)
        e_mean = energies.mean()                                   # shifts included
        e_err.append(abs(e_mean - fr.energy) / n)
        e_std.append(alpha_e * energies.std(ddof=1) / n if len(energies) > 1 else float("nan"))
        per_atom_err = np.linalg.norm(forces.mean(0) - fr.forces, axis=1)
        per_atom_std = alpha_f * np.sqrt((forces.std(0, ddof=1) ** 2).sum(1)) if len(forces) > 1 \
            else np.full(n, np.nan)
        f_err.extend(per_atom_err.tolist())
        f_std.extend(per_atom_std.tolist())
        f_all.extend(np.abs(forces.mean(0) - fr.forces).ravel().tolist())
        if fr.dipole is not None and committee.dipole_model is not None:
            mu = np.asarray(committee.member_dipoles(fr.numbers, fr.positions), float).mean(0)
            mu_err.extend((np.abs(mu - fr.dipole) * E_DEBYE).tolist())
    e_err, e_std, f_err, f_std = map(np.asarray, (e_err, e_std, f_err, f_std))

    def ratio(err, std):
        ok = np.isfinite(std) & (std > 0)
        return float(np.median(err[ok] / std[ok])) if ok.any() else float("nan")

    def rmse(x):
        return float(math.sqrt(np.mean(np.square(x)))) if len(x) else float("nan")

    f_all = np.asarray(f_all)
    mu_err = np.asarray(mu_err)
    # a mean over frames is set by its worst trajectories (a hole the MD fell into): the median and the
    # per-cluster means say where it comes from
    clusters = np.asarray(clusters)
    per_cluster = {c: {"frames": int((clusters == c).sum()),
                       "energy_mae_meV_per_atom": float(np.mean(e_err[clusters == c]) * 1e3),
                       "energy_max_meV_per_atom": float(np.max(e_err[clusters == c]) * 1e3)}
                   for c in dict.fromkeys(clusters.tolist())}
    return {
        "n_frames": int(len(e_err)),
        "test_energy_mae_meV_per_atom": float(np.mean(e_err) * 1e3) if len(e_err) else float("nan"),
        "test_energy_rmse_meV_per_atom": rmse(e_err) * 1e3,
        "test_energy_median_meV_per_atom": float(np.median(e_err) * 1e3) if len(e_err) else float("nan"),
        "test_force_mae_eV_per_A": float(np.mean(f_all)) if len(f_all) else float("nan"),
        "test_force_rmse_eV_per_A": rmse(f_all),
        "test_dipole_mae_D": float(np.mean(mu_err)) if len(mu_err) else float("nan"),
        "test_dipole_rmse_D": rmse(mu_err),
        "energy_spearman": _spearman(e_std, e_err),
        "energy_error_over_std": ratio(e_err, e_std),
        "force_spearman": _spearman(f_std, f_err),
        "force_error_over_std": ratio(f_err, f_std),
        "alpha_energy": float(alpha_e), "alpha_forces": float(alpha_f),
        "per_cluster": per_cluster,
    }
