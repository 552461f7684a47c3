"""One active-learning iteration's sampling: parallel i-PI runs, each served by its own ``mpirun
nanosil-driver``, and one ZMQ PULL socket that collects the frames the committee is unsure about.

For every (structure, temperature) a run folder ``ITERDIR/runs/NAME`` gets an i-PI input rendered from
``ipi_inputs/al_sampling.xml`` (:func:`ipi_inputs.render_input`). Runs start in their own process groups,
at most ``parallel_runs`` at a time. A run ends when

- it has delivered ``frames_per_run`` uncertain frames: the manager creates i-PI's ``EXIT`` file, i-PI stops
  after the current step and writes its ``RESTART`` checkpoint, tells the driver to exit, and both are
  waited for (status ``done``);
- i-PI reaches the maximum MD time (``done``, no frame);
- the committee's disagreement reaches the trust cap (the driver reports an exploded structure): stopped
  through ``EXIT`` (status ``exploded``); or i-PI or the driver fails (``crashed``, with the reason from the
  logs). Crashed and exploded runs are recorded and the iteration goes on with the others.

The next iteration continues every run from its previous i-PI checkpoint (positions and velocities;
:func:`ipi_inputs.render_input` removes the centre-of-mass translation and the rotation) at the same
temperature; a run whose previous attempt crashed or exploded, or whose checkpoint is unusable, restarts
from the reference structure with fresh thermal velocities.

Durability: every received frame and every change of a run's status is written to the state file at once
(:class:`al_manager.learning.state.State`). A run interrupted by a killed manager is started again (same seed, same
start point) and only needs the frames it still lacks, so an interrupted iteration delivers the same
number of frames as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import signal
import shutil
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from ase import Atoms

from driver.geometry_checks import drifted
from ipi_inputs.files import SOCKETS_PREFIX

from al_manager.processes import (OWNER_ENV, cwd_is, die_with_parent, end_processes, executable,
                                  remove_stale_socket, signal_group_or_pid, tagged_processes)

from .state import State

PREFIX = "simulation"                     # i-PI output prefix inside a run folder
_RECORDED_BEFORE_TIMESTEP_FS = 0.5        # runs recorded without their time step ran al_sampling.xml's 0.5 fs


class SamplingFailed(RuntimeError):
    """Every run of an iteration crashed: nothing was sampled, and going on would only repeat it."""


@dataclass
class SamplingSettings:
    """The ``[sampling]`` section of the active-learning configuration, exactly as the sampler takes it.

    The thresholds and the trust cap carry the names of the ``nanosil-driver`` flags they become
    (``--energy-threshold``, ``--force-threshold``, ``--trust-cap``). ``seed`` is the configuration's
    top-level ``seed``. Impossible values are refused here; messages start with the field name.
    """

    energy_threshold: float | None = 0.002  # eV/atom, calibrated committee std of the energy per atom
    force_threshold: float | None = None    # eV/Å, calibrated max force std; used instead of the energy when set
    trust_cap: float | None = None          # same unit as the criterion in use: at or above, the frame "exploded"
    max_md_ps: float = 5.0                  # maximum MD time per run and iteration (paper: 5 ps)
    timestep_fs: float = 0.5                # MD time step
    parallel_runs: int = 1                  # i-PI runs at once
    mpi_ranks: int = 1                      # ranks per nanosil-driver (mpirun -n)
    frames_per_run: int = 1                 # stop a run once it delivered this many uncertain frames
    # Adaptive threshold: the threshold in use is max(threshold, adaptive_factor x the median calibrated
    # uncertainty of the committee on its own training data), so a committee that is already unsure at the
    # minimum (normal-mode data only) does not flag at step 1: runs travel before they flag. "none": fixed.
    adaptive_factor: float | None = 3.0
    min_flag_gap_fs: float = 25.0           # frames of one run closer in time than this to the last kept one (or
                                            # to the run's start) are skipped
    driver_threads: int = 1                 # torch threads per rank
    dtype: Literal["float32", "float64"] = "float32"
    seed: int = 12345
    socket_timeout_s: float = 300.0         # i-PI declares a silent driver dead after this
    exit_grace_s: float = 60.0              # after EXIT, time i-PI gets to finish its step and checkpoint
    partner_grace_s: float = 10.0           # after i-PI or the driver ended, time the other gets to follow
    max_wall_s: float | None = None         # hard wall-clock limit of one run (None: the MD length decides)
    log_every: int = 1000                   # driver progress line every this many steps

    def __post_init__(self):
        from ipi_inputs.render import AL_MAX_PS

        for key in ("energy_threshold", "force_threshold", "trust_cap", "max_wall_s", "adaptive_factor"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0, got {value:g}")
        if self.energy_threshold is None and self.force_threshold is None:
            raise ValueError("energy_threshold: set energy_threshold (eV/atom) or force_threshold (eV/Å)")
        criterion, threshold, unit = self.criterion
        if self.trust_cap is not None and self.trust_cap <= threshold:
            raise ValueError(f"trust_cap {self.trust_cap:g} must be above the {criterion} threshold "
                             f"{threshold:g} {unit}")
        for key in ("max_md_ps", "timestep_fs", "socket_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key):g}")
        if self.timestep_fs > 5:
            raise ValueError(f"timestep_fs {self.timestep_fs:g} fs is too long for MD with O and Mg (use 0.5-2 fs)")
        if self.max_md_ps > AL_MAX_PS:
            raise ValueError(f"max_md_ps {self.max_md_ps:g} ps: sampling runs at most {AL_MAX_PS:g} ps per "
                             f"iteration (the paper's length)")
        if self.max_md_ps * 1000.0 < self.timestep_fs:
            raise ValueError(f"max_md_ps {self.max_md_ps:g} ps is shorter than one time step "
                             f"({self.timestep_fs:g} fs)")
        for key in ("parallel_runs", "mpi_ranks", "frames_per_run", "driver_threads", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("exit_grace_s", "partner_grace_s", "min_flag_gap_fs"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key):g}")

    @property
    def criterion(self) -> tuple[str, float, str]:
        """The flagging measure in use: (name, threshold, unit); the force threshold takes precedence."""
        if self.force_threshold is not None:
            return "force", self.force_threshold, "eV/Å"
        return "energy", self.energy_threshold, "eV/atom"

    @property
    def steps(self) -> int:
        """MD steps of at most ``max_md_ps`` at ``timestep_fs``."""
        return max(1, math.floor(self.max_md_ps * 1000.0 / self.timestep_fs + 1e-9))

    def with_threshold(self, threshold: float) -> "SamplingSettings":
        """These settings with the threshold of the criterion in use set to ``threshold`` (kept below the
        trust cap)."""
        if self.trust_cap is not None:
            threshold = min(threshold, 0.5 * self.trust_cap)
        name = "force_threshold" if self.criterion[0] == "force" else "energy_threshold"
        return replace(self, **{name: float(threshold)})

    def driver_flags(self) -> list[str]:
        """The flagging options of ``nanosil-driver``: one name each, as in this section."""
        flags = []
        for key in ("energy_threshold", "force_threshold", "trust_cap"):
            value = getattr(self, key)
            if value is not None:
                flags += [f"--{key.replace('_', '-')}", f"{value:.10g}"]
        return flags


@dataclass
class RunSpec:
    """One sampling run: a structure at a temperature."""

    name: str                 # e.g. "P1_400K"
    structure: str            # structure name, e.g. "P1"
    path: str                 # its file (the reference minimum the runs start from)
    temperature: float        # K (vibrational temperature)
    index: int                # position in the run list (seeds, socket names)


def plan_runs(structures: dict[str, str], temperatures: list[float]) -> list[RunSpec]:
    """Every (structure, temperature), in a stable order. ``structures``: name -> file."""
    specs = []
    for name, path in structures.items():
        for t in temperatures:
            specs.append(RunSpec(f"{name}_{float(t):g}K", name, str(path), float(t), len(specs)))
    return specs


def start_point(spec: RunSpec, previous: dict | None, previous_dir: Path | None) -> tuple[Atoms, str]:
    """The start structure of a run (with velocities when continuing) and a note for the log."""
    from ipi_inputs.files import latest_checkpoint, read_checkpoint, read_cluster

    reference = read_cluster(spec.path)
    if previous is None or previous_dir is None:
        return reference, "reference structure, thermal velocities"
    if previous.get("status") != "done":
        return reference, (f"reference structure, thermal velocities (previous run {previous.get('status')}: "
                           f"{previous.get('reason') or 'no reason recorded'})")
    found = latest_checkpoint(previous_dir, PREFIX)
    if found is None:
        return reference, "reference structure, thermal velocities (previous run left no checkpoint)"
    try:
        chk = found[0]
        atoms = read_checkpoint(chk)
    except ValueError as exc:
        return reference, f"reference structure, thermal velocities ({exc})"
    why = drifted(atoms, reference)
    if why is not None:
        return reference, f"reference structure, thermal velocities (checkpoint unusable: {why})"
    return atoms, f"checkpoint {chk.parent.parent.parent.name}/{chk.parent.name}/{chk.name} (positions and velocities)"


# ---------------------------------------------------------------------- one run's processes
@dataclass
class _Live:
    spec: RunSpec
    run_dir: Path
    run_id: str
    socket_name: str
    quota: int                       # frames still wanted from this attempt
    ipi: "subprocess.Popen | _TaskProcess"
    driver: "subprocess.Popen | _TaskProcess"
    logs: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    exit_requested: float | None = None
    why_stop: str = ""
    exploded: str = ""               # why, when the driver reported an exploded structure (ZMQ kind "exploded")
    ended_one: float | None = None   # when the first of the two processes ended
    # the step of the last kept frame; the start (step 0) counts as one, as it is a labelled structure: the
    # reference minimum, or where the previous iteration's run stopped, a step or two after its last kept
    # frame. So min_flag_gap_fs also holds across the continuation of a run, from iteration to iteration
    last_flag_step: int = 0

    def request_exit(self, why: str) -> None:
        if self.exit_requested is None:
            (self.run_dir / "EXIT").touch()
            self.exit_requested = time.monotonic()
            self.why_stop = why

    def alive(self) -> bool:
        return self.ipi.poll() is None or self.driver.poll() is None

    @property
    def remote(self) -> bool:
        return isinstance(self.ipi, _TaskProcess)

    def kill(self) -> None:
        if self.remote:  # the task on its worker ends both processes when it sees the file
            (self.run_dir / KILL_FILE).touch()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.alive():
                time.sleep(0.1)
            return
        _end_pair((self.ipi, self.driver))

    def close_logs(self) -> None:
        for f in self.logs:
            f.close()
        sock = Path(SOCKETS_PREFIX + self.socket_name)
        if sock.exists():
            try:
                sock.unlink()
            except OSError:
                pass


def _end_pair(procs) -> None:
    """SIGTERM the process groups of a pair's live processes, give them 10 s, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            signal_group_or_pid(proc.pid, proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if proc.poll() is None:
            signal_group_or_pid(proc.pid, proc.pid, signal.SIGKILL)
            proc.wait()


