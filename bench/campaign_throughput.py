#!/usr/bin/env python3
"""Throughput of production MD: batched driver serving many i-PI servers vs one trajectory after another.

    .venv/bin/python bench/campaign_throughput.py [--steps 300] [--models DIR] [--json FILE]
        [--timestep-fs X] [--dipole-stride-fs X] [--committee-every-fs X|none] [--slice-ps 2.0] [--skip-mixed]
        [--skip-slice]

Settings: the production defaults of a campaign (``al_manager.campaign.config.MDSettings()``), read at run
time so the bench follows them; ``--timestep-fs``, ``--dipole-stride-fs`` and ``--committee-every-fs``
override them.

- dipole stride (``md.dipole_stride_fs``, K_d MD steps): i-PI writes the dipole trajectory every K_d steps
  (``render_input(dipole_stride=K_d)``) and the drivers compute the dipole model only on those steps
  (``--dipole-every K_d``);
- propagation (``md.committee_every_fs``, K_c MD steps; ``none``: K_c = 1): with K_c = 1 the committee mean
  propagates every step; with K_c > 1 energy member 0 propagates and the whole committee runs every K_c
  steps (``driver.ipi.batch_server --committee-every K_c``).

Configurations, all on this machine's cores, all with the default model sizes (committee of 3 + 1 dipole
member; untrained weights unless --models is given: the cost does not depend on the weights):

- ``one-by-one``: each trajectory alone, one i-PI + one ``nanosil-driver`` (1 rank, 1 torch thread), one
  after another (the baseline). ``nanosil-driver`` has ``--dipole-every`` but no committee-every option, so
  the baseline always propagates on the committee mean (the whole committee every step), with the dipole
  stride of the settings;
- ``batched 1x1``: every trajectory's i-PI at once, one ``driver.ipi.batch_server`` (1 torch thread) serving all;
- ``batched 2x1``: the same trajectories split over two batch servers of 1 torch thread each, as the campaign
  runner splits them (:func:`split`);
- ``ceiling``: the model alone, ``Committee.predict_batch`` over the same structures grouped as the batch
  server groups them (no i-PI, no sockets): the speed no MD set-up can beat.

Model cost per MD step and structure (1 torch thread, interleaved repeats, so the parts' ratios come from the
same moments of the machine): t_c = the whole committee without the dipole model (``predict_batch(...,
dipoles=False)``), t_0 = energy member 0 alone (``committee.subset(energy_members=[0])``) without the dipole,
t_d = (committee with the dipole) - t_c; per step t_c/K_c + t_0 (1 - 1/K_c) + t_d/K_d when K_c > 1, and
t_c + t_d/K_d when K_c = 1. The ceilings are 1 / that cost (the one-by-one ceiling with K_c = 1, one
structure per call).

Sets: 8 trajectories of P2 (400 K, seeds 1..8) and a mixed set P1-P5, O1-O5 (one trajectory each).
Rates are steady-state MD steps per second summed over trajectories (the start-up of i-PI and torch,
a few seconds that a 40 ps run amortises, is left out; wall times with start-up are printed too), measured
from the dipole files i-PI writes (one frame every K_d steps: frames x K_d = steps). Simulated ps per hour =
steps/s x time step x 3600.

The estimates: the paper's production (20 clusters P1-P10, O1-O10 x 3 temperatures x 40 ps, with the time
step and the other settings in use) = the 60 trajectories scheduled as the runner does (``estimate_seconds``: the
queue by size, largest first, the default campaign's workers, each trajectory on the driver the runner's
``pick_driver`` gives; a driver's pass costs the model seconds per step of its trajectories, batches of 8 copies, 1 core, /
efficiency; the campaign ends with its busiest driver), efficiency = the best batched set-up's measured rate on
the mixed set (P2x8 when mixed was skipped) over the rate this same cost model gives for those trajectories and
that split (``model_rate``; ``fraction_of_cost_model`` per set-up), drivers = that set-up's. The efficiency is
taken against the cost model the estimate uses, not against the ceiling, whose padded groups of mixed sizes
cost more than batches of copies. The 25-run ensembles of the paper's Fig. 6 (P2 at
400 K) from the P2x8 rate (``fig6_25_runs_hours_estimate``), plus 25 runs of every cluster and temperature.

The slice (unless ``--skip-slice``): a real campaign (``al_manager.campaign.runner.run_campaign``) of P1-P5
and O1-O5, 400 K, 1 seed, NVT, no equilibration, ``--slice-ps`` of production, with the settings in use,
10 workers and ``drivers = "auto"`` (resolved by ``config_from_dict``: its count is the one in the estimate),
no harmonic spectra; the trust cap and the fragment check are off, so every trajectory runs its whole slice
(an untrained committee may disagree beyond the cap). Its wall seconds (around ``run_campaign``: start-up,
MD and the spectra) against the same estimate formula for exactly that slice (the efficiency of the
measured ``batched_<drivers>x1`` set-up of the reference set when there is one, else the best's):
``estimate_over_measured_slice`` = estimate / measured (below 1: the estimate is optimistic).

JSON keys (``--json``): ps_per_hour_batched_P2x8, ps_per_hour_one_by_one_P2x8, speedup_P2x8,
best_configuration_P2x8, fraction_of_ceiling_P2x8, speedup_idle_bound_P2x8; with the mixed set speedup_mixed,
ps_per_hour_batched_mixed, ps_per_hour_one_by_one_mixed, best_configuration_mixed, fraction_of_ceiling_mixed,
speedup_idle_bound_mixed; paper_production_hours_estimate (the settings in use), fig6_25_runs_hours_estimate,
all_clusters_25_runs_hours_estimate; paper_production_hours_cpu_floor (every core busy: the model's cost per
step plus outside_model_cpu_ms_per_step, the measured CPU of i-PI, sockets and the driver loop per step, over
the cores) and estimate_over_cpu_floor; timestep_fs, dipole_stride_fs, committee_every_fs (null: the committee mean every
step), dipole_every_steps, committee_every_steps; model_cost_ratio_vs_every_step (model seconds per step with
the settings / with the committee mean and the dipole every step, batches of 8, summed over the 20 clusters);
with the slice estimate_over_measured_slice, slice_measured_hours, slice_estimate_hours and details under
``slice``; and details under ``configurations``, ``ceiling``, ``model_seconds_per_structure_batch8`` (the
committee with the dipole, one call), ``model_seconds_per_step_batch8`` (the settings) and
``model_seconds_parts_batch8`` (t_c, t_0, t_d per cluster).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common, also when imported by a test
from _common import short_campaign  # noqa: E402
STRUCTURES = ROOT / ".." / "shared" / "data" / "structures"
BIN = Path(sys.executable).parent
PAPER_PS = 40.0
PAPER_TEMPERATURES = 3
PAPER_CLUSTERS = [f"P{i}" for i in range(1, 11)] + [f"O{i}" for i in range(1, 11)]
SLICE_CLUSTERS = [f"{k}{i}" for k in "PO" for i in range(1, 6)]
SLICE_TEMPERATURE = 400.0
SLICE_WORKERS = 10


def structure(name: str) -> Path:
    kind = {"P": "pyroxene", "O": "olivine"}[name[0]]
    path = (STRUCTURES / f"{kind}_N{int(name[1:]):02d}_GM.xyz").resolve()
    if not path.is_file():
        sys.exit(f"campaign_throughput.py: error: reference structure {path} not found (../shared/data)")
    return path


def env(threads: int = 1) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def prepare(workdir: Path, name: str, seed: int, steps: int, socket: str, dipole_stride: int,
            timestep_fs: float) -> Path:
    from ipi_inputs import render_input

    folder = workdir / f"{name}_s{seed}_{socket}"
    xml = render_input("production_nvt", folder, socket=f"unix:{socket}", structure=structure(name),
                       temperature=400.0, seed=seed, steps=steps, prefix="md", timestep_fs=timestep_fs,
                       checkpoint_steps=10**6, dipole_flush=1, dipole_stride=dipole_stride)
    return xml


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of the live processes ``pids`` (from /proc; 0 for those gone)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def frames_written(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"#EXTRAS")
    except FileNotFoundError:
        return 0


def watch_files(procs: list, files: list[Path], need: int, stride: int, where: Path,
                timeout: float = 1800.0) -> dict:
    """Poll the dipole ``files`` (i-PI writes a frame every ``stride`` steps) until each has ``need`` frames,
    recording (time, frames per file, CPU of ``procs``). The steady-state window runs from every trajectory
    past its first 10 MD steps after start-up to the first one finished. Steps = frames x stride."""
    t0 = time.monotonic()
    samples = []
    while True:
        counts = [frames_written(f) for f in files]
        samples.append((time.monotonic(), counts, cpu_seconds([p.pid for p in procs])))
        if all(c >= need for c in counts):
            break
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"trajectories did not finish within {timeout} s: {counts} of {need} frames")
        if any(p.poll() not in (None, 0) for p in procs):
            bad = [p.args for p in procs if p.poll() not in (None, 0)]
            raise RuntimeError(f"a process failed: {bad}; see {where}")
        time.sleep(0.1)
    times = np.array([s[0] for s in samples])
    counts = np.array([s[1] for s in samples])
    # steady window: every trajectory past its first 10 MD steps (the frame of step (n - 1) K), none finished
    warm = np.all((counts - 1) * stride >= 10, axis=1)
    done = np.any(counts >= need, axis=1)
    i0 = int(np.argmax(warm))
    i1 = int(np.argmax(done)) if done.any() else len(times) - 1
    if i1 <= i0:
        i0, i1 = 0, len(times) - 1
    steps = float(stride * (counts[i1].sum() - counts[i0].sum()))
    seconds = float(times[i1] - times[i0])
    cpu = float(samples[i1][2] - samples[i0][2])  # CPU of the processes in the window (all cores)
    return {"steps": steps, "seconds": seconds, "cpu_s": cpu, "wall_s": float(times[-1] - t0)}


def stop_all(procs: list) -> None:
    """SIGTERM every live process, give each 20 s, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class Run:
    """Some i-PI servers and their drivers; records (time, frames per trajectory) while they run. i-PI writes
    a dipole frame every ``stride`` steps (steps 0, K, 2K, ...): a finished run has steps // K + 1 frames."""

    def __init__(self, workdir: Path, items: list[tuple[str, int]], steps: int, tag: str, stride: int = 1,
                 timestep_fs: float = 0.5):
        self.workdir, self.steps, self.stride, self.procs = workdir, steps, stride, []
        self.sockets = [f"ncb{os.getpid()}{tag}{k}" for k in range(len(items))]
        self.xmls = [prepare(workdir, name, seed, steps, sock, stride, timestep_fs)
                     for (name, seed), sock in zip(items, self.sockets)]

    @property
    def frames_expected(self) -> int:
        return self.steps // self.stride + 1

    def start_ipi(self, xml: Path):
        log = open(xml.parent / "ipi.log", "w")
        self.procs.append(subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=xml.parent, stdout=log,
                                           stderr=subprocess.STDOUT, env=env(1)))
        return self.procs[-1]

    def start(self, cmd, log: Path, threads: int = 1):
        with open(log, "w") as f:
            self.procs.append(subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                               env=env(threads)))
        return self.procs[-1]

    def watch(self, xmls: list[Path], timeout: float = 1800.0) -> dict:
        """Poll the dipole files until every trajectory has all its frames (see :func:`watch_files`)."""
        return watch_files(self.procs, [x.parent / "md.dipole_0" for x in xmls], self.frames_expected,
                           self.stride, self.workdir, timeout)

    def stop(self):
        stop_all(self.procs)


