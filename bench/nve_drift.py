"""Energy conservation of i-PI + nanosil-driver: NVE at 0.5 fs on P2 after an NVT equilibration at 400 K.

The committee is trained here on the 31 PBE0 P2 structures of ../shared/data/pbe0_P2_normal_modes (3+1 members,
128x128 hidden, 500 epochs: ~6 min on 2 busy cores; a 100-epoch model still has holes that swallow the cluster
at 400 K) or given with ``--models``. The run: production_nvt.xml (SVR, 400 K) for ``--equil-steps``, then production_nve.xml from
its checkpoint for ``--steps`` (default 20000 = 10 ps). Reported: the drift of i-PI's conserved quantity
(slope of a linear fit, meV/atom/ps; target below 0.1), its fluctuation about that line (meV/atom), and, as
the scale they compare with in the same run, the fluctuation of the kinetic energy (meV/atom).

    OMP_NUM_THREADS=1 .venv/bin/python bench/nve_drift.py [--steps 20000] [--models DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from _common import BIN, run_ipi_with_driver

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
TRAJ = DATA / "pbe0_P2_normal_modes" / "farthest_selected_opt_pbe0.traj"
P2 = DATA / "structures" / "pyroxene_N02_GM.xyz"
sys.path.insert(0, str(REPO))


def run_md(xml: Path, name: str, models: Path, structure: Path, dtype: str) -> str:
    """i-PI + nanosil-driver until i-PI's EXIT; returns the driver's log."""
    work = xml.parent
    log = work / f"{xml.stem}.driver.log"
    driver = [str(BIN / "nanosil-driver"), "--models", str(models), "--structure", str(structure), "--unix", name,
              "--dtype", dtype, "--log-every", "5000"]
    run_ipi_with_driver(xml, name, driver, work / f"{xml.stem}.ipi.log", log, timeout=6 * 3600)
    return log.read_text()


def properties(path: Path) -> dict[str, np.ndarray]:
    names = re.findall(r"^# column +\d+ +--> (\S+)", path.read_text(), flags=re.M)
    data = np.loadtxt(path, ndmin=2)
    return {n.split("{")[0]: data[:, i] for i, n in enumerate(names)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="trained committee folder (default: train one here on the P2 PBE0 data)")
    ap.add_argument("--steps", type=int, default=20000, help="NVE steps of 0.5 fs (default 20000 = 10 ps)")
    ap.add_argument("--equil-steps", type=int, default=2000, help="NVT steps at 400 K before NVE (default 2000)")
    ap.add_argument("--temperature", type=float, default=400.0)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--train-epochs", type=int, default=500)
    ap.add_argument("--keep", metavar="DIR", help="keep the run files (and the trained model) in DIR")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if not P2.exists() or (args.models is None and not TRAJ.exists()):
        print(f"reference data not found under {DATA}", file=sys.stderr)
        return 2

    from ase.io import read

    from ipi_inputs import render_input

    with tempfile.TemporaryDirectory(prefix="nanosil-nve-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.models:
            models = Path(args.models)
        else:
            import torch

            from driver.training import TrainConfig, train_committee

            torch.set_num_threads(1)
            t0 = time.perf_counter()
            cfg = TrainConfig(committee=3, dipole_members=1, epochs=args.train_epochs, patience=args.train_epochs,
                              log_every=max(1, args.train_epochs // 4),
                              model=dict(hidden=(128, 128), dipole_features=32, dipole_interactions=2))
            train_committee(str(TRAJ), work / "models", cfg)
            models = work / "models"
            print(f"trained a 3+1 committee on {TRAJ.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

        n_atoms = len(read(P2))
        nvt_name, nve_name = f"nve_{uuid.uuid4().hex[:8]}", f"nve_{uuid.uuid4().hex[:8]}"
        nvt = render_input("production_nvt", work, socket=f"unix:{nvt_name}", structure=P2,
                           temperature=args.temperature, seed=2023, steps=args.equil_steps, prefix="nvt")
        run_md(nvt, nvt_name, models, P2, args.dtype)
        nve = render_input("production_nve", work, socket=f"unix:{nve_name}", checkpoint=work / "nvt.chk",
                           seed=2023, steps=args.steps, prefix="nve")
        log = run_md(nve, nve_name, models, P2, args.dtype)
        ms = re.search(r"\(([0-9.]+) ms per MD step", log)

        out = properties(work / "nve.out")
        t, conserved, kinetic = out["time"], out["conserved"], out["kinetic_md"]
        slope, intercept = np.polyfit(t, conserved, 1)                  # eV/ps
        residual = conserved - (slope * t + intercept)
        drift = slope / n_atoms * 1e3                                   # meV/atom/ps
        fluctuation = residual.std() / n_atoms * 1e3                    # meV/atom
        kinetic_fluct = kinetic.std() / n_atoms * 1e3
        t_vib = 2 * kinetic.mean() / ((3 * n_atoms - 6) * 8.617333262e-5)

    figures = {"drift_meV_per_atom_per_ps": round(float(drift), 6),
               "fluctuation_meV_per_atom": round(float(fluctuation), 6)}
    print(f"NVE energy conservation, P2 ({n_atoms} atoms), {args.steps} steps of 0.5 fs = {t[-1] - t[0]:.2f} ps "
          f"after {args.equil_steps} NVT steps at {args.temperature:g} K; model {args.dtype}"
          + (f", {float(ms.group(1)):.2f} ms/step" if ms else ""))
    print(f"{'quantity':<44} {'value':>12}")
    print(f"{'drift of the conserved energy (meV/atom/ps)':<44} {drift:>12.5f}   target < 0.1")
    print(f"{'fluctuation about the drift (meV/atom)':<44} {fluctuation:>12.5f}")
    print(f"{'kinetic-energy fluctuation (meV/atom)':<44} {kinetic_fluct:>12.5f}")
    print(f"{'fluctuation / kinetic fluctuation':<44} {fluctuation / kinetic_fluct:>12.5f}")
    print(f"{'mean vibrational temperature (K)':<44} {t_vib:>12.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