# ---------------------------------------------------------------------- one run as a Parsl task
TASK_FILE = "TASK.json"   # written by the manager: the attempt this folder belongs to and its input files
KILL_FILE = "KILL"        # created by the manager: the task ends both processes at once


def run_pair(run_dir: str, ipi_argv: list[str], driver_argv: list[str], env: dict, attempt: int,
             exit_grace_s: float, partner_grace_s: float, socket_name: str) -> dict:
    """One sampling run's i-PI and ``nanosil-driver`` on the node of a Parsl worker (the ``sampling``
    pool), over a UNIX socket of that node, supervised as the manager supervises a local pair: after
    i-PI's ``EXIT`` file appears (the manager's request) i-PI gets ``exit_grace_s``, after one process ended
    the other gets ``partner_grace_s``, then both are ended. The driver sends its flagged frames to the
    manager's collector itself; the manager asks for the end through files in the shared run folder
    (``EXIT``, :data:`KILL_FILE`), so a task needs nothing but a shared file system and the flag endpoint.

    A retried task (its worker or node died) starts the run again from its inputs: the earlier try's
    pair, if it still runs on this node, is ended and its UNIX socket ``socket_name`` removed (i-PI refuses
    to bind over a socket file, and a dying i-PI unlinks the path on its way out), then the outputs of the
    earlier try are removed. A task whose folder no longer belongs to ``attempt`` (a resumed manager
    started the run again) ends at once. Returns ``{"ipi": rc, "driver": rc, "host": ..., "ended": why}``;
    the programs in the commands are names, found here on the worker (:func:`executable`)."""
    import json
    import socket as _socket

    folder = Path(run_dir)

    def task() -> dict:
        try:
            return json.loads((folder / TASK_FILE).read_text())
        except (OSError, ValueError):
            return {}

    def mine() -> bool:
        return task().get("attempt") == attempt

    record = task()
    if record.get("attempt") != attempt:
        return {"ipi": -1, "driver": -1, "host": _socket.gethostname(), "ended": "run folder taken over"}
    # the dead worker's pair got SIGTERM from die_with_parent but may still be shutting down
    token = env.get(OWNER_ENV)
    earlier = [p for p in tagged_processes(token) if cwd_is(p, folder)] if token else []
    end_processes(earlier, grace=exit_grace_s)
    remove_stale_socket(SOCKETS_PREFIX + socket_name)
    inputs = set(record["inputs"]) | {TASK_FILE}
    for path in folder.iterdir():  # an earlier try of this task: start from the inputs again
        if path.name not in inputs:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    full_env = {**os.environ, **env}
    procs = {}
    with open(folder / "ipi.log", "w") as ipi_log, open(folder / "driver.log", "w") as drv_log:
        for role, argv, log in (("ipi", ipi_argv, ipi_log), ("driver", driver_argv, drv_log)):
            procs[role] = subprocess.Popen(_programs(argv), cwd=folder, stdout=log,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                           start_new_session=True, preexec_fn=die_with_parent)
        ended, first_end, exit_seen = "", None, None
        while any(p.poll() is None for p in procs.values()):
            now = time.monotonic()
            if first_end is None and any(p.poll() is not None for p in procs.values()):
                first_end = now
            if exit_seen is None and (folder / "EXIT").exists():
                exit_seen = now
            why = ("stopped by the manager" if (folder / KILL_FILE).exists() or not mine() else
                   "still running after EXIT" if exit_seen is not None and now - exit_seen > exit_grace_s else
                   "partner ended" if first_end is not None and now - first_end > partner_grace_s else "")
            if why:
                ended = why
                _end_pair(list(procs.values()))
                break
            time.sleep(0.2)
    return {"ipi": procs["ipi"].returncode, "driver": procs["driver"].returncode,
            "host": _socket.gethostname(), "ended": ended}


