#!/usr/bin/env python3
"""Throughput of production MD: batched driver serving many i-PI servers vs one trajectory after another.

    .venv/bin/python bench/campaign_throughput.py [--steps 300] [--models DIR] [--json FILE]

Configurations, all on this machine's cores, all with the default model sizes (committee of 3 + 1 dipole
member; untrained weights unless --models is given: the cost does not depend on the weights):

- ``one-by-one``: each trajectory alone, one i-PI + one ``nanosil-driver`` (1 rank, 1 torch thread), one
  after another (the baseline);
- ``batched 1x1``: every trajectory's i-PI at once, one ``driver.ipi.batch_server`` (1 torch thread) serving all;
- ``batched 2x1``: the same trajectories split over two batch servers of 1 torch thread each;
- ``ceiling``: the model alone, ``Committee.predict_batch`` over the same structures grouped as the batch
  server groups them (no i-PI, no sockets): the speed no MD set-up can beat.

Sets: 8 trajectories of P2 (400 K, seeds 1..8) and a mixed set P1-P5, O1-O5 (one trajectory each).
Rates are steady-state MD steps per second summed over trajectories (the start-up of i-PI and torch,
a few seconds that a 40 ps run amortises, is left out; wall times with start-up are printed too), measured
from the dipole files i-PI writes every step. Simulated ps per hour = steps/s x 0.5 fs x 3600.

The estimates: the paper's production (20 clusters P1-P10, O1-O10 x 3 temperatures x 40 ps) from the
model's per-size cost (ceiling, measured here for every size) divided by the efficiency the batched
set-up reached on the mixed set; and the 25-run ensembles of the paper's Fig. 6 (P2 at 400 K) from the
P2x8 rate (``fig6_25_runs_hours_estimate``), plus 25 runs of every cluster and temperature.

JSON keys (``--json``): ps_per_hour_batched_P2x8, ps_per_hour_one_by_one_P2x8, speedup_P2x8, speedup_mixed,
paper_production_hours_estimate, fig6_25_runs_hours_estimate, all_clusters_25_runs_hours_estimate, and
details under ``configurations`` and ``ceiling``.
"""
from __future__ import annotations

import argparse
import json
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
STRUCTURES = ROOT / ".." / "shared" / "data" / "structures"
BIN = Path(sys.executable).parent
TIMESTEP_FS = 0.5
PAPER_PS = 40.0
PAPER_TEMPERATURES = 3


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


def prepare(workdir: Path, name: str, seed: int, steps: int, socket: str) -> Path:
    from ipi_inputs import render_input

    folder = workdir / f"{name}_s{seed}_{socket}"
    xml = render_input("production_nvt", folder, socket=f"unix:{socket}", structure=structure(name),
                       temperature=400.0, seed=seed, steps=steps, prefix="md", timestep_fs=TIMESTEP_FS,
                       checkpoint_steps=10**6, dipole_flush=1)
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


