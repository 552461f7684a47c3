"""``nanosil transferability --models DIR STRUCTURES...``: a committee on structures it was not trained on
(the paper's Sec. III C and Fig. 7).

For every labelled structure of STRUCTURES (ASE databases or files that :func:`driver.data.read_frames`
reads: .traj, extxyz, .db; e.g. the paper's P5 isomers ``pyroxene_N05_isomers_pbe0.traj``):

* energy error (meV/atom) beside the committee's energy std (meV/atom); force MAE/RMSE and the largest
  per-atom force error (eV/Å) beside the committee's ``max_force_std``; dipole error |Δµ| (D) beside the
  dipole committee's std (D);
* relative energies within each file and composition: each structure's energy minus that of the structure
  lowest in the *reference* (meV), reference and ML, and whether the ML puts them in the same order.

``--harmonic``: each structure is first relaxed on the ML surface (BFGS to ``--fmax``, default 1e-3 eV/Å;
how far it moved is reported: RMSD and largest displacement after removing rotation and translation), then
its harmonic frequencies and intensities come from the committee's exact Hessian and dipole derivatives
(:func:`spectra.harmonic.harmonic_autograd`, rigid-body motion projected out). For the P5 isomers, where the
paper's arrays ``paper_ir/P5/isomer_{I,II,III,IV}_harmonic.npy`` (69 x 4: DFT frequency, DFT intensity,
ML frequency, ML intensity; vibrations only, ascending) are found (``--paper-ir DIR``, default
``../paper_ir/P5`` beside the structures' folder), ours stand beside theirs: frequency MAE against their DFT
and against their ML, intensity MAE and the ratio of summed intensities, and their own ML-vs-DFT MAE.
The traj's frames are taken as the global minimum, then isomers I..IV in the traj's order (rising energy);
the files name no isomer, so this pairing is an assumption (the paper's own ML-vs-DFT MAEs read from the
arrays, lowest for I and highest for II as its text says, confirm the columns, not the pairing).

``--train-db DB`` (``--test-db DB``): the SOAP-PCA map of Fig. 7 b (:mod:`spectra.soap_map`; needs dscribe:
``pip install nanosil[analysis]``) in OUT/soap_map.png and OUT/soap_map.csv, and each structure's distance
to the training set (> 1 reads as outside what the model saw).

Writes OUT/transferability.csv (one row per structure) and OUT/transferability.json (everything, with
units); with --harmonic also OUT/harmonic/<name>.txt (our modes) and <name>.png (ours beside theirs).
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np

from al_manager.cli import number

P5_ISOMERS_FILE = "pyroxene_N05_isomers_pbe0.traj"
P5_NAMES = ("GM", "I", "II", "III", "IV")
#: the layout of the paper's isomer arrays, column by column
PAPER_COLUMNS = ("dft_frequency_cm-1", "dft_intensity_km_mol", "ml_frequency_cm-1", "ml_intensity_km_mol")

CSV_COLUMNS = (
    "file", "index", "name", "formula", "n_atoms",
    "energy_ref_eV", "energy_ml_eV", "energy_error_meV_per_atom", "energy_std_meV_per_atom",
    "relative_energy_ref_meV", "relative_energy_ml_meV", "relative_energy_error_meV",
    "force_mae_eV_per_A", "force_rmse_eV_per_A", "force_max_atom_error_eV_per_A", "max_force_std_eV_per_A",
    "dipole_error_D", "dipole_std_D",
    "relax_steps", "relax_converged", "relax_rmsd_A", "relax_max_displacement_A", "relax_energy_change_meV",
    "lowest_vibration_cm-1", "n_imaginary",
    "freq_mae_vs_paper_dft_cm-1", "freq_mae_vs_paper_ml_cm-1", "paper_ml_vs_dft_freq_mae_cm-1",
    "intensity_mae_vs_paper_dft_km_mol", "intensity_mae_vs_paper_ml_km_mol", "intensity_sum_ratio_vs_paper_dft",
    "soap_distance",
)

UNITS = {
    "energy": "eV (errors meV/atom; relative energies meV)", "forces": "eV/Å", "dipole": "Debye",
    "frequencies": "cm^-1", "intensities": "km/mol", "displacements": "Å",
    "soap_distance": "nearest training structure, in units of the training set's median nearest-neighbour distance",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("structures", nargs="+", metavar="STRUCTURES",
                   help="labelled structures not in the training set (ASE database or file, e.g. the P5 isomers "
                        f"{P5_ISOMERS_FILE})")
    p.add_argument("--models", required=True, metavar="DIR", help="committee folder")
    p.add_argument("--out", default="transferability", metavar="DIR", help="output folder (default %(default)s)")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="the reference method to use when a database holds several")
    p.add_argument("--harmonic", action="store_true",
                   help="relax each structure on the ML surface and compute its harmonic IR spectrum")
    p.add_argument("--fmax", type=number(float, 0.0, exclusive_minimum=True), default=1e-3,
                   help="relaxation threshold, eV/Å (default %(default)s)")
    p.add_argument("--steps", type=number(int, 1), default=2000, help="most BFGS steps (default %(default)s)")
    p.add_argument("--paper-ir", default=None, metavar="DIR",
                   help="folder of the paper's isomer_*_harmonic.npy (default: ../paper_ir/P5 beside the P5 "
                        "isomers' folder, when present)")
    from driver.device import add_device_argument

    add_device_argument(p, "the committee (errors, relaxations, Hessians)")
    g = p.add_argument_group("SOAP-PCA map (needs dscribe: pip install nanosil[analysis])")
    g.add_argument("--train-db", default=None, metavar="DB", help="the training structures: draw the map")
    g.add_argument("--test-db", default=None, metavar="DB", help="test structures to show on the map")
    g.add_argument("--r-cut", type=number(float, 1.0, exclusive_minimum=True), default=5.0,
                   help="SOAP cutoff, Å (default %(default)s)")
    g.add_argument("--n-max", type=number(int, 1), default=6, help="SOAP radial basis size (default %(default)s)")
    g.add_argument("--l-max", type=number(int, 0), default=4, help="SOAP angular degree (default %(default)s)")
    g.add_argument("--average", choices=("inner", "outer"), default="inner",
                   help="global SOAP: average the densities (inner) or the power spectra (outer)")


# ------------------------------------------------------------------------------------------ inputs
def is_p5_isomers(path: str | Path, frames) -> bool:
    return Path(path).name == P5_ISOMERS_FILE and len(frames) == len(P5_NAMES)


def structure_names(path: str | Path, frames) -> list[str]:
    """``P5-GM``, ``P5-I`` .. ``P5-IV`` for the paper's isomers; ``<file stem>:<index>`` otherwise."""
    if is_p5_isomers(path, frames):
        return [f"P5-{n}" for n in P5_NAMES]
    stem = Path(path).stem
    return [stem] if len(frames) == 1 else [f"{stem}:{i}" for i in range(len(frames))]


