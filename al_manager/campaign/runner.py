"""Running a campaign's trajectories: one i-PI per trajectory, a few batched drivers serving all of them.

Design (the figures are in ``bench/campaign_throughput.py``'s output): an i-PI step costs i-PI a few ms of
Python CPU, and one-by-one (i-PI + ``nanosil-driver``) uses one core at a time because i-PI and its driver
take turns; a committee pass over several waiting structures costs far less per structure than one call
each. So every trajectory gets its own i-PI process (``OMP_NUM_THREADS=1``) and ``run.drivers`` batch
servers (:mod:`driver.ipi.batch_server`, ``run.threads`` torch threads each; default one per core with
>= 4 trajectories each) evaluate whatever structures are waiting in one pass, while the other cores run
i-PI steps and the other drivers. Parallelism comes from processes, not torch threads (on a shared
machine extra threads oversubscribe the cores). ``run.workers`` trajectories run at once; the queue is sorted by
cluster size, largest first (so the campaign does not end on one big cluster while the other cores idle), and
each new trajectory goes to the driver that keeps the dearest pass of all drivers cheapest, priced by the batch
server's cost model (:func:`pick_driver`; :func:`driver.ipi.batch_server.partition_by_size` splits what padding
would make too costly).

Per trajectory, a folder ``runs/<cluster>/<T>K/seed<seed>/`` holds ``state.json`` (status, phase, reason)
and one sub-folder per phase:

- ``nvt``: one NVT run of equilibration + production steps (``md/``): the equilibration is its first part;
- ``nve``: ``equilibration/`` (NVT) then ``production/`` (NVE from the equilibration's last checkpoint).

Each phase folder has i-PI's files (prefix ``md``: ``md.dipole_0`` and ``md.dipole_members_0`` (every dipole
member) in e·Bohr, both every ``md.dipole_stride_fs`` (labels 0, K, 2K, ... in MD steps; the driver computes
the dipole only on those steps, ``--dipole-every K``), ``md.out``, ``md.pos_0.xyz``, ``md.chk``, ``RESTART``),
the driver's ``uncertainty.csv`` (committee disagreement every step) and ``ipi.log``.

Resuming: a finished trajectory (done, or stopped outside the trusted region) is never run again. An
unfinished phase restarts from the newest i-PI checkpoint (``md.chk`` or the ``RESTART`` i-PI writes when
it is stopped); the outputs are first cut back to that step, so the restarted run appends without
repeating or missing a step (the dipole files keep labels 0, K, 2K, ... up to that step; i-PI's labels are
absolute step numbers, so a checkpoint between two dipole steps resumes seamlessly too). A phase without a usable checkpoint starts again from scratch.
Child processes get SIGTERM when the campaign process dies (Linux ``PR_SET_PDEATHSIG``), so a killed
campaign leaves i-PI writing its RESTART file and exiting, not running on; a resumed campaign also ends
leftover processes recorded in the state files (by pid and start time) before it starts.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from al_manager.processes import child_env, die_with_parent, end_process, executable, remove_stale_socket, start_time
from driver.ipi.batch_server import pass_cost
from ipi_inputs.files import (SOCKETS_PREFIX, cut_dipoles, cut_rows, cut_xyz, dipole_labels, expected_labels,
                              latest_checkpoint)
from spectra.atomic import write_json

from .config import CampaignConfig, TrajectorySpec, n_atoms
from .report import write_outputs

PREFIX = "md"                       # i-PI output prefix of every phase
DIPOLE_FILES = (f"{PREFIX}.dipole_0", f"{PREFIX}.dipole_members_0")   # cut back together on resume
MAX_ATTEMPTS = 2                    # technical failures (crash, lost driver) retried within one invocation
FINAL = ("done", "untrusted")       # never run again
STOP_GRACE_S = 30.0                 # how long a stopped i-PI may take to exit before SIGTERM


# ---------------------------------------------------------------------- trajectories
@dataclass(frozen=True)
class Phase:
    name: str                       # folder name
    template: str                   # ipi_inputs template
    steps: int
    production_from: int | None     # first dipole label of production in this phase (None: none)


@dataclass
class Launch:
    phase: Phase
    xml: Path
    step_offset: int


class TrajectoryRun:
    """One (cluster, temperature, seed): folder, phases and the persistent ``state.json``."""

    def __init__(self, spec: TrajectorySpec, config: CampaignConfig, index: int):
        self.spec, self.config, self.index = spec, config, index
        self.folder = spec.folder(config.output)
        self.n_atoms = n_atoms(spec.cluster.structure)
        md = config.md
        if config.ensemble == "nvt":
            self.phases = [Phase("md", "production_nvt", md.equilibration_steps + md.production_steps,
                                 md.equilibration_steps)]
        else:
            self.phases = [Phase("equilibration", "production_nvt", md.equilibration_steps, None),
                           Phase("production", "production_nve", md.production_steps, 0)]
        self.state = self._load_state()
        self.attempts = 0           # technical failures in this invocation

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def md_record(self) -> dict:
        """What the trajectory's files depend on: a resumed campaign must not change it."""
        record = {"ensemble": self.config.ensemble, "timestep_fs": self.config.md.timestep_fs,
                  "phases": [[p.name, p.steps] for p in self.phases],
                  "structure": str(self.spec.cluster.structure)}
        if self.dipole_stride != 1:  # absent for a dipole every step: campaigns from before the stride resume
            record["dipole_stride"] = self.dipole_stride
        return record

    @property
    def dipole_stride(self) -> int:
        return self.config.md.dipole_stride

    def check_compatible(self) -> None:
        saved = self.state.get("md")
        if (self.folder / "state.json").is_file() and saved != self.md_record:
            raise ValueError(f"{self.folder} was run with other MD settings ({saved}); the configuration now asks "
                             f"for {self.md_record}: use a new output folder, or remove that run folder")

    @property
    def status(self) -> str:
        return self.state["status"]

    @property
    def socket_name(self) -> str:
        # short (UNIX socket paths are limited to 108 bytes), unique per campaign folder and trajectory, and
        # stable when the campaign is resumed or extended (a checkpoint carries the address)
        import hashlib

        return "nsc" + hashlib.sha1(f"{self.config.output.resolve()}|{self.id}".encode()).hexdigest()[:16]

    def _load_state(self) -> dict:
        path = self.folder / "state.json"
        base = {"id": self.id, "cluster": self.spec.cluster.name, "temperature_K": self.spec.temperature,
                "seed": self.spec.seed, "status": "pending", "phases_done": [], "reason": None,
                "stopped_at_step": None, "ipi_pid": None, "ipi_started": None, "md": self.md_record}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                if isinstance(saved, dict):
                    base.update(saved)
            except (OSError, json.JSONDecodeError):
                pass  # a damaged state file: the phase folders still tell where the run stands
        return base

    def save(self, **changes) -> None:
        self.state.update(changes)
        self.state["updated"] = time.time()
        write_json(self.folder / "state.json", self.state)

    def phase_folder(self, phase: Phase) -> Path:
        return self.folder / phase.name

    def phase_complete(self, phase: Phase) -> bool:
        folder = self.phase_folder(phase)
        chk = latest_checkpoint(folder, PREFIX)
        expected = expected_labels(phase.steps, self.dipole_stride)
        return (chk is not None and chk[1] >= phase.steps
                and all(dipole_labels(folder / name) == expected for name in DIPOLE_FILES))

    def steps_done(self) -> int:
        """MD steps completed and kept, over all phases (from the files)."""
        total = 0
        for phase in self.phases:
            if phase.name in self.state["phases_done"]:
                total += phase.steps
            else:
                labels = dipole_labels(self.phase_folder(phase) / f"{PREFIX}.dipole_0")
                total += max(labels) if labels else 0
        return total

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def prepare(self) -> Launch | None:
        """Get the next phase ready to run (fresh, or resumed from its checkpoint); None when all are done."""
        for k, phase in enumerate(self.phases):
            if phase.name in self.state["phases_done"]:
                continue
            folder = self.phase_folder(phase)
            if self.phase_complete(phase):
                self.save(phases_done=self.state["phases_done"] + [phase.name])
                continue
            chk = latest_checkpoint(folder, PREFIX)
            if chk is not None and 0 < chk[1] < phase.steps and self._cut_back(folder, chk[1]):
                from ipi_inputs.render import restart_input

                restart = restart_input(chk[0], folder / "restart.xml", self.socket_name)
                return Launch(phase, restart, chk[1])
            return self._fresh(k, phase)
        return None

    def _cut_back(self, folder: Path, step: int) -> bool:
        """Cut every output back to ``step`` so the restarted i-PI appends seamlessly."""
        for name in DIPOLE_FILES:  # the dipole and the members files, alike
            if not cut_dipoles(folder / name, step, self.dipole_stride):
                return False       # a gap or a torn frame: the phase starts afresh
        cut_rows(folder / f"{PREFIX}.out", lambda s: s <= step)
        cut_xyz(folder / f"{PREFIX}.pos_0.xyz", step)
        cut_rows(folder / "uncertainty.csv", lambda s: s < step)  # step `step` is evaluated again
        return True

    def _fresh(self, k: int, phase: Phase) -> Launch:
        from ipi_inputs.render import render_input

        folder = self.phase_folder(phase)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        spec, md = self.spec, self.config.md
        # the dipole file flushed every step, so it never lags behind a checkpoint (resume cuts it back)
        common = dict(socket=f"unix:{self.socket_name}", steps=phase.steps, seed=spec.seed, prefix=PREFIX,
                      timeout=600.0, timestep_fs=md.timestep_fs, checkpoint_steps=md.checkpoint_steps,
                      dipole_flush=1, dipole_stride=md.dipole_stride)
        if phase.template == "production_nve":
            previous = self.phase_folder(self.phases[k - 1])
            chk = latest_checkpoint(previous, PREFIX)
            if chk is None:
                raise RuntimeError(f"{self.id}: no checkpoint in {previous} to start {phase.name} from")
            start = folder / "start.chk"
            shutil.copyfile(chk[0], start)
            xml = render_input(phase.template, folder, checkpoint=start, **common)
        else:
            xml = render_input(phase.template, folder, structure=spec.cluster.structure,
                               temperature=spec.temperature, velocities="thermal", **common)
        return Launch(phase, xml, 0)


