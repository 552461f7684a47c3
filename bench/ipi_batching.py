"""i-PI's own batching against nanosil's design, on the same work: i-PI's cost per MD step with the
production outputs, the force provider costing nothing.

nanosil runs one i-PI per trajectory, all served by one batched driver (``driver.ipi.batch_server``).
i-PI 3.3 can instead hold several systems in one simulation (``<system prefix=...>`` or
``system_template``) and hand their force requests to one client in batches (``<ffsocket>
<batch_size>``, also over shared memory, ``mode='shm'``). Both are timed here with a force provider that
computes nothing (``bench/_null_pes.py``: zero forces, a dipole in the extras), so what is measured is
i-PI's side of a step, which bounds how close a campaign comes to the model-only ceiling
(``bench/campaign_throughput.py``: the CPU outside the model per step):

- ``many``: N i-PI processes (the production template, one P2 trajectory each, 400 K), one client each
  over a UNIX socket; they run side by side on the cores;
- ``one_batched``: one i-PI with the same N systems and outputs, one client with ``batch_size = N``;
- ``one_batched_shm``: the same over i-PI's shared-memory transport;
- ``per_core_batched``: one such i-PI per core, each with N / cores of the systems.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ipi_batching.py [--systems 8] [--steps 2000] [--json out.json]

Keys (``--json``): per arm ``<arm>_system_steps_per_s`` (trajectory steps per wall second, steady window),
``<arm>_cpu_ms_per_system_step`` (i-PI + client CPU per trajectory step, all processes); and
``<arm>_over_many_system_steps_per_s`` (> 1: faster than many i-PIs), ``cores``.

With a model the work per step adds the same batched model time to both designs, but one i-PI
steps its systems in one Python process (its threads share the interpreter lock), so its i-PI part does
not spread over the cores, and the model waits for i-PI and i-PI for the model within each step; many
i-PIs overlap each other's Python with the model's arithmetic.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from campaign_throughput import BIN, env, prepare, stop_all, watch_files  # noqa: E402

NULL_PES = BENCH / "_null_pes.py"


def _client(socket: str, log: Path, shm: bool = False) -> subprocess.Popen:
    cmd = [str(BIN / "i-pi-py_driver"), "-a", socket, "-m", "custom", "-P", str(NULL_PES)]
    cmd += ["--shm"] if shm else ["-u"]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=log.parent, stdout=f, stderr=subprocess.STDOUT, env=env(1))


def _ipi(xml: Path) -> subprocess.Popen:
    with open(xml.parent / "ipi.log", "w") as f:
        return subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=xml.parent, stdout=f,
                                stderr=subprocess.STDOUT, env=env(1))


def combined_xml(xmls: list[Path], folder: Path, socket: str, batch: int, mode: str) -> Path:
    """One simulation holding the systems of ``xmls`` (each rendered by ipi_inputs.render_input from the
    production template), built as elements: the first file's outputs, prng and force field, every
    file's system under its own prefix, the start files by absolute path."""
    root = ET.parse(xmls[0]).getroot()
    for old in root.findall("system"):
        root.remove(old)
    ff = root.find("ffsocket")
    ff.set("mode", mode)
    ff.find("address").text = f" {socket} "
    ET.SubElement(ff, "batch_size").text = f" {batch} "
    for k, xml in enumerate(xmls):
        system = ET.parse(xml).getroot().find("system")
        system.set("prefix", f"s{k}")
        init = system.find("initialize")
        for tag in ("file", "velocities"):
            el = init.find(tag)
            el.text = f" {(xml.parent / el.text.strip()).resolve()} "
        root.append(system)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "md.xml"
    ET.ElementTree(root).write(out)
    return out


def rates(window: dict) -> dict:
    """Trajectory steps per wall second and CPU ms per trajectory step of a :func:`watch_files` window."""
    return {"system_steps_per_s": window["steps"] / window["seconds"],
            "cpu_ms_per_system_step": 1e3 * window["cpu_s"] / window["steps"], "window_s": window["seconds"]}