def paper_ir_folder(structures_path: str | Path, option: str | None) -> Path | None:
    if option is not None:
        folder = Path(option)
        if not folder.is_dir():
            raise FileNotFoundError(f"--paper-ir {option}: no such folder")
        return folder
    guess = Path(structures_path).resolve().parent.parent / "paper_ir" / "P5"
    return guess if guess.is_dir() else None


def read_paper_isomers(folder: Path, n_atoms: int) -> dict[str, np.ndarray]:
    """``{roman numeral: (3N-6, 4) array}`` of the isomer files present; shapes printed, layout checked."""
    out = {}
    for name in P5_NAMES[1:]:
        path = folder / f"isomer_{name}_harmonic.npy"
        if not path.is_file():
            continue
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as exc:  # numpy raises several kinds for a damaged file
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
        print(f"paper arrays: {path.name} {a.shape} {a.dtype} (columns: {', '.join(PAPER_COLUMNS)})", flush=True)
        want = (3 * n_atoms - 6, 4)
        if a.shape != want or not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: shape {a.shape}, expected {want} finite values "
                             f"({', '.join(PAPER_COLUMNS)} of the {want[0]} vibrations of {n_atoms} atoms)")
        out[name] = a
    return out


def read_atoms_file(path: str | Path) -> tuple[list, list[str]]:
    """Structures (ASE Atoms, no labels needed) of a database or file, duplicates removed, with names."""
    from ase.io import read

    from driver.data import DatasetError, connect, structure_hash

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if p.is_dir():
        raise DatasetError(f"{path} is a folder, not a database or structure file")
    if p.suffix == ".db":
        import sqlite3

        try:
            rows = [(f"{p.stem}:{row.id}", row.toatoms()) for row in connect(p).select()]
        except sqlite3.Error as exc:
            from driver.data import database_error

            raise database_error(p, exc) from None
    else:
        try:
            images = read(str(p), index=":")
        except Exception as exc:  # ASE raises many kinds for a malformed file
            raise DatasetError(f"{path} cannot be read: {' '.join(str(exc).split())}") from None
        rows = [(f"{p.stem}:{i}", a) for i, a in enumerate(images)]
    seen, atoms, names = set(), [], []
    for name, a in rows:
        h = structure_hash(a.numbers, a.positions)
        if h not in seen:
            seen.add(h)
            atoms.append(a)
            names.append(name)
    if not atoms:
        raise DatasetError(f"{path} holds no structures")
    return atoms, names