def one_by_one(workdir: Path, items, steps: int, models: Path, md) -> dict:
    """Each trajectory alone (i-PI + nanosil-driver), one after another: the committee mean propagates
    (nanosil-driver has no committee-every), the dipole every ``md.dipole_stride`` steps."""
    total_steps = total_seconds = total_cpu = wall = 0.0
    for k, item in enumerate(items):
        run = Run(workdir, [item], steps, f"o{k}x", md.dipole_stride, md.timestep_fs)
        try:
            t_start = time.monotonic()
            xml = run.xmls[0]
            run.start_ipi(xml)
            run.start([BIN / "nanosil-driver", "--models", models, "--structure", structure(item[0]),
                       "--unix", run.sockets[0], "--log-every", "0", "--connect-timeout", "300",
                       "--dipole-every", md.dipole_stride],
                      xml.parent / "driver.log")
            r = run.watch([xml])
            for p in run.procs:
                p.wait(timeout=120)
            wall += time.monotonic() - t_start
        finally:
            run.stop()
        total_steps += r["steps"]
        total_seconds += r["seconds"]
        total_cpu += r["cpu_s"]
        print(f"  one-by-one {item[0]} seed {item[1]}: {r['steps'] / r['seconds']:.1f} steps/s", flush=True)
    return {"steps": total_steps, "seconds": total_seconds, "cpu_s": total_cpu, "wall_s": wall}