def run_many(workdir: Path, n: int, steps: int, stride: int, timestep_fs: float) -> dict:
    folder = workdir / "many"
    shutil.rmtree(folder, ignore_errors=True)
    sockets = [f"nsb{os.getpid()}m{k}" for k in range(n)]
    xmls = [prepare(folder, "P2", k, steps, s, stride, timestep_fs) for k, s in enumerate(sockets)]
    procs = [_ipi(x) for x in xmls]
    time.sleep(1.0)
    procs += [_client(s, x.parent / "client.log") for s, x in zip(sockets, xmls)]
    try:
        return rates(watch_files(procs, [x.parent / "md.dipole_0" for x in xmls], steps // stride + 1, stride, folder))
    finally:
        stop_all(procs)


def run_grouped(workdir: Path, n: int, groups: int, steps: int, stride: int, timestep_fs: float,
                mode: str) -> dict:
    """``groups`` i-PIs, each with n / groups of the systems and one client batching them."""
    folder = workdir / f"groups{groups}_{mode}"
    shutil.rmtree(folder, ignore_errors=True)
    size = n // groups
    sockets = [f"nsb{os.getpid()}g{mode}{g}" for g in range(groups)]
    xmls = []
    for g, socket in enumerate(sockets):
        starts = [prepare(folder / "start", "P2", g * size + k, steps, socket, stride, timestep_fs)
                  for k in range(size)]
        xmls.append(combined_xml(starts, folder / f"run{g}", socket, size, mode))
    procs = [_ipi(x) for x in xmls]
    time.sleep(1.0)
    procs += [_client(s, x.parent / "client.log", shm=(mode == "shm")) for s, x in zip(sockets, xmls)]
    # i-PI prefixes each system's outputs with the system's prefix
    files = [x.parent / f"s{k}_md.dipole_0" for x in xmls for k in range(size)]
    try:
        result = rates(watch_files(procs, files, steps // stride + 1, stride, folder))
    finally:
        stop_all(procs)
    for x in xmls if size > 1 else []:   # a batch of 1 is i-PI's plain protocol
        if f"batch of {size} structures" not in (x.parent / "client.log").read_text():
            raise RuntimeError(f"the client never received a batch of {size}: see {x.parent / 'client.log'}")
    return result


def main(argv=None) -> int:
    from al_manager.campaign.config import MDSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", type=int, default=8, help="trajectories (P2 at 400 K)")
    p.add_argument("--steps", type=int, default=2000, help="MD steps per trajectory")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    workdir = BENCH / "results" / "ipi_batching"
    md = MDSettings()          # the ir-campaign defaults: time step and dipole stride
    stride, dt = md.dipole_stride, md.timestep_fs
    n, cores = args.systems, os.cpu_count()
    arms = {"many": lambda: run_many(workdir, n, args.steps, stride, dt),
            "one_batched": lambda: run_grouped(workdir, n, 1, args.steps, stride, dt, "unix"),
            "one_batched_shm": lambda: run_grouped(workdir, n, 1, args.steps, stride, dt, "shm"),
            "per_core_batched": lambda: run_grouped(workdir, n, cores, args.steps, stride, dt, "unix")}
    out = {"systems": args.systems, "steps": args.steps, "dipole_stride": stride, "cores": os.cpu_count()}
    print(f"{args.systems} x P2 at 400 K, {args.steps} steps each, dipole every {stride} steps, "
          f"a force provider that computes nothing; {os.cpu_count()} cores")
    print(f"{'arm':18s} {'system steps/s':>15s} {'CPU ms/system step':>19s} {'window s':>9s}")
    for name, arm in arms.items():
        r = arm()
        out.update({f"{name}_{k}": v for k, v in r.items() if k in ("system_steps_per_s", "cpu_ms_per_system_step")})
        print(f"{name:18s} {r['system_steps_per_s']:15.1f} {r['cpu_ms_per_system_step']:19.3f} {r['window_s']:9.1f}",
              flush=True)
    out["one_batched_over_many_system_steps_per_s"] = out["one_batched_system_steps_per_s"] / out["many_system_steps_per_s"]
    out["one_batched_shm_over_many_system_steps_per_s"] = (out["one_batched_shm_system_steps_per_s"]
                                                           / out["many_system_steps_per_s"])
    out["per_core_batched_over_many_system_steps_per_s"] = (out["per_core_batched_system_steps_per_s"]
                                                            / out["many_system_steps_per_s"])
    print(f"over many i-PIs: one i-PI, batched {out['one_batched_over_many_system_steps_per_s']:.2f} "
          f"(shm {out['one_batched_shm_over_many_system_steps_per_s']:.2f}); one i-PI per core, batched "
          f"{out['per_core_batched_over_many_system_steps_per_s']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