# ------------------------------------------------------------------------------------------ analysis
def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def label_errors(committee, frame) -> dict:
    """Errors of the committee on one labelled frame, beside the committee's own spread."""
    from ase.units import Debye

    p = committee.predict(frame.numbers, frame.positions)
    n = len(frame.numbers)
    df = p.forces - frame.forces
    row = {
        "energy_ref_eV": float(frame.energy), "energy_ml_eV": float(p.energy),
        "energy_error_meV_per_atom": (p.energy - frame.energy) / n * 1e3,
        "energy_std_meV_per_atom": p.energy_std_per_atom * 1e3,
        "force_mae_eV_per_A": float(np.abs(df).mean()), "force_rmse_eV_per_A": float(np.sqrt((df**2).mean())),
        "force_max_atom_error_eV_per_A": float(np.linalg.norm(df, axis=1).max()),
        "max_force_std_eV_per_A": _nan(p.max_force_std),
        "dipole_error_D": float("nan"), "dipole_std_D": float("nan"),
    }
    if p.dipole is not None and frame.dipole is not None:
        row["dipole_error_D"] = float(np.linalg.norm(p.dipole - frame.dipole)) / Debye
    if p.dipole_std is not None:
        row["dipole_std_D"] = float(p.dipole_std) / Debye
    return row


def relative_energies(rows: list[dict]) -> list[dict]:
    """Relative energies within each (file, formula): minus the reference-lowest structure's energy, meV.

    Fills ``relative_energy_*`` in ``rows`` and returns one summary per group (ordering kept or not)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["file"], r["formula"]), []).append(r)
    out = []
    for (file, formula), members in groups.items():
        ref = np.array([m["energy_ref_eV"] for m in members])
        ml = np.array([m["energy_ml_eV"] for m in members])
        k = int(np.argmin(ref))
        for m, e_ref, e_ml in zip(members, ref, ml):
            m["relative_energy_ref_meV"] = (e_ref - ref[k]) * 1e3
            m["relative_energy_ml_meV"] = (e_ml - ml[k]) * 1e3
            m["relative_energy_error_meV"] = m["relative_energy_ml_meV"] - m["relative_energy_ref_meV"]
        if len(members) < 2:
            continue
        d = np.array([m["relative_energy_error_meV"] for m in members])
        out.append({
            "file": file, "formula": formula, "lowest": members[k]["name"],
            "names": [m["name"] for m in members],
            "relative_energy_ref_meV": [m["relative_energy_ref_meV"] for m in members],
            "relative_energy_ml_meV": [m["relative_energy_ml_meV"] for m in members],
            "mae_meV": float(np.abs(np.delete(d, k)).mean()),
            "same_order": bool(np.array_equal(np.argsort(ref, kind="stable"), np.argsort(ml, kind="stable"))),
            "ml_lowest": members[int(np.argmin(ml))]["name"],
        })
    return out


def relax(atoms, calc, fmax: float, steps: int) -> tuple[object, dict]:
    """BFGS on the ML surface; the relaxed copy and how far it moved (rotation and translation removed)."""
    from ase.build import minimize_rotation_and_translation
    from ase.optimize import BFGS

    start = atoms.copy()
    start.calc = None
    a = atoms.copy()
    a.calc = calc
    e0 = a.get_potential_energy()
    opt = BFGS(a, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=steps))
    e1 = a.get_potential_energy()
    final_fmax = float(np.linalg.norm(a.get_forces(), axis=1).max())
    moved = a.copy()
    minimize_rotation_and_translation(start, moved)
    disp = np.linalg.norm(moved.positions - start.positions, axis=1)
    return a, {"relax_steps": int(opt.nsteps), "relax_converged": converged,
               "relax_final_fmax_eV_per_A": final_fmax,
               "relax_rmsd_A": float(np.sqrt((disp**2).mean())), "relax_max_displacement_A": float(disp.max()),
               "relax_energy_change_meV": (e1 - e0) * 1e3}


def beside_paper(ours, paper: np.ndarray, n_atoms: int) -> dict:
    """Our harmonic set against the paper's DFT and ML columns of one isomer."""
    from spectra.compare import compare_harmonic, drop_zero_modes
    from spectra.harmonic import HarmonicIR

    dft = HarmonicIR(paper[:, 0], paper[:, 1], None, "paper DFT")
    ml = HarmonicIR(paper[:, 2], paper[:, 3], None, "paper ML")
    vs_dft = compare_harmonic(dft, ours, n_atoms)
    vs_ml = compare_harmonic(ml, ours, n_atoms)
    paper_self = compare_harmonic(dft, ml, n_atoms)
    vib = drop_zero_modes(ours)
    theirs = paper[np.argsort(paper[:, 0], kind="stable"), 1]  # DFT intensities, modes by frequency as ours
    ok = len(theirs) == len(vib.intensities) and np.all(np.isfinite(vib.intensities)) and np.std(vib.intensities) > 0
    corr = float(np.corrcoef(theirs, vib.intensities)[0, 1]) if ok else float("nan")
    return {
        "vs_paper_dft": vs_dft, "vs_paper_ml": vs_ml, "paper_ml_vs_paper_dft": paper_self,
        "intensity_sum_km_mol": {"ours": float(vib.intensities.sum()), "paper_dft": float(paper[:, 1].sum()),
                                 "paper_ml": float(paper[:, 3].sum())},
        "intensity_correlation_vs_paper_dft": corr,
    }


