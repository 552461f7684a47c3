"""How close is the ``pyscf`` backend to the paper's ORCA PBE0/def2-SVP (RIJCOSX) labels?

Labels N of the 31 P2 structures of ``../shared/data/pbe0_P2_normal_modes/farthest_selected_opt_pbe0.traj``
(default 3, ``--all`` for 31) with the pyscf backend and compares with the stored ORCA energy, forces
and dipole:

* energy: differences after removing one constant offset (mean difference), MAE in meV/atom;
* forces: MAE over all components, eV/Å;
* dipole: MAE over components, Debye.

GFN2-xTB (``xtb`` backend) on the same structures is the baseline of the same run: the table shows how
much closer the same-level pyscf labels are than a different method.

    OMP_NUM_THREADS=2 .venv/bin/python bench/reference_accuracy.py [--n 3 | --all] [--json out.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from ase.io import read
from ase.units import Debye

from _common import write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "pbe0_P2_normal_modes" / "farthest_selected_opt_pbe0.traj"
sys.path.insert(0, str(REPO))

from al_manager.reference import get_backend  # noqa: E402


def errors(frames, labels) -> dict:
    n_atoms = np.array([len(a) for a in frames])
    e_ref = np.array([a.get_potential_energy() for a in frames])
    e = np.array([lab.energy for lab in labels])
    de = (e - e_ref)
    de_rel = de - de.mean()
    f_ref = np.concatenate([a.get_forces().ravel() for a in frames])
    f = np.concatenate([lab.forces.ravel() for lab in labels])
    d_ref = np.array([a.get_dipole_moment() for a in frames])
    d = np.array([lab.dipole for lab in labels])
    return {
        "energy_mae_meV_per_atom": float(np.mean(np.abs(de_rel) / n_atoms) * 1000),
        "energy_max_meV_per_atom": float(np.max(np.abs(de_rel) / n_atoms) * 1000),
        "energy_offset_eV": float(de.mean()),
        "force_mae_eV_per_A": float(np.mean(np.abs(f - f_ref))),
        "force_max_eV_per_A": float(np.max(np.abs(f - f_ref))),
        "dipole_mae_D": float(np.mean(np.abs(d - d_ref)) / Debye),
        "dipole_max_D": float(np.max(np.linalg.norm(d - d_ref, axis=1)) / Debye),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3, help="number of structures (the first N of the file), default 3")
    ap.add_argument("--all", action="store_true", help="all 31 structures")
    ap.add_argument("--density-fit", default="rij", choices=["rij", "rijk", "none"],
                    help="rij (backend default): fitted Coulomb + exact exchange; rijk: both fitted")
    ap.add_argument("--grid-level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = ap.parse_args(argv)
    if not DATA.exists():
        print(f"reference data not found: {DATA}", file=sys.stderr)
        return 2
    frames = read(str(DATA), index=":")
    frames = frames if args.all else frames[: args.n]

    xtb = get_backend("xtb")
    t0 = time.perf_counter()
    xtb_labels = [xtb.label(a) for a in frames]
    xtb_seconds = (time.perf_counter() - t0) / len(frames)

    pyscf = get_backend("pyscf", density_fit=None if args.density_fit == "none" else args.density_fit,
                        grid_level=args.grid_level, threads=args.threads)
    labels = []
    t0 = time.perf_counter()
    for i, a in enumerate(frames):
        t1 = time.perf_counter()
        labels.append(pyscf.label(a))
        print(f"  structure {i + 1}/{len(frames)}: {time.perf_counter() - t1:.1f} s "
              f"(SCF attempts {labels[-1].info['scf_attempts']})", flush=True)
    seconds = (time.perf_counter() - t0) / len(frames)

    res = errors(frames, labels)
    base = errors(frames, xtb_labels)
    print(f"\nP2 structures vs ORCA PBE0/def2-SVP (RIJCOSX), n = {len(frames)}, pyscf density fitting "
          f"{args.density_fit}, grid level {args.grid_level}, {args.threads} thread(s)")
    print(f"{'figure':34s} {'pyscf':>12s} {'xtb (baseline)':>15s} {'xtb/pyscf':>10s}")
    for key in ("energy_mae_meV_per_atom", "energy_max_meV_per_atom", "force_mae_eV_per_A",
                "force_max_eV_per_A", "dipole_mae_D", "dipole_max_D"):
        ratio = base[key] / res[key] if res[key] > 0 else float("inf")
        print(f"{key:34s} {res[key]:12.5f} {base[key]:15.5f} {ratio:10.1f}")
    print(f"{'seconds_per_structure':34s} {seconds:12.1f} {xtb_seconds:15.4f}")
    print(f"constant energy offset pyscf - ORCA: {res['energy_offset_eV']:.4f} eV")

    if args.json:
        out = {"n_structures": len(frames), "energy_mae_meV_per_atom": res["energy_mae_meV_per_atom"],
               "force_mae_eV_per_A": res["force_mae_eV_per_A"], "dipole_mae_D": res["dipole_mae_D"],
               "seconds_per_structure": seconds, "details": res,
               "baseline_xtb": dict(base, seconds_per_structure=xtb_seconds),
               "settings": {"density_fit": args.density_fit, "grid_level": args.grid_level,
                            "threads": args.threads}}
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