def batched(workdir: Path, items, steps: int, models: Path, drivers: int, threads: int, tag: str, md) -> dict:
    """Every trajectory at once: one i-PI each, ``drivers`` batch servers of ``threads`` torch threads, with
    the dipole stride and propagation of ``md``."""
    run = Run(workdir, items, steps, tag, md.dipole_stride, md.timestep_fs)
    try:
        t_start = time.monotonic()
        for xml in run.xmls:
            run.start_ipi(xml)
        # the drivers get the trajectories as the campaign runner would give them
        for d, block in enumerate(split([name for name, _ in items], drivers)):
            targets = []
            for k in block:
                targets += ["--target", f"{run.sockets[k]}={structure(items[k][0])}"]
            run.start([sys.executable, "-m", "driver.ipi.batch_server", "--models", models, "--threads", str(threads),
                       "--connect-timeout", "300", "--progress-every", "1000",
                       "--dipole-every", md.dipole_stride, "--committee-every", md.committee_every, *targets],
                      workdir / f"batch_{tag}{d}.log", threads)
        r = run.watch(run.xmls)
        for p in run.procs:
            p.wait(timeout=120)
        r["wall_s"] = time.monotonic() - t_start
    finally:
        run.stop()
    stats = [line for d in range(drivers) for line in (workdir / f"batch_{tag}{d}.log").read_text().splitlines()
             if "served" in line]
    return {"steps_per_s": r["steps"] / r["seconds"], "cpu_ms_per_step": 1e3 * r["cpu_s"] / r["steps"],
            "wall_s": r["wall_s"], "driver": stats}


def split(names: list[str], drivers: int) -> list[list[int]]:
    """How the batched runs split trajectories over drivers: as the campaign runner would start them all at
    once, in its queue order (:func:`~al_manager.campaign.config.by_size`), each on the driver that its
    :func:`~al_manager.campaign.runner.pick_driver` gives."""
    from al_manager.campaign.config import by_size, n_atoms
    from al_manager.campaign.runner import pick_driver

    sizes = [n_atoms(structure(n)) for n in names]
    out: list[list[int]] = [[] for _ in range(drivers)]
    for k in by_size(sizes):
        out[pick_driver([[sizes[i] for i in block] for block in out], sizes[k], len(names))].append(k)
    return out


# ---------------------------------------------------------------------- the model's cost
def step_seconds(parts: dict, dipole_every: int, committee_every: int) -> float:
    """Model seconds per MD step and structure from the measured parts (seconds per structure): ``committee``
    (no dipole), ``committee_dipole`` (with it), ``member0`` (energy member 0 alone, no dipole)."""
    t_dipole = max(0.0, parts["committee_dipole"] - parts["committee"])
    if committee_every > 1:
        return (parts["committee"] / committee_every + parts["member0"] * (1.0 - 1.0 / committee_every)
                + t_dipole / dipole_every)
    return parts["committee"] + t_dipole / dipole_every


