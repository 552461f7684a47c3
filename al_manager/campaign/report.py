"""What a campaign leaves for the user: spectra with error bands, harmonic overlays, size sums, summary.

Layout under the campaign's output folder:

- ``spectra/<cluster>/<T>K/spectrum.csv``: mean MD IR spectrum over the trusted runs (of the committee-mean
  dipole) with two error bands (the CSV of :mod:`spectra.spectrum`:
  ``wavenumber_cm-1,wavelength_um,intensity,stderr,std_committee``, km/mol per cm^-1): ``stderr``, the standard
  error over the runs (the MD's sampling noise), and ``std_committee``, the std over the dipole committee
  members of their spectra on the same runs (the dipole model's uncertainty; member k's spectrum is its mean
  over the runs, :func:`spectra.autocorrelation.md_committee_spectrum`); ``std_committee`` needs >= 2 dipole
  members and their ``md.dipole_members_0`` files, and is left out otherwise. ``spectrum.png`` shows both
  bands, labelled, with the committee's harmonic spectrum overlaid (same absolute unit: each harmonic line
  is a Gaussian whose area is its intensity in km/mol). The dipoles come every ``md.dipole_stride_fs``; with
  ``spectra.correct_central_difference`` the damping of the central difference at that interval is divided
  out, so the spectrum is that of a dipole every step;
- ``spectra/<cluster>/harmonic.txt`` (frequencies cm^-1, intensities km/mol; committee autograd Hessian at
  the committee-relaxed structure ``harmonic_structure.xyz``);
- ``runs/<cluster>/<T>K/seed<s>/spectrum.csv``: every run's own spectrum, with that run's committee band
  (``spectrum.untrusted.csv`` for a run stopped outside the trusted region: kept for inspection, never in
  the mean);
- ``sums/<composition>_<T>K_kappa.txt`` (wavenumber, wavelength, summed intensity, its standard error,
  cross-section per cluster, mass absorption coefficient kappa in cm^2/g; sizes weighted equally as in the
  paper's Fig. 8), ``..._sum.csv`` and ``..._sum.png`` (kappa against wavelength, 9.7 and 18 µm marked);
- ``summary.json``: every trajectory (seed, simulated length, status and reason, committee disagreement),
  every spectrum (runs used, runs excluded and why, convergence of the standard error with the number of
  runs), harmonic results, sums and the measured throughput.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from spectra.atomic import write_json

from .config import CampaignConfig, composition_of

SCHEMA = "nanosil.campaign/1"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)


def _uncertainty_stats(folders: list[Path]) -> dict:
    """Max and mean of the committee disagreement over every logged step (eV/Å, eV/atom, e·Å)."""
    columns = {"max_force_std_eV_per_A": [], "energy_std_per_atom_eV": [], "dipole_std_eA": []}
    for folder in folders:
        path = folder / "uncertainty.csv"
        if not path.is_file():
            continue
        with open(path) as f:
            header = f.readline().strip().split(",")
            for line in f:
                parts = line.strip().split(",")
                if len(parts) != len(header):
                    continue
                for name in columns:
                    if name in header and parts[header.index(name)] not in ("", "nan"):
                        columns[name].append(float(parts[header.index(name)]))
    out = {}
    for name, values in columns.items():
        if values:
            out[f"{name}_max"] = float(np.max(values))
            out[f"{name}_mean"] = float(np.mean(values))
    return out


def _production_dipoles(run, config: CampaignConfig):
    """Production dipoles of a run (e·Å, one frame every ``md.dipole_stride_fs``), the number of frames kept,
    the file, and the per-member dipoles of the same frames (n_members, n_frames, 3) e·Å, or None with the
    reason they are missing."""
    from spectra.io import check_same_trajectory, read_dipole_members, read_dipoles

    phase = next(p for p in run.phases if p.production_from is not None)
    path = run.phase_folder(phase) / "md.dipole_0"
    series = read_dipoles(path, config.md.timestep_fs, units="au", fmt="ipi")
    if not math.isclose(series.frame_interval_fs, config.md.dipole_stride_fs, rel_tol=1e-9):
        raise ValueError(f"{path}: dipoles every {series.frame_interval_fs:g} fs, expected every "
                         f"{config.md.dipole_stride_fs:g} fs (md.dipole_stride_fs)")
    keep = series.steps >= phase.production_from
    members, why = None, None
    members_path = run.phase_folder(phase) / "md.dipole_members_0"
    try:
        found = read_dipole_members(members_path, config.md.timestep_fs, units="au", fmt="ipi")
        check_same_trajectory(series, found)
        if found.n_members < 2:
            why = f"{found.n_members} dipole member: a committee band needs at least 2"
        else:
            members = found.dipoles[:, keep]
    except (ValueError, FileNotFoundError) as exc:
        why = str(exc)
    return series.dipoles[keep], int(keep.sum()), str(path), members, why


def _harmonic(config: CampaignConfig, cluster, out_dir: Path, log) -> dict | None:
    """Harmonic IR of the committee (exact Hessian and dipole derivatives), after an optional relaxation."""
    from ase.io import write
    from ase.optimize import BFGS

    from driver.calculator import NanosilCalculator
    from ipi_inputs.files import read_cluster
    from spectra.harmonic import harmonic_autograd, write_harmonic

    atoms = read_cluster(cluster.structure)
    calc = NanosilCalculator(str(config.models))
    atoms.calc = calc
    record = {"relaxed": False}
    if config.spectra.relax:
        opt = BFGS(atoms, logfile=None)
        converged = bool(opt.run(fmax=0.01, steps=500))
        record.update(relaxed=converged, relax_steps=int(opt.nsteps))
        if not converged:
            log(f"{cluster.name}: relaxation with the committee did not reach fmax 0.01 eV/Å in 500 steps; "
                f"harmonic spectrum at the last geometry")
    record["fmax_eV_per_A"] = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    result = harmonic_autograd(atoms, calc, project=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_harmonic(out_dir / "harmonic.txt", result)
    write(out_dir / "harmonic_structure.xyz", atoms, format="extxyz")
    # the rigid-body modes (projected to zero frequency, but a rotating polar cluster has a dipole
    # derivative) are not vibrations: leave them out of the plotted spectrum
    n_rigid = 6 if len(atoms) > 2 else 5
    vib = np.sort(np.argsort(np.abs(result.frequencies))[n_rigid:])
    record.update(file=_rel(out_dir / "harmonic.txt", config.output),
                  n_imaginary=int(np.sum(result.frequencies[vib] < -1.0)))
    record["result"] = type(result)(result.frequencies[vib], result.intensities[vib], None, result.method)
    return record


def write_outputs(config: CampaignConfig, states, log=print, throughput: dict | None = None) -> dict:
    """Spectra, plots, sums and ``summary.json`` from the trajectories' files (see the module docstring)."""
    from spectra.autocorrelation import (SpectrumOptions, committee_spectra, md_committee_spectrum, mean_spectrum,
                                         member_band_areas, run_spectrum, with_committee_band)
    from spectra.io import DipoleMembersSeries
    from spectra.broadening import broaden
    from spectra.plotting import plot_spectra
    from spectra.spectrum import Spectrum, trapezoid, write_spectrum_csv
    from spectra.fig8 import fig8_against_paper
    from spectra.sums import kappa_cm2_g, size_weights, weighted_sum, write_absorption_table

    out = Path(config.output)
    options = SpectrumOptions(depth_fs=config.spectra.correlation_depth_fs, discard_ps=config.md.discard_ps,
                              window=config.spectra.window,
                              correct_central_difference=config.spectra.correct_central_difference)
    dt_ps = config.md.timestep_fs / 1000.0
    frame_fs = config.md.dipole_stride_fs
    trajectories, per_group = [], {}
    for run, state in states:
        status = state.get("status", "pending")
        folders = [run.phase_folder(p) for p in run.phases]
        entry = {
            "id": run.id, "cluster": run.spec.cluster.name, "temperature_K": run.spec.temperature,
            "seed": run.spec.seed, "status": status, "reason": state.get("reason"),
            "folder": _rel(run.folder, out), "planned_ps": round(run.total_steps * dt_ps, 6),
            "production_planned_ps": round(config.md.production_ps, 6),
        }
        if state.get("stopped_at_step") is not None:
            entry.update(stopped_at_step=state["stopped_at_step"], stopped_phase=state.get("stopped_phase"))
        steps = run.steps_done() if status != "done" else run.total_steps
        entry["simulated_ps"] = round(steps * dt_ps, 6)
        entry["uncertainty"] = _uncertainty_stats(folders)
        spectrum = members = None
        if status in ("done", "untrusted"):
            try:
                dipoles, n_prod, source, members, why = _production_dipoles(run, config)
                entry["production_ps"] = round(max(0, n_prod - 1) * frame_fs / 1000.0, 6)
                spectrum = run_spectrum(dipoles, frame_fs, run.spec.temperature, options, source=source)
                if members is not None:
                    members = DipoleMembersSeries(members, frame_fs, source=source.replace("dipole_0", "dipole_members_0"))
                    spectrum = with_committee_band(spectrum, committee_spectra(
                        members.dipoles, frame_fs, run.spec.temperature, options, members.source))
                else:
                    entry["committee_band"] = f"none: {why}"
                name = "spectrum.csv" if status == "done" else "spectrum.untrusted.csv"
                write_spectrum_csv(run.folder / name, spectrum)
                entry["spectrum"] = _rel(run.folder / name, out)
            except (ValueError, FileNotFoundError, StopIteration) as exc:
                spectrum = members = None
                entry["spectrum"] = None
                entry["spectrum_error"] = str(exc)
                if status == "done":  # a finished run whose dipoles cannot be read is a failure, not data
                    entry["status"] = "failed"
                    entry["reason"] = f"no spectrum: {exc}"
        entry["in_mean"] = entry["status"] == "done" and spectrum is not None
        trajectories.append(entry)
        key = (run.spec.cluster.name, run.spec.temperature)
        per_group.setdefault(key, []).append((entry, spectrum, members))

    harmonic = {}
    if config.spectra.harmonic:
        for cluster in config.clusters:
            try:
                harmonic[cluster.name] = _harmonic(config, cluster, out / "spectra" / cluster.name, log)
            except Exception as exc:  # the MD spectra are the product; a harmonic failure is reported
                log(f"{cluster.name}: harmonic spectrum failed: {exc}")
                harmonic[cluster.name] = {"error": str(exc)}

    spectra_records, means = [], {}
    clusters = {c.name: c for c in config.clusters}
    for (name, temperature), items in per_group.items():
        used = [(e, s) for e, s, _ in items if e["in_mean"]]
        used_members = [m for e, _, m in items if e["in_mean"]]
        excluded = [{"id": e["id"], "status": e["status"], "reason": e.get("reason")} for e, s, _ in items
                    if not e["in_mean"]]
        folder = out / "spectra" / name / f"{temperature:g}K"
        record = {"cluster": name, "temperature_K": temperature, "n_runs": len(used),
                  "runs": [e["id"] for e, _ in used], "excluded": excluded}
        if used:
            mean = mean_spectrum([s for _, s in used])
            if used_members and all(m is not None for m in used_members):
                committee = md_committee_spectrum(used_members, temperature, options)
                mean = with_committee_band(mean, committee)
                areas = member_band_areas(committee)
                record["committee"] = {"n_dipole_members": committee.n_members,
                                       "member_band_areas_km_mol": [round(float(a), 6) for a in areas],
                                       "relative_std": float(np.std(areas, ddof=1) / np.mean(areas))
                                       if np.mean(areas) > 0 else math.nan}
            else:
                missing = [e["id"] for (e, _), m in zip(used, used_members) if m is None]
                record["committee"] = None
                record["committee_missing"] = (f"no committee band: no usable per-member dipoles in "
                                               f"{', '.join(missing)} (see their committee_band)")
            folder.mkdir(parents=True, exist_ok=True)
            write_spectrum_csv(folder / "spectrum.csv", mean)
            means[(name, temperature)] = mean
            band = mean.intensity > 0
            record.update(file=_rel(folder / "spectrum.csv", out), band_area_km_mol=round(mean.integral(), 6))
            convergence = []
            for k in range(2, len(used) + 1):
                partial = mean_spectrum([s for _, s in used[:k]])
                area = float(trapezoid(partial.intensity[band], partial.wavenumber[band])) if band.any() else 0.0
                err = float(trapezoid(partial.stderr[band], partial.wavenumber[band])) if band.any() else 0.0
                convergence.append({"runs": k, "relative_stderr": err / area if area > 0 else math.nan})
            record["convergence"] = convergence
            if convergence:
                record["relative_stderr"] = convergence[-1]["relative_stderr"]
            curves, labels = [mean], [f"MD {temperature:g} K, mean of {len(used)} run(s)"]
            h = harmonic.get(name) or {}
            if "result" in h:
                res = h["result"]
                fine = np.arange(0.0, float(mean.wavenumber[-1]), 0.5)  # the lines are narrower than the MD grid
                curves.append(broaden(res.frequencies, res.intensities, grid=fine,
                                      fwhm=config.spectra.harmonic_fwhm_cm, normalization="area"))
                labels.append(f"harmonic (committee), FWHM {config.spectra.harmonic_fwhm_cm:g} cm$^{{-1}}$")
            top = float(mean.wavenumber[-1])
            plot_spectra(folder / "spectrum.png", curves, labels, xlim=(0.0, min(top, 1500.0)),
                         title=f"{name} at {temperature:g} K", label_bands=True)
            record["png"] = _rel(folder / "spectrum.png", out)
        else:
            record["file"] = None
            log(f"{name} at {temperature:g} K: no trusted run finished; no spectrum")
        spectra_records.append(record)

    sums = []
    from ipi_inputs.files import read_cluster

    info = {}
    for name, cluster in clusters.items():
        atoms = read_cluster(cluster.structure)
        composition, size = composition_of(cluster, atoms)
        info[name] = (composition, size, float(atoms.get_masses().sum()))
    for temperature in config.temperatures:
        by_comp: dict[str, list[str]] = {}
        for name in clusters:
            if (name, temperature) in means:
                by_comp.setdefault(info[name][0], []).append(name)
        for composition, names in sorted(by_comp.items()):
            names.sort(key=lambda n: (info[n][1], n))
            spectra_list = [means[(n, temperature)] for n in names]
            masses = [info[n][2] for n in names]
            weights = size_weights("equal", len(names))
            total = weighted_sum(spectra_list, weights)
            mean_mass = float(np.dot(weights, masses))
            stem = out / "sums" / f"{composition}_{temperature:g}K"
            stem.parent.mkdir(parents=True, exist_ok=True)
            header = (f"{composition} at {temperature:g} K: equal-weight sum over "
                      + ", ".join(f"{n} (N={info[n][1]})" for n in names) + f"; model {config.models}")
            write_absorption_table(f"{stem}_kappa.txt", total, mean_mass, header=header)
            write_spectrum_csv(f"{stem}_sum.csv", total)
            kappas = [Spectrum(total.wavenumber, kappa_cm2_g(total.intensity, mean_mass),
                               kappa_cm2_g(total.stderr, mean_mass))]
            labels = [f"sum of {len(names)} size(s)"]
            if len(names) > 1:
                for n, s, m in zip(names, spectra_list, masses):
                    kappas.append(Spectrum(s.wavenumber, kappa_cm2_g(s.intensity, m)))
                    labels.append(f"{n} (N={info[n][1]})")
            plot_spectra(f"{stem}_sum.png", kappas, labels, axis="wavelength", xlim=(5.0, 40.0),
                         ylabel="κ / cm$^2$ g$^{-1}$", title=f"{composition}, {temperature:g} K")
            entry = {"composition": composition, "temperature_K": temperature, "clusters": names,
                     "sizes": [info[n][1] for n in names], "weights": [float(w) for w in weights],
                     "mean_mass_amu": mean_mass, "table": _rel(Path(f"{stem}_kappa.txt"), out),
                     "csv": _rel(Path(f"{stem}_sum.csv"), out), "png": _rel(Path(f"{stem}_sum.png"), out)}
            # the paper's Fig. 8 beside ours, when its arrays are at hand (band positions and widths; shapes
            # only, the paper's arrays being in arbitrary units)
            fig8 = fig8_against_paper(total, composition, temperature, stem=f"{stem}_vs_paper_fig8",
                                      sizes=[info[n][1] for n in names])
            if fig8 is not None:
                entry["paper_fig8"] = {k: v for k, v in fig8.items() if k in ("bands", "files", "shape", "ours_area_km_mol")}
                log(f"{composition} {temperature:g} K against the paper's Fig. 8: {_rel(Path(f'{stem}_vs_paper_fig8.csv'), out)}")
            sums.append(entry)

    try:
        version = json.loads((Path(config.models) / "committee.json").read_text()).get("version")
    except (OSError, json.JSONDecodeError):
        version = None
    counts = {s: sum(t["status"] == s for t in trajectories) for s in ("done", "untrusted", "failed", "pending")}
    summary = {
        "schema": SCHEMA, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": str(config.models),
        "model_version": version, "config": _config_record(config), "counts": counts,
        "trajectories": trajectories, "spectra": spectra_records,
        "harmonic": {k: {kk: vv for kk, vv in v.items() if kk != "result"} for k, v in harmonic.items() if v},
        "sums": sums, "throughput": throughput or {},
    }
    write_json(out / "summary.json", summary)
    log(f"wrote {out / 'summary.json'}: {counts['done']} done, {counts['untrusted']} untrusted, "
        f"{counts['failed']} failed, {counts['pending']} pending; {len(means)} spectra, {len(sums)} size sums")
    return summary


def _config_record(config: CampaignConfig) -> dict:
    from dataclasses import asdict

    record = asdict(config)
    record["clusters"] = [{"name": c.name, "structure": str(c.structure), "composition": c.composition,
                           "size": c.size} for c in config.clusters]
    for key in ("models", "output", "source"):
        record[key] = None if record[key] is None else str(record[key])
    return record