_PROGRAMS = ("i-pi", "mpirun", "nanosil-driver")


def _programs(argv: list[str]) -> list[str]:
    """``argv`` with the programs of a pair (i-PI, mpirun and the driver it starts) as full paths on this
    machine (:func:`executable`)."""
    return [executable(a) if a in _PROGRAMS else a for a in argv]


class _TaskProcess:
    """What the event loop asks of a Popen (``poll``, ``returncode``, ``pid``) for one process of a pair
    that runs in a Parsl task (:func:`run_pair`): its return code comes with the task's result; a task that
    failed (also after its retries) counts as exit -1, with the reason in ``error``."""

    pid = None

    def __init__(self, future, role: str):
        self.future, self.role = future, role
        self.returncode: int | None = None
        self.error = ""

    def poll(self) -> int | None:
        if self.returncode is None and self.future.done():
            try:
                self.returncode = int(self.future.result()[self.role])
            except Exception as exc:  # the task itself failed: worker lost more often than retries allow
                self.returncode, self.error = -1, f"sampling task failed: {type(exc).__name__}: {exc}"[:300]
        return self.returncode


def _tail_reason(path: Path, keys=("error", "Error", "Traceback", "!W!", "exception")) -> str:
    """The most telling line of a log: the last one mentioning an error, else the last line."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if any(k in line for k in keys):
            return line[:300]
    return lines[-1][:300] if lines else "empty log"


# ---------------------------------------------------------------------- the iteration
class Sampler:
    """Runs one iteration's sampling; the state file records every step."""

    def __init__(self, state: State, iteration: int, specs: list[RunSpec], models_dir: str | os.PathLike,
                 iter_dir: str | os.PathLike, settings: SamplingSettings,
                 previous_iter_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print,
                 executor=None, slots: int | None = None, collector_keys: str | os.PathLike | None = None,
                 collector_host: str | None = None):
        """``executor``: a concurrent.futures-style executor (the Parsl ``sampling`` pool of
        :mod:`al_manager.execution`) that runs each pair as a :func:`run_pair` task in the shared run
        folder, ``slots`` of them at once (default ``parallel_runs``); without it, the pairs are child
        processes here. ``collector_keys``: a CurveZMQ keys folder (:func:`driver.flagging.create_zmq_keys`):
        the collector then listens on every interface and the drivers, on other hosts, connect to
        ``collector_host`` with those keys; without it, the collector listens on loopback only."""
        self.state = state
        self.iteration = int(iteration)
        self.specs = specs
        self.models_dir = Path(models_dir).resolve()
        self.iter_dir = Path(iter_dir)
        self.previous_iter_dir = Path(previous_iter_dir) if previous_iter_dir else None
        self.settings = settings
        self.log = log
        self.record = state.iteration_record(self.iteration)
        self.live: dict[str, _Live] = {}
        self.by_run_id: dict[str, str] = {}
        self.collector = None
        self.endpoint = ""
        self.executor = executor
        self.slots = int(slots or settings.parallel_runs) if executor is not None else settings.parallel_runs
        self.collector_keys = Path(collector_keys) if collector_keys else None
        self.collector_host = collector_host

    # -- bookkeeping ----------------------------------------------------------------------------
    def _run_record(self, spec: RunSpec) -> dict:
        runs = self.record["runs"]
        if spec.name not in runs:
            runs[spec.name] = {"structure": spec.structure, "temperature": spec.temperature,
                               "seed": self._seed(spec), "status": "pending", "attempt": 0, "frames": 0,
                               "reason": "", "start": "", "seconds": 0.0}
        return runs[spec.name]

    def _seed(self, spec: RunSpec) -> int:
        return int((self.settings.seed + 7919 * self.iteration + 104729 * spec.index) % (2**31))

    def _previous(self, spec: RunSpec) -> tuple[dict | None, Path | None]:
        if self.iteration <= 1 or self.previous_iter_dir is None:
            return None, None
        prev = self.state.data["iterations"].get(str(self.iteration - 1), {}).get("runs", {}).get(spec.name)
        return prev, self.previous_iter_dir / "runs" / spec.name

    # -- launching -------------------------------------------------------------------------------
    def _launch(self, spec: RunSpec, rec: dict) -> _Live:
        from ipi_inputs import render_input

        s = self.settings
        rec["attempt"] += 1
        run_dir = self.iter_dir / "runs" / spec.name
        if run_dir.exists():  # an attempt interrupted by a killed manager: start it again from scratch
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        previous, previous_dir = self._previous(spec)
        atoms, note = start_point(spec, previous, previous_dir)
        keep = bool(np.any(atoms.get_momenta()))
        socket_name = f"nsal-{self.state.token[:8]}-{self.iteration}-{spec.index}-{rec['attempt']}"
        render_input("al_sampling", run_dir, socket=f"unix:{socket_name}", steps=s.steps, seed=rec["seed"],
                     temperature=spec.temperature, structure=atoms, prefix=PREFIX,
                     velocities="keep" if keep else "thermal", timeout=s.socket_timeout_s,
                     timestep_fs=s.timestep_fs)
        rec["timestep_fs"] = s.timestep_fs
        run_id = f"{spec.name}.it{self.iteration:03d}.a{rec['attempt']}"
        ipi_argv = ["i-pi", f"{PREFIX}.xml"]
        # programs by name: found next to this Python here, or on the worker's side in a task (_programs)
        driver_argv = ["mpirun", "-n", str(s.mpi_ranks), "nanosil-driver",
                       "--models", str(self.models_dir), "--structure", f"{PREFIX}.init.xyz",
                       "--unix", socket_name, "--flag-endpoint", self.endpoint, "--run-id", run_id,
                       "--flag-file", "flagged_fallback.extxyz", "--threads", str(s.driver_threads),
                       "--dtype", s.dtype, "--log-every", str(s.log_every), *s.driver_flags()]
        if self.collector_keys is not None:
            driver_argv += ["--zmq-keys", str(self.collector_keys.resolve())]
        quota = max(0, self.settings.frames_per_run - rec["frames"])
        if self.executor is not None:
            import json

            (run_dir / TASK_FILE).write_text(json.dumps({"attempt": rec["attempt"],
                                                         "inputs": sorted(p.name for p in run_dir.iterdir())}))
            future = self.executor.submit(run_pair, str(run_dir.resolve()), ipi_argv, driver_argv,
                                          {OWNER_ENV: self.state.token, "OMP_NUM_THREADS": "1"}, rec["attempt"],
                                          s.exit_grace_s, s.partner_grace_s, socket_name)
            live = _Live(spec, run_dir, run_id, socket_name, quota, _TaskProcess(future, "ipi"),
                         _TaskProcess(future, "driver"))
        else:
            env = self.state.child_env()
            env.setdefault("OMP_NUM_THREADS", "1")
            ipi_log = open(run_dir / "ipi.log", "w")
            drv_log = open(run_dir / "driver.log", "w")
            procs = []
            for argv, log in ((ipi_argv, ipi_log), (driver_argv, drv_log)):
                procs.append(subprocess.Popen(_programs(argv), cwd=run_dir, stdout=log,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                              start_new_session=True, preexec_fn=die_with_parent))
                self.state.add_child(procs[-1].pid, argv[0], spec.name)
            live = _Live(spec, run_dir, run_id, socket_name, quota, *procs, logs=[ipi_log, drv_log])
        rec["status"], rec["start"], rec["reason"] = "running", note, ""
        self.state.save()
        self.by_run_id[run_id] = spec.name
        self.log(f"iteration {self.iteration}: start {spec.name} (attempt {rec['attempt']}, seed {rec['seed']}, "
                 f"{s.steps} steps max, wants {quota} frame(s)) from {note}")
        return live

    # -- receiving -------------------------------------------------------------------------------
    def _ignore(self) -> None:
        """Count a flagged frame that is not kept (the iteration's ``ignored_frames``)."""
        self.record["ignored_frames"] = self.record.get("ignored_frames", 0) + 1

    def _accept(self, message: dict) -> None:
        name = self.by_run_id.get(str(message.get("run_id")))
        live = self.live.get(name) if name else None
        if live is not None and message.get("kind") == "exploded":
            if not live.exploded:
                live.exploded = (f"{message.get('criterion')} std {float(message.get('measure', float('nan'))):.4g} >= "
                                 f"trust cap {message.get('trust_cap')} at step {message.get('step')}")
                live.request_exit("structure exploded")
            return
        if live is None or live.quota <= 0 or message.get("kind") != "uncertain":
            self._ignore()
            return
        spec, rec = live.spec, self.record["runs"][name]
        try:  # a frame without a step is taken for the start, and skipped
            step = int(message.get("step", 0))
        except (TypeError, ValueError):
            self._ignore()
            return
        # at least one step: step 0 is the start, a labelled structure (see _Live.last_flag_step)
        gap = max(1, int(round(self.settings.min_flag_gap_fs / self.settings.timestep_fs)))
        if 0 <= step - live.last_flag_step < gap:
            # the next steps of an uncertain frame are nearly the same structure: one label teaches as much
            self._ignore()
            return
        try:
            numbers = [int(z) for z in message["numbers"]]
            positions = np.asarray(message["positions"], dtype=float).reshape(len(numbers), 3)
        except (KeyError, TypeError, ValueError):
            self._ignore()
            return
        if not np.all(np.isfinite(positions)):
            self._ignore()
            return
        frame = {"id": f"{self.iteration:03d}-{name}-{rec['frames']}", "run": name, "run_id": live.run_id,
                 "structure": spec.structure, "temperature": spec.temperature,
                 "step": step, "numbers": numbers, "positions": positions.tolist(),
                 "energy_std_per_atom": message.get("energy_std_per_atom"),
                 "max_force_std": message.get("max_force_std"), "criterion": message.get("criterion"),
                 "model_version": message.get("model_version")}
        self.record["frames"].append(frame)
        rec["frames"] += 1
        live.quota -= 1
        live.last_flag_step = step
        self.state.save()  # the frame is safe before anything else happens
        measure = frame["max_force_std"] if frame["criterion"] == "force" else frame["energy_std_per_atom"]
        measure = float(measure) if isinstance(measure, (int, float)) else float("nan")
        unit = "eV/Å" if frame["criterion"] == "force" else "eV/atom"
        self.log(f"iteration {self.iteration}: {name} flagged step {frame['step']} "
                 f"({frame['criterion']} std {measure:.4g} {unit}); {rec['frames']} frame(s) from this run")
        if live.quota <= 0:
            live.request_exit(f"{rec['frames']} uncertain frame(s) collected")

    # -- ending ----------------------------------------------------------------------------------
    def _supervise(self, live: _Live) -> None:
        """Ask, then make, a run stop when it should; called on every pass of the event loop."""
        s, now = self.settings, time.monotonic()
        if live.exit_requested is None and s.max_wall_s and now - live.started > s.max_wall_s:
            live.request_exit(f"wall-clock limit {s.max_wall_s:g} s")
        ipi_done, drv_done = live.ipi.poll() is not None, live.driver.poll() is not None
        if (ipi_done or drv_done) and live.ended_one is None:
            live.ended_one = now
        late_exit = live.exit_requested is not None and now - live.exit_requested > s.exit_grace_s
        # a driver that failed at start-up leaves i-PI waiting for a client forever: end it
        late_pair = live.ended_one is not None and now - live.ended_one > s.partner_grace_s
        if (late_exit or late_pair) and live.alive():
            self.log(f"iteration {self.iteration}: {live.spec.name}: "
                     f"{'i-PI' if not ipi_done else 'the driver'} still running "
                     f"{'after EXIT' if late_exit else 'after the other ended'}; ending it")
            live.kill()

    def _finish(self, live: _Live) -> None:
        spec, rec = live.spec, self.record["runs"][live.spec.name]
        rc_ipi, rc_drv = live.ipi.returncode, live.driver.returncode
        live.close_logs()
        for proc in (live.ipi, live.driver):
            self.state.data["children"] = [c for c in self.state.data["children"] if c["pid"] != proc.pid]
        # the driver's MPI ranks may outlive mpirun by a moment: none of this run may be left
        leftovers = [] if live.remote else [p for p in tagged_processes(self.state.token) if cwd_is(p, live.run_dir)]
        if leftovers:
            end_processes(leftovers, grace=5.0)
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.monotonic() - live.started, 1)
        steps = _last_step(live.run_dir / f"{PREFIX}.out")
        rec["steps"] = steps
        if live.exploded:
            rec["status"], rec["reason"] = "exploded", f"structure exploded: {live.exploded}"
        elif rc_ipi == 0 and rc_drv == 0:
            rec["status"] = "done"
            rec["reason"] = live.why_stop or f"maximum MD time ({steps} steps)"
        elif live.remote and live.ipi.error:
            rec["status"], rec["reason"] = "crashed", live.ipi.error
        else:
            which = []
            if rc_drv != 0:
                which.append(f"driver exit {rc_drv}: {_tail_reason(live.run_dir / 'driver.log')}")
            if rc_ipi != 0:
                which.append(f"i-PI exit {rc_ipi}: {_tail_reason(live.run_dir / 'ipi.log')}")
            rec["status"], rec["reason"] = "crashed", "; ".join(which)
        self.state.save()
        self.log(f"iteration {self.iteration}: {spec.name} {rec['status']} after {steps} steps "
                 f"({rec['seconds']:.0f} s, {rec['frames']} frame(s)): {rec['reason']}")

    def _receive(self, timeout_ms: int) -> list[dict]:
        """Wait up to ``timeout_ms`` for a message, then take what is queued (never blocks while runs keep
        flagging every step)."""
        if not self.collector.socket.poll(timeout_ms):
            return []
        return self.collector.receive(timeout_ms=0)

    # -- the event loop --------------------------------------------------------------------------
    def run(self) -> dict:
        """Sample until every run has ended; returns the iteration record (also in the state)."""
        from driver.flagging import FlagCollector

        import zmq

        todo = []
        for spec in self.specs:
            rec = self._run_record(spec)
            if rec["status"] in ("done", "crashed", "exploded"):
                continue
            if rec["status"] in ("running", "stopping"):
                self.log(f"iteration {self.iteration}: {spec.name} was interrupted (attempt {rec['attempt']}); "
                         f"starting it again")
            if rec["frames"] >= self.settings.frames_per_run:
                rec["status"], rec["reason"] = "done", f"{rec['frames']} uncertain frame(s) collected before a restart"
                continue
            rec["status"] = "pending"
            todo.append(spec)
        self.state.save()
        if not todo:
            return self.record
        if self.collector_keys is None:
            self.collector = FlagCollector("tcp://127.0.0.1:*")
            self.endpoint = self.collector.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        else:  # drivers on other hosts: CurveZMQ, only the workdir's client key is accepted
            self.collector = FlagCollector("tcp://0.0.0.0:*", keys_dir=self.collector_keys, log=self.log)
            port = self.collector.socket.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1]
            self.endpoint = f"tcp://{self.collector_host}:{port}"
        try:
            while todo or self.live:
                while todo and len(self.live) < self.slots:
                    spec = todo.pop(0)
                    rec = self.record["runs"][spec.name]
                    try:
                        self.live[spec.name] = self._launch(spec, rec)
                    except (ValueError, FileNotFoundError, OSError) as exc:
                        rec["status"], rec["reason"] = "crashed", f"could not start: {exc}"
                        self.state.save()
                        self.log(f"iteration {self.iteration}: {spec.name} crashed: could not start: {exc}")
                for message in self._receive(200):
                    self._accept(message)
                for name, live in list(self.live.items()):
                    self._supervise(live)
                    if not live.alive():
                        # frames still on the wire from this run arrive within the driver's linger
                        for message in self._receive(100):
                            self._accept(message)
                        self._finish(live)
                        del self.live[name]
        finally:
            for live in self.live.values():  # an exception or a signal: no run may outlive the manager
                live.kill()
                live.close_logs()
                for proc in (live.ipi, live.driver):
                    self.state.data["children"] = [c for c in self.state.data["children"] if c["pid"] != proc.pid]
            self.live.clear()
            self.state.save()
            self.collector.close()
        return self.record