def timed_parts(calls: dict, count: int, repeats: int) -> dict:
    """Seconds per structure of each of ``calls`` (name -> function over ``count`` structures): one warm-up,
    then ``repeats`` rounds calling each in turn, so that the parts' ratios see the same load."""
    for fn in calls.values():
        fn()
    total = dict.fromkeys(calls, 0.0)
    for _ in range(repeats):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            total[name] += time.perf_counter() - t
    return {name: s / (repeats * count) for name, s in total.items()}


def batch_parts(committee, member0, numbers, positions, groups, repeats: int) -> dict:
    """The parts of :func:`step_seconds` for predict_batch over ``groups`` (lists of indices) of the structures."""
    def over(model, dipoles):
        def run():
            for g in groups:
                model.predict_batch([numbers[i] for i in g], [positions[i] for i in g], dipoles=dipoles)
        return run

    count = sum(len(g) for g in groups)
    return timed_parts({"committee": over(committee, False), "committee_dipole": over(committee, True),
                        "member0": over(member0, False)}, count, repeats)


def ceiling(committee, names: list[str], md, repeats: int = 5) -> dict:
    """The model alone (no i-PI, no sockets), 1 torch thread: structures per second through predict_batch,
    grouped as the batch server groups them, with the dipole stride and propagation of ``md`` (the rates are
    1 / :func:`step_seconds`). ``drivers_2`` is the ceiling of the two-driver set-up: each half (as
    :func:`split` splits them) on its own core, i.e. the sum of both halves' rates (perfect scaling over 2 cores). ``one_at_a_time`` (the
    one-by-one baseline's): ``predict`` one structure per call, the committee mean every step."""
    from ase.io import read

    from driver.ipi.batch_server import partition_by_size

    rng = np.random.default_rng(0)
    atoms = [read(structure(n)) for n in names]
    numbers = [a.numbers for a in atoms]
    pos = [a.positions + rng.normal(scale=0.02, size=a.positions.shape) for a in atoms]
    member0 = committee.subset(energy_members=[0])
    kd, kc = md.dipole_stride, md.committee_every

    def grouped(index):
        return [[index[i] for i in g] for g in partition_by_size([len(atoms[i]) for i in index])]

    out, parts = {}, {}
    groups = grouped(list(range(len(atoms))))
    parts["drivers_1"] = batch_parts(committee, member0, numbers, pos, groups, repeats)
    out["drivers_1_structures_per_s"] = 1.0 / step_seconds(parts["drivers_1"], kd, kc)
    out["groups"] = [[names[i] for i in g] for g in groups]
    halves = [b for b in split(names, 2) if b]
    parts["drivers_2"] = [batch_parts(committee, member0, numbers, pos, grouped(b), repeats) for b in halves]
    out["drivers_2_structures_per_s"] = sum(1.0 / step_seconds(p, kd, kc) for p in parts["drivers_2"])
    parts["one_pass"] = batch_parts(committee, member0, numbers, pos, [list(range(len(atoms)))], repeats)
    out["one_pass_structures_per_s"] = 1.0 / step_seconds(parts["one_pass"], kd, kc)

    def single(dipoles):
        return lambda: [committee.predict(z, p, dipoles=dipoles) for z, p in zip(numbers, pos)]

    parts["one_at_a_time"] = timed_parts({"committee": single(False), "committee_dipole": single(True)},
                                         len(atoms), repeats)
    out["one_at_a_time_structures_per_s"] = 1.0 / step_seconds(parts["one_at_a_time"], kd, 1)
    out["seconds_per_structure_parts"] = parts
    return out


def average(a, b):
    """The mean of two measurements of the same shape (dicts, lists, numbers); anything else: ``a``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: average(v, b[k]) if k in b else v for k, v in a.items()}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [average(x, y) for x, y in zip(a, b)]
    if isinstance(a, float) and isinstance(b, float):
        return 0.5 * (a + b)
    return a


def per_size_cost(committee, batch: int = 8, repeats: int = 2) -> dict:
    """The parts of :func:`step_seconds` (seconds per structure of predict_batch) for every paper cluster,
    in batches of ``batch`` copies."""
    from ase.io import read

    member0 = committee.subset(energy_members=[0])
    out = {}
    for name in PAPER_CLUSTERS:
        a = read(structure(name))
        out[name] = batch_parts(committee, member0, [a.numbers] * batch, [a.positions] * batch,
                                [list(range(batch))], repeats)
    return out


def ps_per_hour(steps_per_s: float, timestep_fs: float) -> float:
    return steps_per_s * timestep_fs / 1000.0 * 3600.0


# ---------------------------------------------------------------------- the campaign slice
def slice_dict(models: Path, output: Path, ps: float, md) -> dict:
    """A campaign of P1-P5, O1-O5 at 400 K, 1 seed, ``ps`` of NVT production, the settings of ``md``."""
    return short_campaign(
        models, output, {name: structure(name) for name in SLICE_CLUSTERS}, SLICE_TEMPERATURE, 1, ps,
        {"equilibration_ps": 0.0, "timestep_fs": md.timestep_fs, "dipole_stride_fs": md.dipole_stride_fs,
         "committee_every_fs": "none" if md.committee_every_fs is None else md.committee_every_fs},
        {"workers": SLICE_WORKERS, "drivers": "auto", "threads": 1},
        trust={"trust_cap": "none", "fragment_distance": "none"})


def slice_config(models: Path, output: Path, ps: float, md, check_files: bool = True):
    from al_manager.campaign.config import config_from_dict

    return config_from_dict(slice_dict(models, output, ps, md), output.parent, check_files=check_files)


def run_slice(cfg, log_path: Path) -> dict:
    """Run the campaign ``cfg``; its wall seconds around ``run_campaign`` and what it did."""
    from al_manager.campaign.runner import run_campaign

    with open(log_path, "w") as log:
        t0 = time.time()
        summary = run_campaign(cfg, log=lambda message: print(message, file=log, flush=True))
        seconds = time.time() - t0
    return {"measured_s": seconds, "counts": summary.get("counts", {}), "throughput": summary.get("throughput", {})}


def drivers_of(configuration: str) -> int:
    """The driver count of a batched set-up's name, ``batched_<drivers>x<threads>``."""
    return int(configuration.split("_")[1].split("x")[0])