class Run:
    """Some i-PI servers and their drivers; records (time, frames per trajectory) while they run."""

    def __init__(self, workdir: Path, items: list[tuple[str, int]], steps: int, tag: str):
        self.workdir, self.steps, self.procs = workdir, steps, []
        self.sockets = [f"ncb{os.getpid()}{tag}{k}" for k in range(len(items))]
        self.xmls = [prepare(workdir, name, seed, steps, sock) for (name, seed), sock in zip(items, self.sockets)]

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
        """Poll the dipole files until every trajectory has all its frames; steady-state rate from the
        window where every one of them is running (first frame after start-up to first finished)."""
        files = [x.parent / "md.dipole_0" for x in xmls]
        t0 = time.monotonic()
        samples = []
        while True:
            counts = [frames_written(f) for f in files]
            samples.append((time.monotonic(), counts, cpu_seconds([p.pid for p in self.procs])))
            if all(c >= self.steps + 1 for c in counts):
                break
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"trajectories did not finish within {timeout} s: {counts}")
            if any(p.poll() not in (None, 0) for p in self.procs):
                bad = [p.args for p in self.procs if p.poll() not in (None, 0)]
                raise RuntimeError(f"a process failed: {bad}; see {self.workdir}")
            time.sleep(0.1)
        times = np.array([s[0] for s in samples])
        counts = np.array([s[1] for s in samples])
        # steady window: every trajectory past its first 10 frames, none finished yet
        warm = np.all(counts >= 10, axis=1)
        done = np.any(counts >= self.steps + 1, axis=1)
        i0 = int(np.argmax(warm))
        i1 = int(np.argmax(done)) if done.any() else len(times) - 1
        if i1 <= i0:
            i0, i1 = 0, len(times) - 1
        steps = float(counts[i1].sum() - counts[i0].sum())
        seconds = float(times[i1] - times[i0])
        cpu = float(samples[i1][2] - samples[i0][2])  # CPU of our processes in the window (all cores)
        return {"steps": steps, "seconds": seconds, "cpu_s": cpu, "wall_s": float(times[-1] - t0)}

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def one_by_one(workdir: Path, items, steps: int, models: Path) -> dict:
    """Each trajectory alone (i-PI + nanosil-driver), one after another."""
    total_steps = total_seconds = total_cpu = wall = 0.0
    for k, item in enumerate(items):
        run = Run(workdir, [item], steps, f"o{k}x")
        try:
            t_start = time.monotonic()
            xml = run.xmls[0]
            run.start_ipi(xml)
            run.start([BIN / "nanosil-driver", "--models", models, "--structure", structure(item[0]),
                       "--unix", run.sockets[0], "--log-every", "0", "--connect-timeout", "300"],
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


def batched(workdir: Path, items, steps: int, models: Path, drivers: int, threads: int, tag: str) -> dict:
    """Every trajectory at once: one i-PI each, ``drivers`` batch servers of ``threads`` torch threads."""
    run = Run(workdir, items, steps, tag)
    try:
        t_start = time.monotonic()
        for xml in run.xmls:
            run.start_ipi(xml)
        # similar sizes share a server: sort by size, deal contiguous blocks
        for d, block in enumerate(blocks([name for name, _ in items], drivers)):
            targets = []
            for k in block:
                targets += ["--target", f"{run.sockets[k]}={structure(items[k][0])}"]
            run.start([sys.executable, "-m", "driver.ipi.batch_server", "--models", models, "--threads", str(threads),
                       "--connect-timeout", "300", "--progress-every", "1000", *targets],
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


def blocks(names: list[str], drivers: int) -> list[list[int]]:
    """How the batched runs split trajectories over drivers: sorted by size, contiguous blocks."""
    from ase.io import read

    order = sorted(range(len(names)), key=lambda k: (len(read(structure(names[k]))), k))
    return [order[d * len(order) // drivers:(d + 1) * len(order) // drivers] for d in range(drivers)]


def ceiling(committee, names: list[str], repeats: int = 5) -> dict:
    """The model alone (no i-PI, no sockets), 1 torch thread: structures per second through predict_batch,
    grouped as the batch server groups them. ``drivers_2`` is the ceiling of the two-driver set-up: each
    half on its own core, i.e. the sum of both halves' rates (perfect scaling over 2 cores)."""
    from ase.io import read

    from driver.ipi.batch_server import partition_by_size

    rng = np.random.default_rng(0)
    atoms = [read(structure(n)) for n in names]
    pos = [a.positions + rng.normal(scale=0.02, size=a.positions.shape) for a in atoms]

    def timed(fn, count):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        return count * repeats / (time.perf_counter() - t)

    def grouped(index):
        groups = [[index[i] for i in g] for g in partition_by_size([len(atoms[i]) for i in index])]

        def run():
            for g in groups:
                committee.predict_batch([atoms[i].numbers for i in g], [pos[i] for i in g])
        return run, groups

    out = {}
    run, groups = grouped(list(range(len(atoms))))
    out["drivers_1_structures_per_s"] = timed(run, len(atoms))
    out["groups"] = [[names[i] for i in g] for g in groups]
    out["drivers_2_structures_per_s"] = sum(timed(grouped(b)[0], len(b)) for b in blocks(names, 2) if b)
    out["one_pass_structures_per_s"] = timed(lambda: committee.predict_batch([a.numbers for a in atoms], pos),
                                             len(atoms))
    out["one_at_a_time_structures_per_s"] = timed(
        lambda: [committee.predict(a.numbers, p) for a, p in zip(atoms, pos)], len(atoms))
    return out


def per_size_cost(committee, batch: int = 8, repeats: int = 2) -> dict:
    """Seconds per structure of predict_batch for every paper cluster, in batches of ``batch`` copies."""
    from ase.io import read

    out = {}
    for name in [f"P{i}" for i in range(1, 11)] + [f"O{i}" for i in range(1, 11)]:
        a = read(structure(name))
        nums, pos = [a.numbers] * batch, [a.positions] * batch
        committee.predict_batch(nums, pos)
        t = time.perf_counter()
        for _ in range(repeats):
            committee.predict_batch(nums, pos)
        out[name] = (time.perf_counter() - t) / (repeats * batch)
    return out


def ps_per_hour(steps_per_s: float) -> float:
    return steps_per_s * TIMESTEP_FS / 1000.0 * 3600.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="campaign_throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="MD steps per trajectory (default 300)")
    parser.add_argument("--models", help="committee folder (default: an untrained committee of default sizes)")
    parser.add_argument("--json", metavar="FILE", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--skip-mixed", action="store_true", help="only the P2x8 set")
    args = parser.parse_args(argv)
    if args.steps < 50:
        parser.error("--steps must be at least 50")

    import torch

    from driver.models.committee import ModelConfig, build_committee, load_committee, save_committee

    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="nanosil-bench-"))
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

        sets = {"P2x8": [("P2", s) for s in range(1, 9)]}
        if not args.skip_mixed:
            sets["mixed"] = [(f"{k}{i}", 1) for k in "PO" for i in range(1, 6)]
        results, ceilings = {}, {}
        for label, items in sets.items():
            # The machine may be shared: the baseline is measured in two halves around the batched runs,
            # and the ceiling before and after, so a change of background load hits both sides alike.
            ceilings[label] = ceiling(committee, [n for n, _ in items])
            res, half = {}, len(items) // 2
            print(f"[{label}] one-by-one, first half (i-PI + nanosil-driver per trajectory, one after another)",
                  flush=True)
            first = one_by_one(workdir, items[:half], args.steps, models)
            print(f"[{label}] batched, 1 driver x 1 thread", flush=True)
            res["batched_1x1"] = batched(workdir, items, args.steps, models, 1, 1, f"{label}a")
            if (os.cpu_count() or 1) >= 2:
                print(f"[{label}] batched, 2 drivers x 1 thread", flush=True)
                res["batched_2x1"] = batched(workdir, items, args.steps, models, 2, 1, f"{label}b")
            print(f"[{label}] one-by-one, second half", flush=True)
            second = one_by_one(workdir, items[half:], args.steps, models)
            res["one_by_one"] = {
                "steps_per_s": (first["steps"] + second["steps"]) / (first["seconds"] + second["seconds"]),
                "cpu_ms_per_step": 1e3 * (first["cpu_s"] + second["cpu_s"]) / (first["steps"] + second["steps"]),
                "wall_s": first["wall_s"] + second["wall_s"]}
            after = ceiling(committee, [n for n, _ in items])
            for key, value in after.items():
                if key.endswith("_per_s"):
                    ceilings[label][key] = 0.5 * (ceilings[label][key] + value)
            c = ceilings[label]
            print(f"[{label}] ceiling (model alone): {c['drivers_1_structures_per_s']:.1f} structures/s on 1 core "
                  f"grouped by size ({c['one_pass_structures_per_s']:.1f} in one padded pass, "
                  f"{c['one_at_a_time_structures_per_s']:.1f} one at a time), "
                  f"{c['drivers_2_structures_per_s']:.1f} as two halves on 2 cores", flush=True)
            results[label] = res

        per_size = per_size_cost(committee)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

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
            rows.append((label, name, r["steps_per_s"], ps_per_hour(r["steps_per_s"]), r["steps_per_s"] / base,
                         r["fraction_of_ceiling"], r["cpu_ms_per_step"], r["wall_s"]))
        # CPU-bound view (independent of other users' load): one-by-one is serial (i-PI and its driver take
        # turns), so on an idle machine it runs at 1000/cpu steps/s; the batched set-up can use every core.
        cpu_one, cpu_best = res["one_by_one"]["cpu_ms_per_step"], res[best]["cpu_ms_per_step"]
        figures[label] = {"best": best, "speedup": res[best]["steps_per_s"] / base,
                          "ps_per_hour_best": ps_per_hour(res[best]["steps_per_s"]),
                          "ps_per_hour_one_by_one": ps_per_hour(base),
                          "efficiency": res[best]["fraction_of_ceiling"],
                          "speedup_idle_bound": cores * cpu_one / cpu_best}
    print()
    print(f"{'set':6s} {'configuration':13s} {'steps/s':>9s} {'ps/hour':>9s} {'vs 1-by-1':>9s} {'of ceiling':>10s} "
          f"{'CPU ms/step':>11s} {'wall s':>8s}")
    for label, name, sps, psh, speed, frac, cpu, wall in rows:
        print(f"{label:6s} {name:13s} {sps:9.2f} {psh:9.3f} {speed:8.2f}x {frac:9.0%} {cpu:11.2f} {wall:8.1f}")
    for label, c in ceilings.items():
        for key, what in (("drivers_1", "1 core"), ("drivers_2", "2 halves, 2 cores")):
            v = c[f"{key}_structures_per_s"]
            print(f"{label:6s} {'ceiling ' + key[-1]:13s} {v:9.2f} {ps_per_hour(v):9.3f}  (model alone, {what})")
    print("(ceiling: the model's own batched speed for the same structures and driver split; 'of ceiling' "
          "compares each configuration with its own: one-by-one with one-at-a-time predictions)")
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
    }
    # Paper production: 20 clusters x 3 T x 40 ps. Steps/s for size N = (drivers of the best set-up) /
    # (model seconds per structure in batches of 8, 1 core) x (the fraction of its ceiling the best set-up
    # reached on the mixed set; P2x8 when mixed was skipped).
    ref = figures.get("mixed", p2)
    eff, n_drivers = ref["efficiency"], int(ref["best"].split("_")[1].split("x")[0])
    steps_per_run = PAPER_PS * 1000.0 / TIMESTEP_FS
    hours = sum(PAPER_TEMPERATURES * steps_per_run * t / (eff * n_drivers) for t in per_size.values()) / 3600.0
    out["paper_production_hours_estimate"] = round(hours, 2)
    out["fig6_25_runs_hours_estimate"] = round(25 * PAPER_PS / p2["ps_per_hour_best"], 2)
    out["all_clusters_25_runs_hours_estimate"] = round(25 * hours, 1)
    if "mixed" in figures:
        m = figures["mixed"]
        out.update(speedup_mixed=round(m["speedup"], 3), ps_per_hour_batched_mixed=round(m["ps_per_hour_best"], 4),
                   ps_per_hour_one_by_one_mixed=round(m["ps_per_hour_one_by_one"], 4),
                   best_configuration_mixed=m["best"], fraction_of_ceiling_mixed=round(m["efficiency"], 3),
                   speedup_idle_bound_mixed=round(m["speedup_idle_bound"], 3))
    out["configurations"] = {label: {k: {kk: vv for kk, vv in v.items()} for k, v in res.items()}
                             for label, res in results.items()}
    out["ceiling"] = ceilings
    out["model_seconds_per_structure_batch8"] = {k: round(v, 5) for k, v in per_size.items()}
    out["load_average"] = os.getloadavg()[0]
    out["cores"] = cores
    print()
    print(f"paper production (20 clusters x 3 T x 40 ps) on this machine: {out['paper_production_hours_estimate']:.1f} h "
          f"({n_drivers} driver(s) at {eff:.0%} of the model's batched speed); Fig. 6 (25 runs of P2 at 400 K): "
          f"{out['fig6_25_runs_hours_estimate']:.1f} h; 25 runs of every cluster and temperature: "
          f"{out['all_clusters_25_runs_hours_estimate']:.0f} h")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
