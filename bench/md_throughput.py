"""MD throughput of the committee (3 energy members + 1 dipole member, the paper's network sizes) on P2 and P10:

(a) i-PI + ``nanosil-driver`` over a UNIX socket (production_nvt.xml: SVR, dipole every step),
(b) ASE VelocityVerlet in-process with ``NanosilCalculator`` (the baseline of the ratio),
(c) i-PI with a zero-cost driver (zero forces, same socket and outputs): the cost of i-PI and the socket.

All at 0.5 fs, float32 models, 1 torch thread. Times are wall-clock per MD step after the first force call,
measured in this run, alternating (a), (b), (c) ``--repeat`` times and keeping the best of each; (a)/(b) is the
ratio of steps per second (target >= 0.8 on P10).

Cost does not depend on the weights, but an untrained network's random PES collapses a cluster within a few
hundred steps. Without ``--models`` the bench therefore uses an untrained committee of the paper's sizes with
its atomic energy scale divided by 1000 (same operations, gentle forces) at 10 K; with ``--models`` (a trained
committee) it runs at 300 K.

    OMP_NUM_THREADS=1 .venv/bin/python bench/md_throughput.py [--steps 300] [--models DIR] [--json out.json]
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

from _common import BIN, ipi_server, run_ipi_with_driver

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = REPO / ".." / "shared" / "data" / "structures"
sys.path.insert(0, str(REPO))

SYSTEMS = {"P2": "pyroxene_N02_GM.xyz", "P10": "pyroxene_N10_GM.xyz"}


def ipi_with_driver(models: Path, structure: Path, steps: int, ranks: int, temperature: float, workdir: Path) -> float:
    """ms per MD step of i-PI + nanosil-driver, as the driver measures it (after the first evaluation)."""
    from ipi_inputs import render_input

    name = f"bench_{uuid.uuid4().hex[:10]}"
    xml = render_input("production_nvt", workdir, socket=f"unix:{name}", structure=structure,
                       temperature=temperature, seed=1, steps=steps, prefix="md")
    cmd = [str(BIN / "nanosil-driver"), "--models", str(models), "--structure", str(structure), "--unix", name,
           "--threads", "1", "--dtype", "float32"]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "-n", str(ranks), *cmd]
    run_ipi_with_driver(xml, name, cmd, workdir / "ipi.log", workdir / "driver.log", timeout=3600)
    match = re.search(r"\(([0-9.]+) ms per MD step after the first\)", (workdir / "driver.log").read_text())
    if not match:
        raise RuntimeError("no timing line in the driver log")
    return float(match.group(1))


def ipi_with_zero_driver(structure: Path, steps: int, workdir: Path) -> float:
    """ms per MD step of i-PI served by a driver that computes nothing (zero forces, a zero dipole)."""
    from driver.ipi.client import IPIClient, connect
    from ipi_inputs import render_input

    name = f"bench_{uuid.uuid4().hex[:10]}"
    xml = render_input("production_nvt", workdir, socket=f"unix:{name}", structure=structure, temperature=300,
                       seed=1, steps=steps, prefix="zero")
    stamps = []
    extras = '{"dipole": [0.0, 0.0, 0.0], "dipole_members": [[0.0, 0.0, 0.0]], "uncertain": false}'

    def zero(cell, pos):
        stamps.append(time.perf_counter())
        return 0.0, np.zeros_like(pos), np.zeros((3, 3)), extras

    with ipi_server(xml, workdir / "ipi_zero.log", name) as ipi:
        client = IPIClient(connect("unix", name, wait=60))
        client.serve(zero)
        end = time.perf_counter()
        client.close()
        ipi.wait(timeout=120)
    return (end - stamps[1]) / (len(stamps) - 1) * 1e3


def ase_velocity_verlet(models: Path, structure: Path, steps: int, temperature: float) -> float:
    """ms per MD step of ASE's VelocityVerlet with NanosilCalculator in this process."""
    import torch
    from ase import units
    from ase.io import read
    from ase.md.velocitydistribution import thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from driver.calculator import NanosilCalculator

    atoms = read(structure)
    atoms.calc = NanosilCalculator(str(models), dtype=torch.float32)
    thermalize_momenta(atoms, temperature, rng=np.random.default_rng(1))
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.run(2)  # warm-up: first calls, allocations
    start = time.perf_counter()
    dyn.run(steps)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="MD steps per measurement (default 300)")
    ap.add_argument("--zero-steps", type=int, default=2000, help="steps of the zero-cost driver run")
    ap.add_argument("--systems", default="P2,P10")
    ap.add_argument("--models", help="committee folder (default: an untrained 3+1 committee of the paper's sizes; "
                                     "throughput does not depend on the weights)")
    ap.add_argument("--ranks", type=int, default=1, help="MPI ranks of nanosil-driver (default 1)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating repetitions; the best of each is kept")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if not STRUCTURES.exists():
        print(f"structures not found: {STRUCTURES}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(1)
    from ase.io import read

    from driver.models.committee import ModelConfig, build_committee, save_committee

    with tempfile.TemporaryDirectory(prefix="nanosil-bench-") as tmp:
        tmp = Path(tmp)
        if args.models:
            models, temperature = Path(args.models), 300.0
        else:
            committee = build_committee(ModelConfig(), n_members=3, n_dipole=1, seed=0)
            with torch.no_grad():
                committee.energy_model.atomic_scale.mul_(1e-3)
            models, temperature = save_committee(committee, tmp / "models"), 10.0
        rows, figures = [], {}
        for system in [s for s in args.systems.split(",") if s]:
            structure = (STRUCTURES / SYSTEMS[system]).resolve()
            n = len(read(structure))
            work = tmp / system
            work.mkdir()
            # alternate the two and keep the best of each: on a shared machine, load comes and goes
            ipi_runs, ase_runs, zero_runs = [], [], []
            for _ in range(args.repeat):
                ipi_runs.append(ipi_with_driver(models, structure, args.steps, args.ranks, temperature, work))
                ase_runs.append(ase_velocity_verlet(models, structure, args.steps, temperature))
                zero_runs.append(ipi_with_zero_driver(structure, args.zero_steps, work))
            ipi_ms, ase_ms, zero_ms = min(ipi_runs), min(ase_runs), min(zero_runs)
            ratio = ase_ms / ipi_ms
            rows.append((system, n, ipi_ms, 1e3 / ipi_ms, ase_ms, 1e3 / ase_ms, ratio, zero_ms))
            figures[f"ipi_steps_per_s_{system}"] = round(1e3 / ipi_ms, 3)
            figures[f"ase_steps_per_s_{system}"] = round(1e3 / ase_ms, 3)
            figures[f"ipi_over_ase_{system}"] = round(ratio, 4)
            if system == "P10" or "zero_driver_ms_per_step" not in figures:
                figures["zero_driver_ms_per_step"] = round(zero_ms, 4)
            print(f"{system}: i-PI+driver {ipi_ms:.2f} ms/step, ASE {ase_ms:.2f} ms/step, zero driver "
                  f"{zero_ms:.3f} ms/step", file=sys.stderr, flush=True)

    print(f"MD throughput, 3+1 member committee ({'given' if args.models else 'untrained, paper sizes'}), "
          f"{args.steps} steps at {temperature:g} K, driver on {args.ranks} rank(s), 1 thread each, "
          f"best of {args.repeat}")
    print(f"{'system':>6} {'atoms':>5} | {'i-PI+driver':>11} {'steps/s':>8} | {'ASE VV':>9} {'steps/s':>8} | "
          f"{'(a)/(b)':>7} | {'zero drv':>9}")
    print(f"{'':>6} {'':>5} | {'ms/step':>11} {'':>8} | {'ms/step':>9} {'':>8} | {'':>7} | {'ms/step':>9}")
    for system, n, ipi_ms, ipi_sps, ase_ms, ase_sps, ratio, zero_ms in rows:
        print(f"{system:>6} {n:>5} | {ipi_ms:>11.2f} {ipi_sps:>8.1f} | {ase_ms:>9.2f} {ase_sps:>8.1f} | "
              f"{ratio:>7.3f} | {zero_ms:>9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