def model_rate(names: list[str], drivers: int, per_step: dict) -> float:
    """MD steps per second, summed over trajectories, that the cost model of :func:`estimate_seconds` gives
    (efficiency 1) while every trajectory of ``names`` runs, split over ``drivers`` as the runner splits
    them: each driver's trajectories advance one step per pass, a pass costs their model seconds per step."""
    return sum(len(block) / sum(per_step[names[k]] for k in block) for block in split(names, drivers) if block)


def estimate_seconds(names, steps: int, per_step: dict, efficiency: float, drivers: int, workers: int,
                     sizes: dict) -> float:
    """The campaign's wall seconds as the runner schedules it (``al_manager.campaign.runner``): ``names`` is
    the queue (one trajectory each, in its order), ``workers`` run at once, each started on the driver that
    the runner's :func:`~al_manager.campaign.runner.pick_driver` gives (``sizes``: atom counts).
    A driver's pass advances each of its trajectories one step and costs the sum of their model seconds per
    step (``per_step``) / ``efficiency``. Drivers run side by side, so the campaign ends with its busiest
    one: for equal blocks this is steps x model seconds / (efficiency x drivers); when one driver holds more
    work, its block sets the time and the other's core idles at the end."""
    from al_manager.campaign.runner import pick_driver

    queue = list(names)
    active: list[list[list]] = [[] for _ in range(drivers)]      # per driver: [name, steps left]
    clock = 0.0

    def start():
        while queue and sum(map(len, active)) < workers:
            d = pick_driver([[sizes[a[0]] for a in block] for block in active], sizes[queue[0]], workers)
            active[d].append([queue.pop(0), float(steps)])

    start()
    while any(active):
        pass_s = [sum(per_step[a[0]] for a in block) / efficiency for block in active]
        # the next trajectory to finish, on whichever driver
        dt = min(min(a[1] for a in block) * t for block, t in zip(active, pass_s) if block)
        clock += dt
        for d, block in enumerate(active):
            if block:
                for a in block:
                    a[1] -= dt / pass_s[d]
                active[d] = [a for a in block if a[1] > 1e-6 * steps]
        start()
    return clock


def parse_fs(text: str):
    """A time in fs, or None for "none"/"off"."""
    if text.strip().lower() in ("none", "off"):
        return None
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of fs or 'none', got {text!r}")
    return value