def frames_as_atoms(record: dict) -> list[Atoms]:
    """The iteration's flagged frames as Atoms (``info``: cluster, temperature, frame id)."""
    out = []
    for f in record.get("frames", []):
        atoms = Atoms(numbers=f["numbers"], positions=f["positions"])
        atoms.info.update({"cluster": f["structure"], "temperature": float(f["temperature"]), "frame": f["id"]})
        out.append(atoms)
    return out


def summarize(record: dict) -> dict:
    runs = record.get("runs", {}).values()
    count = {k: sum(1 for r in runs if r["status"] == k) for k in ("done", "crashed", "exploded")}
    return {"runs": len(record.get("runs", {})), **count, "frames": len(record.get("frames", [])),
            "ignored": int(record.get("ignored_frames", 0)),
            "md_ps": round(sum((r.get("steps") or 0) * r.get("timestep_fs", _RECORDED_BEFORE_TIMESTEP_FS)
                               for r in runs) / 1000.0, 3)}


def _last_step(out_file: Path) -> int:
    """The last step i-PI wrote in its properties file (0 when none)."""
    try:
        with open(out_file, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip() and not ln.startswith("#")]
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(float(line.split()[0]))
        except (ValueError, IndexError):
            continue
    return 0


__all__ = ["SamplingSettings", "RunSpec", "Sampler", "plan_runs",
           "start_point", "frames_as_atoms", "summarize"]