# ---------------------------------------------------------------------- drivers
def pick_driver(sizes: list[list[int]], n_atoms: int, workers: int) -> int:
    """Which driver a new trajectory of ``n_atoms`` goes to, given the atom counts of each driver's running
    trajectories: among those with room (``ceil(workers / drivers)`` each), the one that leaves the dearest
    pass of all drivers cheapest, priced by the batch server's own cost model (:func:`pass_cost`: padding
    and calls included). Drivers run side by side, so the campaign moves at the pace of its busiest one;
    among equals, the one whose pass grows least, then the first."""
    capacity = -(-workers // len(sizes))
    now = [pass_cost(here) for here in sizes]

    def key(d):
        if len(sizes[d]) >= capacity:
            return (1, 0.0, 0.0)
        grown = pass_cost(sizes[d] + [n_atoms])
        return (0, max([grown, *(c for k, c in enumerate(now) if k != d)]), grown - now[d])
    return min(range(len(sizes)), key=key)


class DriverProcess:
    """A ``python -m driver.ipi.batch_server --control -`` child; its events land in a shared queue."""

    def __init__(self, index: int, config: CampaignConfig, events: queue.Queue, log_dir: Path):
        self.index = index
        self.targets: set[str] = set()
        cmd = [sys.executable, "-m", "driver.ipi.batch_server", "--models", str(config.models), "--control", "-",
               "--threads", str(config.run.threads), "--gather-ms", f"{config.run.gather_ms:g}",
               "--progress-every", "1", "--sockets-prefix", SOCKETS_PREFIX,
               "--trust-measure", config.trust.measure, "--dipole-every", str(config.md.dipole_stride),
               "--committee-every", str(config.md.committee_every)]
        if config.trust.trust_cap is not None:
            cmd += ["--trust-cap", f"{config.trust.trust_cap:g}"]
        if config.trust.fragment_distance is not None:
            cmd += ["--fragment-distance", f"{config.trust.fragment_distance:g}"]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"driver{index}.log"
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         env=child_env(config.run.threads), text=True, bufsize=1,
                                         preexec_fn=die_with_parent)
        self.started = start_time(self.proc.pid)
        self.stopping = False
        self._reader = threading.Thread(target=self._read, args=(events,), daemon=True)
        self._reader.start()

    def _read(self, events: queue.Queue) -> None:
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                events.put((self.index, event))
        events.put((self.index, {"event": "driver-exit"}))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def add(self, target: dict) -> None:
        """Ask the driver to serve ``target``; a dead driver is noticed (and replaced) by the runner's loop."""
        self.targets.add(target["id"])
        with contextlib.suppress(BrokenPipeError, OSError, ValueError):
            self.proc.stdin.write(json.dumps({"add": target}) + "\n")
            self.proc.stdin.flush()

    def stop(self, timeout: float = 20.0) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError, ValueError):
                self.proc.stdin.write(json.dumps({"shutdown": True}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()


@dataclass
class Active:
    run: TrajectoryRun
    launch: Launch
    proc: subprocess.Popen
    driver: DriverProcess
    target_id: str
    started_step: int
    step: int
    stop: dict | None = None
    error: str | None = None
    stop_deadline: float | None = None


# ---------------------------------------------------------------------- the runner
class CampaignRunner:
    """Schedules the trajectories of a campaign over i-PI processes and batched drivers."""

    def __init__(self, config: CampaignConfig, log=None, progress_every: float = 30.0, stream=None,
                 only: set[str] | None = None, shard: str | None = None):
        """``only``: the ids of the trajectories this runner runs (a shard of a campaign on Parsl, see
        :func:`run_shard`; default all); ``shard``: its name, which keeps its drivers' files apart."""
        self.config = config
        self.shard = shard
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.progress_every = 1.0 if self.live else progress_every
        self.runs = [TrajectoryRun(spec, config, k) for k, spec in enumerate(config.trajectories())
                     if only is None or spec.id in only]
        self._events: queue.Queue = queue.Queue()
        self._launches = 0
        self._stats = {"wall_s": 0.0, "steps": 0, "structures": 0, "batches": 0}
        self._driver_stats: dict[int, dict] = {}

    # ------------------------------------------------------------ bookkeeping
    @contextlib.contextmanager
    def lock(self):
        """One campaign per output folder (an flock, released by the kernel even on SIGKILL)."""
        import fcntl

        self.config.output.mkdir(parents=True, exist_ok=True)
        path = self.config.output / ".campaign.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise ValueError(f"another campaign is running in {self.config.output} "
                                 f"(pid {f.read().strip() or '?'})") from None
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def to_run(self, retry_failed: bool = True) -> list[TrajectoryRun]:
        """The trajectories still to run (not done or untrusted; failed ones only with ``retry_failed``),
        after checking that every trajectory's files match the MD settings."""
        for run in self.runs:
            run.check_compatible()
        return [r for r in self.runs if r.status not in FINAL and (retry_failed or r.status != "failed")]

    def states(self) -> list[tuple[TrajectoryRun, dict]]:
        return [(run, dict(run.state)) for run in self.runs]

    def throughput(self) -> dict:
        wall = self._stats["wall_s"]
        ps = self._stats["steps"] * self.config.md.timestep_fs / 1000.0
        out = {"wall_s": round(wall, 2), "simulated_ps": round(ps, 4), "md_steps": self._stats["steps"]}
        if wall > 0:
            out.update(ps_per_hour=round(ps / wall * 3600.0, 3), steps_per_s=round(self._stats["steps"] / wall, 3))
        structures = sum(s.get("structures", 0) for s in self._driver_stats.values())
        batches = sum(s.get("batches", 0) for s in self._driver_stats.values())
        if batches:
            out["mean_structures_per_pass"] = round(structures / batches, 3)
        return out

    def _reap(self) -> None:
        """End processes a killed earlier invocation left behind (normally already gone: PDEATHSIG)."""
        ended = 0
        for run in self.runs:
            if end_process(run.state.get("ipi_pid"), run.state.get("ipi_started")):
                ended += 1
        drivers = self._drivers_file
        if drivers.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError, TypeError):
                for entry in json.loads(drivers.read_text()):
                    ended += end_process(entry.get("pid"), entry.get("started"))
        if ended:
            self.log(f"ended {ended} process(es) left over from an interrupted campaign")

    # ------------------------------------------------------------ the loop
    def run(self, retry_failed: bool = True) -> None:
        cfg = self.config
        todo = self.to_run(retry_failed)
        self._reap()
        for run in self.runs:
            if run.status == "running":
                run.save(status="pending")
        finished = sum(r.status in FINAL for r in self.runs)
        self.log(f"campaign {cfg.output}: {len(self.runs)} trajectories, {finished} already finished, "
                 f"{len(todo)} to run")
        if not todo:
            return
        # the committee must know every element before any process starts
        from driver.models.committee import load_committee
        from ipi_inputs.files import read_cluster

        committee = load_committee(cfg.models)
        for cluster in cfg.clusters:
            committee.check_numbers(read_cluster(cluster.structure).numbers, source=str(cluster.structure))
        del committee

        pending = deque(todo)
        active: dict[str, Active] = {}
        drivers = [DriverProcess(k, cfg, self._events, self._drivers_dir)
                   for k in range(min(cfg.run.drivers, len(todo)))]
        self._record_drivers(drivers)
        start = time.monotonic()
        self._steps_cache: dict[str, int] = {}
        self._start_steps = {r.id: self._current_steps(r, {}) for r in self.runs}
        last_line = 0.0
        restarts = 0
        try:
            while pending or active:
                while pending and len(active) < cfg.run.workers:
                    run = pending.popleft()
                    try:
                        launch = run.prepare()
                    except Exception as exc:  # rendering or file problems: this trajectory fails
                        run.save(status="failed", reason=f"cannot prepare: {exc}")
                        self._say(f"{run.id}: failed: cannot prepare: {exc}")
                        continue
                    if launch is None:
                        run.save(status="done", reason=None)
                        continue
                    active[run.id] = self._launch(run, launch, self._pick_driver(drivers, active, run))
                self._pump(active, pending, timeout=0.5)
                for driver in list(drivers):
                    if not driver.alive() and not driver.stopping:
                        restarts += 1
                        self._driver_lost(driver, active, pending)
                        if restarts > 3:
                            raise RuntimeError(f"batched driver exited {restarts} times; see {driver.log_path}")
                        drivers[drivers.index(driver)] = DriverProcess(driver.index, cfg, self._events,
                                                                       self._drivers_dir)
                        self._record_drivers(drivers)
                now = time.monotonic()
                self._stats["wall_s"] = now - start
                if now - last_line >= self.progress_every:
                    last_line = now
                    self._progress(active, now - start)
        except KeyboardInterrupt:
            self._say("interrupted: stopping i-PI (it writes a checkpoint); run the same command to resume")
            raise
        finally:
            for a in active.values():
                if a.proc.poll() is None:
                    a.proc.terminate()  # i-PI's soft exit: RESTART at its last safe step
            for driver in drivers:
                driver.stop()
            for a in active.values():
                try:
                    a.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    a.proc.kill()
                if a.run.status == "running":
                    a.run.save(status="pending", ipi_pid=None)
            self._stats["wall_s"] = time.monotonic() - start
            self._progress({}, self._stats["wall_s"], final=True)

    def _pick_driver(self, drivers: list[DriverProcess], active: dict[str, "Active"], run: TrajectoryRun):
        """The driver for ``run`` by :func:`pick_driver` (bench/campaign_throughput.py's estimate follows the
        same rule)."""
        sizes = [[a.run.n_atoms for a in active.values() if a.driver is driver] for driver in drivers]
        return drivers[pick_driver(sizes, run.n_atoms, self.config.run.workers)]

    @property
    def _drivers_dir(self) -> Path:
        return self.config.output / "drivers" / (self.shard or "")

    @property
    def _drivers_file(self) -> Path:
        return self.config.output / (f"drivers-{self.shard}.json" if self.shard else "drivers.json")

    def _record_drivers(self, drivers: list[DriverProcess]) -> None:
        write_json(self._drivers_file,
                    [{"pid": d.proc.pid, "started": d.started} for d in drivers])  # type: ignore[arg-type]

    def _launch(self, run: TrajectoryRun, launch: Launch, driver: DriverProcess) -> Active:
        folder = run.phase_folder(launch.phase)
        path = SOCKETS_PREFIX + run.socket_name
        if os.path.exists(path):
            remove_stale_socket(path)
        with open(folder / "ipi.log", "a") as log:
            log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}: i-pi {launch.xml.name} "
                      f"(from step {launch.step_offset})\n")
            log.flush()
            proc = subprocess.Popen([executable("i-pi"), launch.xml.name], cwd=folder, stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(1), preexec_fn=die_with_parent)
        self._launches += 1
        target_id = f"{run.id}#{self._launches}"
        driver.add({"id": target_id, "socket": f"unix:{run.socket_name}", "structure": str(run.spec.cluster.structure),
                    "log": str(folder / "uncertainty.csv"), "step_offset": launch.step_offset})
        run.save(status="running", phase=launch.phase.name, ipi_pid=proc.pid, ipi_started=start_time(proc.pid))
        where = f"resumed at step {launch.step_offset}" if launch.step_offset else "started"
        self._say(f"{run.id}: {launch.phase.name} {where} ({launch.phase.steps} steps, driver {driver.index})")
        return Active(run, launch, proc, driver, target_id, launch.step_offset, launch.step_offset)

    def _pump(self, active: dict[str, Active], pending: deque, timeout: float) -> None:
        by_target = {a.target_id: a for a in active.values()}
        deadline = time.monotonic() + timeout
        while True:
            try:
                index, event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            kind = event.get("event")
            if kind == "progress":
                self._driver_stats[index] = event
                for target, step in event.get("steps", {}).items():
                    if target in by_target:
                        by_target[target].step = step
                continue
            a = by_target.get(event.get("id"))
            if a is None:
                continue
            if kind == "stopped":
                a.stop = event
                a.stop_deadline = time.monotonic() + STOP_GRACE_S
            elif kind == "error":
                a.error = event.get("message", "driver error")
                if a.proc.poll() is None:
                    a.proc.terminate()
            elif kind in ("finished", "disconnected"):
                a.step = event.get("step", a.step)
                if kind == "disconnected" and a.error is None:
                    a.error = event.get("message")
        for key, a in list(active.items()):
            if a.stop_deadline is not None and time.monotonic() > a.stop_deadline and a.proc.poll() is None:
                a.proc.terminate()
            if a.proc.poll() is not None:
                del active[key]
                self._ended(a, pending)

    def _ended(self, a: Active, pending: deque) -> None:
        run, phase = a.run, a.launch.phase
        folder = run.phase_folder(phase)
        stop = a.stop
        stop_file = folder / "uncertainty.csv.stop.json"
        if stop is None and stop_file.is_file():
            with contextlib.suppress(OSError, json.JSONDecodeError):
                stop = json.loads(stop_file.read_text())
        labels = dipole_labels(folder / f"{PREFIX}.dipole_0")
        self._stats["steps"] += max(0, (max(labels) if labels else 0) - a.started_step)
        self._steps_cache.pop(run.id, None)
        if stop is not None:
            run.save(status="untrusted", reason=stop.get("reason"), stopped_at_step=stop.get("step"),
                     stopped_phase=phase.name, ipi_pid=None)
            self._say(f"{run.id}: STOPPED in {phase.name} at step {stop.get('step')}: {stop.get('reason')} "
                      f"(excluded from the mean spectrum)")
            return
        if run.phase_complete(phase):
            run.save(phases_done=run.state["phases_done"] + [phase.name], ipi_pid=None)
            if phase is run.phases[-1]:
                run.save(status="done", reason=None)
                self._say(f"{run.id}: done ({run.total_steps} steps)")
            else:
                pending.appendleft(run)  # next phase, same slot
            return
        reason = a.error or f"i-PI exited with status {a.proc.returncode}"
        tail = _last_line(folder / "ipi.log")
        if tail:
            reason += f"; i-PI log: {tail}"
        run.attempts += 1
        if run.attempts < MAX_ATTEMPTS:
            run.save(status="pending", reason=reason, ipi_pid=None)
            pending.append(run)
            self._say(f"{run.id}: interrupted at step {max(labels) if labels else 0} ({reason}); will resume")
        else:
            run.save(status="failed", reason=reason, ipi_pid=None)
            self._say(f"{run.id}: FAILED after {run.attempts} attempts: {reason}")

    def _driver_lost(self, driver: DriverProcess, active: dict[str, Active], pending: deque) -> None:
        self._say(f"batched driver {driver.index} exited (status {driver.proc.returncode}); see {driver.log_path}; "
                  f"restarting it and resuming its trajectories")
        for a in active.values():
            if a.driver is driver:
                a.error = a.error or "the batched driver exited"
                if a.proc.poll() is None:
                    a.proc.terminate()

    # ------------------------------------------------------------ output
    def _say(self, message: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        self.log(message)

    def _current_steps(self, run: TrajectoryRun, active: dict[str, Active]) -> int:
        """Steps of ``run`` simulated so far (cached: reading dipole files every second would be costly)."""
        if run.id in active:
            a = active[run.id]
            steps = sum(p.steps for p in run.phases if p.name in run.state["phases_done"]) + a.step
            self._steps_cache[run.id] = steps
            return steps
        if run.id not in self._steps_cache:
            self._steps_cache[run.id] = run.total_steps if run.status == "done" else run.steps_done()
        return self._steps_cache[run.id]

    def _progress(self, active: dict[str, Active], elapsed: float, final: bool = False) -> None:
        dt_ps = self.config.md.timestep_fs / 1000.0
        counts = {s: sum(r.status == s for r in self.runs) for s in ("done", "untrusted", "failed")}
        current = {r.id: self._current_steps(r, active) for r in self.runs}
        new_steps = max(0, sum(current.values()) - sum(self._start_steps.values()))
        rate = new_steps * dt_ps / elapsed * 3600.0 if elapsed > 0 else 0.0  # ps per hour
        left = sum(max(0, r.total_steps - current[r.id]) for r in self.runs if r.status not in FINAL + ("failed",))
        eta = "0s" if not left else (_duration(left * dt_ps / rate * 3600.0) if rate > 0 else "-")
        line = (f"campaign: {counts['done']}/{len(self.runs)} done, {len(active)} running, {counts['failed']} failed, "
                f"{counts['untrusted']} untrusted | {sum(current.values()) * dt_ps:.2f}/"
                f"{sum(r.total_steps for r in self.runs) * dt_ps:.2f} ps simulated | {rate:.2f} ps/h | ETA {eta}")
        if self.live:
            self.stream.write("\r\033[K" + line + ("\n" if final else ""))
            self.stream.flush()
        else:
            self.log(line)


def run_campaign(config: CampaignConfig, log=None, analyse_only: bool = False, retry_failed: bool = True) -> dict:
    """Run (or resume) every trajectory, then write the outputs; returns the summary written to
    ``<output>/summary.json``. With ``[execution] mode = "parsl"`` the trajectories run as shards on the
    Parsl sampling pool (:func:`run_on_parsl`); this process then only waits, and assembles the spectra."""
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    config.output.mkdir(parents=True, exist_ok=True)
    runner = CampaignRunner(config, log=log)
    with runner.lock():
        if not analyse_only and config.execution.uses_parsl:
            throughput = run_on_parsl(config, runner, log, retry_failed=retry_failed)
            runner = CampaignRunner(config, log=log)   # the shards' states, as they wrote them
            return write_outputs(config, runner.states(), log=log, throughput=throughput)
        if not analyse_only:
            runner.run(retry_failed=retry_failed)
        return write_outputs(config, runner.states(), log=log, throughput=runner.throughput())


# ---------------------------------------------------------------------- on Parsl
def shards(runs: list[TrajectoryRun], n: int) -> list[list[TrajectoryRun]]:
    """``runs`` (queue order: by size by default) in ``n`` contiguous blocks of nearly equal model cost (each
    trajectory priced by the batch server's cost model for its size, :func:`pass_cost`, all runs of a
    campaign being of one length), so each node's batched drivers see clusters of similar size and no node
    gets all the big ones; every block holds at least one run."""
    if not runs:
        return []
    n = max(1, min(n, len(runs)))
    cost = np.cumsum([pass_cost([r.n_atoms]) for r in runs])
    cuts = [0]
    for k in range(1, n):
        # the cut nearest k/n of the cost, leaving one run at least for each block still to come
        target = cost[-1] * k / n
        at = int(np.searchsorted(cost, target))            # cost[at] >= target: cut before or after run `at`
        at += 1 if at == 0 or cost[at] - target < target - cost[at - 1] else 0
        cuts.append(min(max(at, cuts[-1] + 1), len(runs) - (n - k)))
    cuts.append(len(runs))
    return [runs[a:b] for a, b in zip(cuts, cuts[1:])]


def run_shard(config: CampaignConfig, ids: list[str], shard: str, retry_failed: bool = True) -> dict:
    """One Parsl task: the trajectories ``ids`` of ``config``'s campaign on this node, with [run]'s i-PI
    processes and batched drivers, in the shared output folder (each trajectory resumes from its own
    checkpoint, as locally). Returns the shard's throughput and the status of each of its trajectories."""
    def log(message: str) -> None:
        print(f"[{shard}] {message}", file=sys.stderr, flush=True)

    with open(os.devnull, "w") as quiet:   # no progress bar in a worker's log
        runner = CampaignRunner(config, log=log, only=set(ids), shard=shard, stream=quiet)
        runner.run(retry_failed=retry_failed)
    return {"throughput": runner.throughput(), "status": {r.id: r.status for r in runner.runs},
            "host": os.uname().nodename}


def run_on_parsl(config: CampaignConfig, runner: CampaignRunner, log, retry_failed: bool = True) -> dict:
    """Run the unfinished trajectories as :func:`run_shard` tasks on the ``sampling`` pool of a Parsl session
    (``pairs_per_node`` shards per node, over ``nodes`` x ``max_blocks`` nodes) and wait for them; a shard
    whose task failed (also after its retries) is logged, its trajectories stay as their state files say
    and a rerun resumes them. Returns the throughput summed over the shards (wall: this process's)."""
    import concurrent.futures as cf

    from al_manager.execution import session

    ex = config.execution
    todo = runner.to_run(retry_failed)
    log(f"campaign {config.output}: {len(runner.runs)} trajectories, {len(runner.runs) - len(todo)} already "
        f"finished, {len(todo)} to run on Parsl ({ex.provider} provider)")
    total = {"wall_s": 0.0, "simulated_ps": 0.0, "md_steps": 0}
    if not todo:
        return total
    blocks = shards(todo, ex.sampling.pairs_per_node * ex.nodes * ex.max_blocks)
    start = time.monotonic()
    with session(ex, config.output / "parsl", stages=("sampling",)) as s:
        pool = s.executor("sampling")
        futures = {}
        for k, block in enumerate(blocks):
            name = f"shard{k}"
            futures[pool.submit(run_shard, config, [r.id for r in block], name, retry_failed)] = (name, block)
            log(f"{name}: {len(block)} trajectories ({block[0].id} ... {block[-1].id}) as a task of "
                f"ParslExecutor sampling")
        for fut in cf.as_completed(futures):
            name, block = futures[fut]
            try:
                result = fut.result()
            except Exception as exc:  # the task failed more often than [execution] retries allows
                log(f"{name}: task failed: {type(exc).__name__}: {exc}; its trajectories resume on a rerun")
                continue
            counts = {}
            for status in result["status"].values():
                counts[status] = counts.get(status, 0) + 1
            for key in ("simulated_ps", "md_steps"):
                total[key] += result["throughput"].get(key, 0)
            log(f"{name} on {result['host']}: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
                f"; {result['throughput'].get('simulated_ps', 0):.2f} ps")
    total["wall_s"] = round(time.monotonic() - start, 2)
    if total["wall_s"] > 0:
        total["ps_per_hour"] = round(total["simulated_ps"] / total["wall_s"] * 3600.0, 3)
    return total


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def _last_line(path: Path) -> str:
    try:
        lines = [s.strip() for s in path.read_text(errors="replace").splitlines() if s.strip()]
    except OSError:
        return ""
    errors = [s for s in lines if "Error" in s or "error" in s]
    return (errors[-1] if errors else lines[-1])[:300] if lines else ""