def main(argv=None) -> int:
    from al_manager.campaign.config import MDSettings, RunSettings, by_size, n_atoms

    defaults = MDSettings()
    parser = argparse.ArgumentParser(prog="campaign_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="MD steps per trajectory (default 300)")
    parser.add_argument("--models", help="committee folder (default: an untrained committee of default sizes)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--skip-mixed", action="store_true", help="only the P2x8 set")
    parser.add_argument("--skip-slice", action="store_true", help="no campaign slice (no estimate_over_measured_slice)")
    parser.add_argument("--slice-ps", type=float, default=2.0,
                        help="production ps per trajectory of the campaign slice (default 2.0)")
    parser.add_argument("--timestep-fs", type=float, default=defaults.timestep_fs, metavar="X",
                        help=f"MD time step (default: the campaign default, {defaults.timestep_fs:g})")
    parser.add_argument("--dipole-stride-fs", type=float, default=defaults.dipole_stride_fs, metavar="X",
                        help=f"dipole computed and written every X fs (default: the campaign default, "
                             f"{defaults.dipole_stride_fs:g})")
    parser.add_argument("--committee-every-fs", type=parse_fs, default=defaults.committee_every_fs, metavar="X",
                        help="propagate on energy member 0 and run the whole committee every X fs; 'none': the "
                             f"committee mean every step (default: the campaign default, "
                             f"{'none' if defaults.committee_every_fs is None else f'{defaults.committee_every_fs:g}'})")
    args = parser.parse_args(argv)
    if args.steps < 50:
        parser.error("--steps must be at least 50")
    try:
        md = MDSettings(timestep_fs=args.timestep_fs, dipole_stride_fs=args.dipole_stride_fs,
                        committee_every_fs=args.committee_every_fs)
    except ValueError as exc:
        parser.error(str(exc))
    kd, kc = md.dipole_stride, md.committee_every
    if args.steps < 10 * kd:
        parser.error(f"--steps must be at least 10 dipole strides ({10 * kd} steps)")
    if not args.skip_slice:
        try:  # the slice's campaign must validate before an hour of measurements
            slice_config(ROOT, ROOT / "slice", args.slice_ps, md, check_files=False)
        except ValueError as exc:  # ConfigError
            parser.error(f"--slice-ps {args.slice_ps:g}: {exc}")

    import torch

    from driver.models.committee import ModelConfig, build_committee, load_committee, save_committee

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="nanosil-bench-"))
    propagation = ("the committee mean every step" if kc == 1
                   else f"member 0, the whole committee every {md.committee_every_fs:g} fs ({kc} steps)")
    try:
        if args.models:
            models = Path(args.models).resolve()
            committee = load_committee(models)
        else:
            models = workdir / "models"
            committee = build_committee(ModelConfig(), n_members=3, n_dipole=1, seed=0)
            save_committee(committee, models)
        print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; model {committee.version} "
              f"({committee.n_energy_members}+{committee.n_dipole_members} members, hidden "
              f"{committee.config.hidden}); {args.steps} steps per trajectory; work in {workdir}", flush=True)
        print(f"settings: dipole every {md.dipole_stride_fs:g} fs ({kd} steps); propagation: {propagation} "
              f"(one-by-one: the committee mean every step, nanosil-driver has no committee-every)", flush=True)

        sets = {"P2x8": [("P2", s) for s in range(1, 9)]}
        if not args.skip_mixed:
            sets["mixed"] = [(f"{k}{i}", 1) for k in "PO" for i in range(1, 6)]
        results, ceilings = {}, {}
        for label, items in sets.items():
            # The machine may be shared: the baseline is measured in two halves around the batched runs,
            # and the ceiling before and after, so a change of background load hits both sides alike.
            ceilings[label] = ceiling(committee, [n for n, _ in items], md)
            res, half = {}, len(items) // 2
            print(f"[{label}] one-by-one, first half (i-PI + nanosil-driver per trajectory, one after another)",
                  flush=True)
            first = one_by_one(workdir, items[:half], args.steps, models, md)
            print(f"[{label}] batched, 1 driver x 1 thread", flush=True)
            res["batched_1x1"] = batched(workdir, items, args.steps, models, 1, 1, f"{label}a", md)
            if (os.cpu_count() or 1) >= 2:
                print(f"[{label}] batched, 2 drivers x 1 thread", flush=True)
                res["batched_2x1"] = batched(workdir, items, args.steps, models, 2, 1, f"{label}b", md)
            print(f"[{label}] one-by-one, second half", flush=True)
            second = one_by_one(workdir, items[half:], args.steps, models, md)
            res["one_by_one"] = {
                "steps_per_s": (first["steps"] + second["steps"]) / (first["seconds"] + second["seconds"]),
                "cpu_ms_per_step": 1e3 * (first["cpu_s"] + second["cpu_s"]) / (first["steps"] + second["steps"]),
                "wall_s": first["wall_s"] + second["wall_s"]}
            ceilings[label] = average(ceilings[label], ceiling(committee, [n for n, _ in items], md))
            c = ceilings[label]
            print(f"[{label}] ceiling (model alone): {c['drivers_1_structures_per_s']:.1f} structures/s on 1 core "
                  f"grouped by size ({c['one_pass_structures_per_s']:.1f} in one padded pass, "
                  f"{c['one_at_a_time_structures_per_s']:.1f} one at a time), "
                  f"{c['drivers_2_structures_per_s']:.1f} as two halves on 2 cores", flush=True)
            results[label] = res

        parts = per_size_cost(committee)
        per_step = {n: step_seconds(p, kd, kc) for n, p in parts.items()}
        sizes = {n: n_atoms(structure(n)) for n in parts}

        cores = os.cpu_count() or 1
        rows, figures = [], {}
        for label, res in results.items():
            base = res["one_by_one"]["steps_per_s"]
            c = ceilings[label]
            ceil = {"batched_1x1": c["drivers_1_structures_per_s"], "batched_2x1": c["drivers_2_structures_per_s"],
                    "one_by_one": c["one_at_a_time_structures_per_s"]}
            best = max((k for k in res if k.startswith("batched")), key=lambda k: res[k]["steps_per_s"])
            for name, r in res.items():
                r["fraction_of_ceiling"] = r["steps_per_s"] / ceil[name]
                if name.startswith("batched"):
                    r["fraction_of_cost_model"] = r["steps_per_s"] / model_rate([n for n, _ in sets[label]],
                                                                                drivers_of(name), per_step)
                rows.append((label, name, r["steps_per_s"], ps_per_hour(r["steps_per_s"], md.timestep_fs), r["steps_per_s"] / base,
                             r["fraction_of_ceiling"], r["cpu_ms_per_step"], r["wall_s"]))
            # CPU-bound view (independent of other users' load): one-by-one is serial (i-PI and its driver take
            # turns), so on an idle machine it runs at 1000/cpu steps/s; the batched set-up can use every core.
            cpu_one, cpu_best = res["one_by_one"]["cpu_ms_per_step"], res[best]["cpu_ms_per_step"]
            figures[label] = {"best": best, "speedup": res[best]["steps_per_s"] / base,
                              "ps_per_hour_best": ps_per_hour(res[best]["steps_per_s"], md.timestep_fs),
                              "ps_per_hour_one_by_one": ps_per_hour(base, md.timestep_fs),
                              "efficiency": res[best]["fraction_of_ceiling"],
                              "efficiency_vs_cost_model": res[best]["fraction_of_cost_model"],
                              "speedup_idle_bound": cores * cpu_one / cpu_best,
                              # CPU per step outside the model (i-PI's Python, sockets, the driver's loop):
                              # the best set-up's measured CPU per step minus the model's own per-step cost
                              "outside_model_cpu_s_per_step": max(0.0, cpu_best / 1e3 - float(np.mean(
                                  [per_step[n] for n, _ in sets[label]])))}
        # the efficiency and drivers of the estimates: the best set-up of the mixed set (P2x8 when skipped)
        ref_label = "mixed" if "mixed" in figures else "P2x8"
        ref = figures[ref_label]
        eff, n_drivers = ref["efficiency_vs_cost_model"], drivers_of(ref["best"])

        slice_out = None
        if not args.skip_slice:
            cfg = slice_config(models, workdir / "slice", args.slice_ps, md)
            slice_drivers = int(cfg.run.drivers)
            measured = f"batched_{slice_drivers}x1"
            slice_eff = results[ref_label][measured]["fraction_of_cost_model"] if measured in results[ref_label] else eff
            steps = cfg.md.equilibration_steps + cfg.md.production_steps
            names = [t.cluster.name for t in cfg.trajectories()]
            print(f"[slice] campaign of {', '.join(sorted(set(names)))} at {SLICE_TEMPERATURE:g} K, 1 seed, "
                  f"{args.slice_ps:g} ps ({steps} steps) each, {cfg.run.workers} workers, {slice_drivers} driver(s) "
                  f"-> {cfg.output}", flush=True)
            ran = run_slice(cfg, workdir / "slice.log")
            est = estimate_seconds(names, steps, per_step, slice_eff, slice_drivers, cfg.run.workers, sizes)
            md_steps = ran["throughput"].get("md_steps")
            slice_out = {"clusters": names, "temperature_K": SLICE_TEMPERATURE, "production_ps": args.slice_ps,
                         "steps_per_trajectory": steps, "workers": cfg.run.workers, "drivers": slice_drivers,
                         "efficiency": slice_eff,
                         "efficiency_from": f"{ref_label} {measured if measured in results[ref_label] else ref['best']}",
                         "measured_s": ran["measured_s"], "estimate_s": est, "counts": ran["counts"],
                         "runner_throughput": ran["throughput"]}
            if ran["counts"].get("done", 0) != len(names) or (md_steps is not None and md_steps < steps * len(names)):
                print(f"[slice] warning: not every trajectory ran its slice: {ran['counts']}, {md_steps} MD steps "
                      f"of {steps * len(names)}; see {workdir / 'slice.log'}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(f"settings: dipole every {md.dipole_stride_fs:g} fs ({kd} steps); batched propagation: {propagation}; "
          f"one-by-one: the committee mean every step")
    print(f"{'set':6s} {'configuration':13s} {'steps/s':>9s} {'ps/hour':>9s} {'vs 1-by-1':>9s} {'of ceiling':>10s} "
          f"{'CPU ms/step':>11s} {'wall s':>8s}")
    for label, name, sps, psh, speed, frac, cpu, wall in rows:
        print(f"{label:6s} {name:13s} {sps:9.2f} {psh:9.3f} {speed:8.2f}x {frac:9.0%} {cpu:11.2f} {wall:8.1f}")
    for label, c in ceilings.items():
        for key, what in (("drivers_1", "1 core"), ("drivers_2", "2 halves, 2 cores")):
            v = c[f"{key}_structures_per_s"]
            print(f"{label:6s} {'ceiling ' + key[-1]:13s} {v:9.2f} {ps_per_hour(v, md.timestep_fs):9.3f}  (model alone, {what})")
    print("(ceiling: the model's own batched speed for the same structures, driver split and settings; 'of "
          "ceiling' compares each configuration with its own: one-by-one with one-at-a-time predictions of the "
          "committee mean)")
    for label, f in figures.items():
        print(f"{label}: best {f['best']}, {f['speedup']:.2f}x one-by-one as measured (load average "
              f"{os.getloadavg()[0]:.1f} from other processes); CPU-bound limit on {cores} idle cores "
              f"{f['speedup_idle_bound']:.2f}x")

    p2 = figures["P2x8"]
    out = {
        "ps_per_hour_batched_P2x8": round(p2["ps_per_hour_best"], 4),
        "ps_per_hour_one_by_one_P2x8": round(p2["ps_per_hour_one_by_one"], 4),
        "speedup_P2x8": round(p2["speedup"], 3),
        "best_configuration_P2x8": p2["best"],
        "fraction_of_ceiling_P2x8": round(p2["efficiency"], 3),
        "speedup_idle_bound_P2x8": round(p2["speedup_idle_bound"], 3),
        "timestep_fs": md.timestep_fs,
        "dipole_stride_fs": md.dipole_stride_fs,
        "committee_every_fs": md.committee_every_fs,
        "dipole_every_steps": kd,
        "committee_every_steps": kc,
    }
    # Paper production: 20 clusters x 3 T x 40 ps, scheduled by estimate_seconds with the model seconds per MD
    # step (the settings, batches of 8, 1 core) over the efficiency against that cost model (model_rate) of
    # the best set-up on the mixed set (P2x8 when mixed was skipped).
    steps_per_run = int(round(PAPER_PS * 1000.0 / md.timestep_fs))
    # the default campaign's queue (by size) and workers; its drivers are the best set-up's
    listed = [n for n in PAPER_CLUSTERS for _ in range(PAPER_TEMPERATURES)]
    paper_queue = [listed[k] for k in by_size([sizes[n] for n in listed])]
    hours = estimate_seconds(paper_queue, steps_per_run, per_step, eff, n_drivers, RunSettings().workers,
                             sizes) / 3600.0
    out["paper_production_hours_estimate"] = round(hours, 2)
    out["fig6_25_runs_hours_estimate"] = round(25 * PAPER_PS / p2["ps_per_hour_best"], 2)
    out["all_clusters_25_runs_hours_estimate"] = round(25 * hours, 1)
    every_step = sum(step_seconds(p, 1, 1) for p in parts.values())
    out["model_cost_ratio_vs_every_step"] = round(sum(per_step.values()) / every_step, 4)
    # The physical floor on this machine: every core busy, no idle time, no start-up: per MD step the model's
    # cost (batches of 8) plus the CPU that i-PI, the sockets and the driver loop take outside the model
    # (measured on the reference set), summed over the production and shared by the cores
    outside = ref["outside_model_cpu_s_per_step"]
    floor_s = PAPER_TEMPERATURES * steps_per_run * sum(per_step[n] + outside for n in PAPER_CLUSTERS) / cores
    out["paper_production_hours_cpu_floor"] = round(floor_s / 3600.0, 2)
    out["outside_model_cpu_ms_per_step"] = round(1e3 * outside, 3)
    out["estimate_over_cpu_floor"] = round(hours * 3600.0 / floor_s, 3)
    if "mixed" in figures:
        m = figures["mixed"]
        out.update(speedup_mixed=round(m["speedup"], 3), ps_per_hour_batched_mixed=round(m["ps_per_hour_best"], 4),
                   ps_per_hour_one_by_one_mixed=round(m["ps_per_hour_one_by_one"], 4),
                   best_configuration_mixed=m["best"], fraction_of_ceiling_mixed=round(m["efficiency"], 3),
                   speedup_idle_bound_mixed=round(m["speedup_idle_bound"], 3))
    if slice_out is not None:
        out["estimate_over_measured_slice"] = round(slice_out["estimate_s"] / slice_out["measured_s"], 4)
        out["slice_measured_hours"] = round(slice_out["measured_s"] / 3600.0, 5)
        out["slice_estimate_hours"] = round(slice_out["estimate_s"] / 3600.0, 5)
        out["slice"] = slice_out
    out["configurations"] = {label: {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()}
                             for label, res in results.items()}
    out["ceiling"] = ceilings
    out["model_seconds_per_structure_batch8"] = {k: round(step_seconds(p, 1, 1), 5) for k, p in parts.items()}
    out["model_seconds_per_step_batch8"] = {k: round(v, 6) for k, v in per_step.items()}
    out["model_seconds_parts_batch8"] = {k: {kk: round(vv, 6) for kk, vv in p.items()} for k, p in parts.items()}
    out["load_average"] = os.getloadavg()[0]
    out["cores"] = cores
    print()
    print(f"paper production (20 clusters x 3 T x 40 ps, dipole every {md.dipole_stride_fs:g} fs, {propagation}) on "
          f"this machine: {out['paper_production_hours_estimate']:.1f} h ({n_drivers} driver(s) at {eff:.0%} of the "
          f"cost model's rate (batches of copies); model cost {out['model_cost_ratio_vs_every_step']:.2f}x that of the committee "
          f"mean and the dipole every step); Fig. 6 (25 runs of P2 at 400 K): {out['fig6_25_runs_hours_estimate']:.1f} "
          f"h; 25 runs of every cluster and temperature: {out['all_clusters_25_runs_hours_estimate']:.0f} h")
    print(f"its CPU floor on {cores} cores (every core busy, model + {out['outside_model_cpu_ms_per_step']:.2f} ms of "
          f"i-PI/socket/driver CPU per MD step, no idle time): {out['paper_production_hours_cpu_floor']:.2f} h; "
          f"the estimate is {out['estimate_over_cpu_floor']:.2f}x the floor")
    if slice_out is not None:
        s = slice_out
        print(f"campaign slice ({len(s['clusters'])} clusters x {s['production_ps']:g} ps, {s['drivers']} driver(s), "
              f"efficiency {s['efficiency']:.0%} from {s['efficiency_from']}): measured {s['measured_s']:.1f} s, "
              f"estimate {s['estimate_s']:.1f} s, estimate / measured {out['estimate_over_measured_slice']:.3f} "
              f"(the measured wall includes start-up and spectra; {s['counts']})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