def harmonic_plot(path: Path, ours, paper: np.ndarray | None, title: str) -> None:
    """Fig. 7 a style: broadened spectra (Gaussians, FWHM 10 cm^-1, peak = intensity), ours and theirs."""
    from spectra.broadening import broaden
    from spectra.compare import drop_zero_modes
    from spectra.plotting import plot_spectra

    vib = drop_zero_modes(ours)
    if not np.all(np.isfinite(vib.intensities)):
        return
    spectra = [broaden(vib.frequencies, vib.intensities)]
    labels = ["ours (ML, this committee)"]
    if paper is not None:
        spectra += [broaden(paper[:, 0], paper[:, 1]), broaden(paper[:, 2], paper[:, 3])]
        labels += ["paper DFT (PBE0)", "paper ML"]
    highest = max(float(np.max(vib.frequencies)), float(np.max(paper[:, [0, 2]])) if paper is not None else 0.0)
    top = max(highest * 1.1, 200.0)
    plot_spectra(path, spectra, labels, xlim=(0.0, min(top, 4000.0)), ylabel="intensity / km mol$^{-1}$",
                 title=title)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _fmt(x, width=9, digits=2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return f"{'-':>{width}s}"
    text = f"{x:{width}.{digits}f}"
    return text if len(text) <= width else f"{x:{width}.{max(1, width - 7)}g}"


def print_table(rows: list[dict], harmonic: bool) -> None:
    head = (f"{'structure':16s}{'dE':>9s}{'stdE':>9s}{'rel ref':>9s}{'rel ML':>9s}{'F MAE':>9s}{'F max':>9s}"
            f"{'stdF':>9s}{'dmu':>9s}{'stdmu':>9s}")
    units = (f"{'':16s}{'meV/at':>9s}{'meV/at':>9s}{'meV':>9s}{'meV':>9s}{'eV/Å':>9s}{'eV/Å':>9s}{'eV/Å':>9s}"
             f"{'D':>9s}{'D':>9s}")
    if harmonic:
        head += f"{'moved':>9s}{'vsDFT':>9s}{'vsML':>9s}{'ML-DFT':>9s}"
        units += f"{'Å rmsd':>9s}{'cm-1':>9s}{'cm-1':>9s}{'paper':>9s}"
    print(head)
    print(units)
    for r in rows:
        line = (f"{r['name'][:15]:16s}{_fmt(r['energy_error_meV_per_atom'])}{_fmt(r['energy_std_meV_per_atom'])}"
                f"{_fmt(r.get('relative_energy_ref_meV'), 9, 0)}{_fmt(r.get('relative_energy_ml_meV'), 9, 0)}"
                f"{_fmt(r['force_mae_eV_per_A'], 9, 3)}{_fmt(r['force_max_atom_error_eV_per_A'], 9, 3)}"
                f"{_fmt(r['max_force_std_eV_per_A'], 9, 3)}{_fmt(r['dipole_error_D'], 9, 3)}"
                f"{_fmt(r['dipole_std_D'], 9, 3)}")
        if harmonic:
            line += (f"{_fmt(r.get('relax_rmsd_A'), 9, 3)}{_fmt(r.get('freq_mae_vs_paper_dft_cm-1'))}"
                     f"{_fmt(r.get('freq_mae_vs_paper_ml_cm-1'))}{_fmt(r.get('paper_ml_vs_dft_freq_mae_cm-1'))}")
        print(line)


def write_csv(path: Path, rows: list[dict]) -> None:
    from spectra.atomic import write_text

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(int(v))
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.10g}"
        return str(v).replace(",", ";")

    lines = [",".join(CSV_COLUMNS)] + [",".join(cell(r.get(c)) for c in CSV_COLUMNS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def soap_section(args, transfer_atoms, transfer_names, out: Path) -> dict:
    from al_manager.cli import UsageError
    from spectra.soap_map import MissingPackageError, SoapSettings, build_map, plot_map, write_map_csv

    settings = SoapSettings(r_cut=args.r_cut, n_max=args.n_max, l_max=args.l_max, average=args.average)
    train, train_names = read_atoms_file(args.train_db)
    others = {}
    if args.test_db:
        test_atoms, test_names = read_atoms_file(args.test_db)
        others["test"] = (test_names, test_atoms)
    others["transfer"] = (transfer_names, transfer_atoms)
    try:
        smap, points = build_map(train, others, settings, train_names)
    except MissingPackageError as exc:
        raise UsageError(str(exc)) from None
    write_map_csv(out / "soap_map.csv", points)
    plot_map(out / "soap_map.png", smap, points)
    print(f"SOAP map: {len(train)} training structures (median nearest-neighbour distance {smap.scale:.4g}), "
          f"PC1+PC2 {100 * float(np.sum(smap.explained)):.0f} % of their variance; "
          f"distance of each new structure to the training set (> 1 reads as outside):")
    for p in points:
        if p.set == "transfer":
            where = "outside" if p.distance > 1 else "inside"
            print(f"  {p.name:24s} {p.distance:7.2f}  ({where}; nearest {train_names[p.nearest]})")
    return {"settings": dict(settings.__dict__), "n_train": len(train),
            "median_nn_distance": smap.scale, "explained_variance": [float(v) for v in smap.explained],
            "csv": "soap_map.csv", "png": "soap_map.png",
            "points": [p.__dict__ for p in points if p.set != "train"]}


def run(args) -> int:
    import torch

    from al_manager.cli import UsageError
    from driver.calculator import NanosilCalculator
    from driver.data import read_frames
    from driver.models.committee import load_committee

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out} is a file: give a folder")
    if args.train_db:  # fail before any work when the map cannot be drawn
        from spectra.soap_map import MissingPackageError, _soap_class

        try:
            _soap_class()
        except MissingPackageError as exc:
            raise UsageError(str(exc)) from None
        if not Path(args.train_db).exists():
            raise FileNotFoundError(f"--train-db {args.train_db} does not exist")
    elif args.test_db:
        raise UsageError("--test-db needs --train-db (the map is drawn on the training set's axes)")
    committee = load_committee(args.models, dtype=torch.float64, device=args.device)
    inputs = []
    for path in args.structures:
        frames = read_frames(path, method=args.method)
        if not frames:
            raise UsageError(f"{path} holds no labelled structures")
        for i, f in enumerate(frames):  # an element outside the model: one line naming it and the file
            committee.validate(f.numbers, f.positions, source=f"{path} (structure {i})")
        inputs.append((path, frames, structure_names(path, frames)))
    from al_manager.commands.evaluate import training_overlap

    for path, frames, _ in inputs:
        seen = training_overlap(committee, frames)
        if seen > 0:
            print(f"nanosil transferability: warning: {seen} of {len(frames)} structures in {path} are in the "
                  f"training data of {args.models}: they do not test transferability", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)

    from ase import Atoms

    rows, atoms_list = [], []
    for path, frames, names in inputs:
        for i, (f, name) in enumerate(zip(frames, names)):
            atoms = Atoms(numbers=f.numbers, positions=f.positions)
            atoms_list.append(atoms)
            row = {"file": str(path), "index": i, "name": name, "formula": atoms.get_chemical_formula(),
                   "n_atoms": len(atoms)}
            row.update(label_errors(committee, f))
            rows.append(row)
    groups = relative_energies(rows)

    harmonic_out = {}
    if args.harmonic:
        from spectra.compare import drop_zero_modes
        from spectra.harmonic import harmonic_autograd, write_harmonic

        calc = NanosilCalculator(committee)
        folder = out / "harmonic"
        k = 0
        for path, frames, names in inputs:
            paper = {}
            if is_p5_isomers(path, frames):
                where = paper_ir_folder(path, args.paper_ir)
                if where is None:
                    print(f"paper arrays: no paper_ir/P5 folder beside {path}; ours only", flush=True)
                else:
                    paper = read_paper_isomers(where, len(frames[0].numbers))
            for i, name in enumerate(names):
                row, atoms = rows[k], atoms_list[k]
                k += 1
                print(f"{name}: relaxing on the ML surface (BFGS, fmax {args.fmax:g} eV/Å) ...", flush=True)
                try:
                    relaxed, moved = relax(atoms, calc, args.fmax, args.steps)
                    committee.validate(relaxed.numbers, relaxed.positions, source=f"{name} after relaxation")
                except ValueError as exc:
                    row["harmonic_error"] = f"relaxation failed: {exc}"
                    print(f"{name}: {row['harmonic_error']}", flush=True)
                    continue
                row.update(moved)
                if not moved["relax_converged"]:
                    print(f"{name}: warning: BFGS did not reach fmax {args.fmax:g} eV/Å in {args.steps} steps "
                          f"(largest force {moved['relax_final_fmax_eV_per_A']:.3g} eV/Å)", flush=True)
                har = harmonic_autograd(relaxed, calc, project=True)
                vib = drop_zero_modes(har)
                row["lowest_vibration_cm-1"] = float(vib.frequencies[0])
                row["n_imaginary"] = int(np.sum(vib.frequencies < 0))
                folder.mkdir(parents=True, exist_ok=True)
                write_harmonic(folder / f"{_safe(name)}.txt", har)
                entry = {"frequencies_cm-1": vib.frequencies.tolist(), "intensities_km_mol": vib.intensities.tolist(),
                         "modes": f"harmonic/{_safe(name)}.txt"}
                roman = name.split("-", 1)[1] if name.startswith("P5-") else None
                theirs = paper.get(roman) if roman else None
                if theirs is not None:
                    cmp = beside_paper(har, theirs, len(relaxed))
                    entry["paper"] = cmp
                    row["freq_mae_vs_paper_dft_cm-1"] = cmp["vs_paper_dft"]["frequency_mae_cm-1"]
                    row["freq_mae_vs_paper_ml_cm-1"] = cmp["vs_paper_ml"]["frequency_mae_cm-1"]
                    row["paper_ml_vs_dft_freq_mae_cm-1"] = cmp["paper_ml_vs_paper_dft"]["frequency_mae_cm-1"]
                    row["intensity_mae_vs_paper_dft_km_mol"] = cmp["vs_paper_dft"]["intensity_mae_km_mol"]
                    row["intensity_mae_vs_paper_ml_km_mol"] = cmp["vs_paper_ml"]["intensity_mae_km_mol"]
                    s = cmp["intensity_sum_km_mol"]
                    row["intensity_sum_ratio_vs_paper_dft"] = s["ours"] / s["paper_dft"] if s["paper_dft"] else None
                harmonic_plot(folder / f"{_safe(name)}.png", har, theirs, f"{name}: harmonic IR")
                harmonic_out[name] = entry

    soap = None
    if args.train_db:
        soap = soap_section(args, atoms_list, [r["name"] for r in rows], out)
        dist = {p["name"]: p["distance"] for p in soap["points"] if p["set"] == "transfer"}
        for r in rows:
            r["soap_distance"] = dist.get(r["name"])

    print_table(rows, args.harmonic)
    for g in groups:
        order = "same order" if g["same_order"] else f"ML order differs (ML lowest: {g['ml_lowest']})"
        print(f"relative energies of {g['formula']} in {Path(g['file']).name}: MAE {g['mae_meV']:.0f} meV "
              f"against the reference, {order}")
    from spectra.atomic import write_json

    write_csv(out / "transferability.csv", rows)
    write_json(out / "transferability.json", _json_safe({
        "models": str(args.models), "structures": [str(p) for p in args.structures], "units": UNITS,
        "rows": rows, "relative_energies": groups, "harmonic": harmonic_out or None,
        "harmonic_settings": {"fmax_eV_per_A": args.fmax, "steps": args.steps, "projected": True}
        if args.harmonic else None,
        "soap_map": soap,
    }))
    print(f"wrote {out / 'transferability.csv'} and {out / 'transferability.json'}"
          + (f", {out / 'soap_map.png'} and {out / 'soap_map.csv'}" if soap else ""))
    return 0
