"""One active-learning iteration's sampling: parallel i-PI runs, each served by its own ``mpirun
nanosil-driver``, and one ZMQ PULL socket that collects the frames the committee is unsure about.

For every (structure, temperature) a run folder ``ITERDIR/runs/NAME`` gets an i-PI input rendered from
``ipi_inputs/al_sampling.xml`` (:func:`ipi_inputs.render_input`). Runs start in their own process groups,
at most ``max_parallel`` at a time. A run ends when

- it has delivered ``frames_per_run`` uncertain frames: the manager creates i-PI's ``EXIT`` file, i-PI stops
  after the current step and writes its ``RESTART`` checkpoint, tells the driver to exit, and both are
  waited for (status ``done``);
- i-PI reaches the maximum MD time (``done``, no frame);
- the committee's disagreement passes the upper cap (the driver reports an exploded structure): stopped
  through ``EXIT`` (status ``exploded``); or i-PI or the driver fails (``crashed``, with the reason from the
  logs). Crashed and exploded runs are recorded and the iteration goes on with the others.

The next iteration continues every run from its previous i-PI checkpoint (positions and velocities;
:func:`ipi_inputs.render_input` removes the centre-of-mass translation and the rotation) at the same
temperature; a run whose previous attempt crashed or exploded, or whose checkpoint is unusable, restarts
from the reference structure with fresh thermal velocities.

Durability: every received frame and every change of a run's status is written to the state file at once
(:class:`al_manager.state.State`). A run interrupted by a killed manager is started again (same seed, same
start point) and only needs the frames it still lacks, so an interrupted iteration delivers the same
number of frames as an uninterrupted one.
"""
from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units

from .state import State, end_processes, set_parent_death_signal, signal_group_or_pid, tagged_processes

PREFIX = "simulation"                     # i-PI output prefix inside a run folder
TIMESTEP_FS = 0.5                         # al_sampling.xml's time step
_AU_VELOCITY = units.Bohr / (units._aut * units.second)   # i-PI velocity unit in ASE units
_EXPLODED_MARK = "structure exploded"     # what nanosil-driver prints for an exploded structure


@dataclass
class SamplingSettings:
    """What one iteration's sampling needs (filled from the typed TOML config by :mod:`al_manager.loop`)."""

    max_md_ps: float = 5.0                 # maximum MD time per run and iteration (paper: 5 ps)
    frames_per_run: int = 1                # stop a run once it delivered this many uncertain frames
    max_parallel: int = 1                  # i-PI runs at once
    mpi_ranks: int = 1                     # ranks per nanosil-driver (mpirun -n)
    energy_threshold: float | None = None  # eV/atom (calibrated committee std)
    force_threshold: float | None = None   # eV/Å; takes precedence over the energy threshold
    upper_cap: float | None = None         # same unit as the criterion in use: exploded at or above
    driver_threads: int = 1                # torch threads per rank
    dtype: str = "float32"
    seed: int = 12345
    socket_timeout_s: float = 300.0        # i-PI declares a silent driver dead after this
    exit_grace_s: float = 60.0             # after EXIT, time i-PI gets to finish its step and checkpoint
    partner_grace_s: float = 10.0          # after i-PI or the driver ended, time the other gets to follow
    max_wall_s: float | None = None        # hard wall-clock limit of one run (None: the MD length decides)
    log_every: int = 1000                  # driver progress line every this many steps

    @property
    def steps(self) -> int:
        return max(1, int(round(self.max_md_ps * 1000.0 / TIMESTEP_FS)))


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


# ---------------------------------------------------------------------- checkpoints
def read_ipi_checkpoint(path: str | os.PathLike) -> Atoms:
    """Positions (Å) and velocities (ASE units) of the first bead of an i-PI checkpoint (``RESTART`` or a
    ``<checkpoint>`` file). Raises ValueError when the file is not a readable checkpoint."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"i-PI checkpoint {path}: {exc}") from None
    beads = root.find("./system/beads")
    if beads is None:
        raise ValueError(f"i-PI checkpoint {path}: no <system><beads> element")

    def array(tag: str) -> np.ndarray:
        node = beads.find(tag)
        if node is None or node.text is None:
            raise ValueError(f"i-PI checkpoint {path}: no <{tag}> in <beads>")
        return np.array([float(x) for x in node.text.strip().strip("[]").split(",") if x.strip()])

    natoms = int(beads.get("natoms"))
    q = array("q")[: 3 * natoms].reshape(natoms, 3)          # Bohr
    p = array("p")[: 3 * natoms].reshape(natoms, 3)          # atomic units of momentum
    m = array("m")[:natoms]                                  # electron masses
    names_node = beads.find("names")
    if names_node is None or names_node.text is None:
        raise ValueError(f"i-PI checkpoint {path}: no <names> in <beads>")
    names = [s.strip() for s in names_node.text.strip().strip("[]").split(",") if s.strip()]
    if len(names) != natoms or not np.all(m > 0):
        raise ValueError(f"i-PI checkpoint {path}: inconsistent atoms")
    # the simulation's own masses (i-PI's table differs from ASE's in the 5th digit): velocities then
    # survive any later set_masses(i-PI masses) unchanged, and momenta stay those of the checkpoint
    atoms = Atoms(symbols=names, positions=q * units.Bohr, masses=m * units._me / units._amu)
    atoms.set_velocities((p / m[:, None]) * _AU_VELOCITY)
    if not (np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(atoms.get_velocities()))):
        raise ValueError(f"i-PI checkpoint {path}: non-finite positions or velocities")
    return atoms


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The run's final checkpoint (``RESTART``, written when i-PI ends) or else its periodic one."""
    run_dir = Path(run_dir)
    for name in ("RESTART", f"{PREFIX}.chk"):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def sane_geometry(atoms: Atoms, reference: Atoms) -> str | None:
    """None when ``atoms`` still looks like the cluster ``reference``; else why not (for the log)."""
    if len(atoms) != len(reference) or list(atoms.numbers) != list(reference.numbers):
        return "atoms differ from the reference structure"
    d = np.linalg.norm(atoms.positions[:, None] - atoms.positions[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    if d.min() < 0.6:
        return f"atoms {d.min():.2f} Å apart"
    spread = np.linalg.norm(atoms.positions - atoms.positions.mean(0), axis=1).max()
    ref_spread = np.linalg.norm(reference.positions - reference.positions.mean(0), axis=1).max()
    if spread > ref_spread + 4.0:
        return f"an atom {spread:.1f} Å from the centre (reference {ref_spread:.1f} Å)"
    return None


def start_point(spec: RunSpec, previous: dict | None, previous_dir: Path | None) -> tuple[Atoms, str]:
    """The start structure of a run (with velocities when continuing) and a note for the log."""
    from ipi_inputs import read_cluster

    reference = read_cluster(spec.path)
    if previous is None or previous_dir is None:
        return reference, "reference structure, thermal velocities"
    if previous.get("status") != "done":
        return reference, (f"reference structure, thermal velocities (previous run {previous.get('status')}: "
                           f"{previous.get('reason') or 'no reason recorded'})")
    chk = latest_checkpoint(previous_dir)
    if chk is None:
        return reference, "reference structure, thermal velocities (previous run left no checkpoint)"
    try:
        atoms = read_ipi_checkpoint(chk)
    except ValueError as exc:
        return reference, f"reference structure, thermal velocities ({exc})"
    why = sane_geometry(atoms, reference)
    if why is not None:
        return reference, f"reference structure, thermal velocities (checkpoint unusable: {why})"
    return atoms, f"checkpoint {chk.parent.parent.parent.name}/{chk.parent.name}/{chk.name} (positions and velocities)"


# ---------------------------------------------------------------------- executables
def executable(name: str) -> str:
    """``name`` next to this Python (a virtual environment's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH (is the environment "
                                f"installed? `make install`)")
    return found


# ---------------------------------------------------------------------- one run's processes
@dataclass
class _Live:
    spec: RunSpec
    run_dir: Path
    run_id: str
    socket_name: str
    quota: int                       # frames still wanted from this attempt
    ipi: subprocess.Popen
    driver: subprocess.Popen
    logs: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    exit_requested: float | None = None
    why_stop: str = ""
    exploded: bool = False
    ended_one: float | None = None   # when the first of the two processes ended
    log_pos: int = 0

    def request_exit(self, why: str) -> None:
        if self.exit_requested is None:
            (self.run_dir / "EXIT").touch()
            self.exit_requested = time.monotonic()
            self.why_stop = why

    def alive(self) -> bool:
        return self.ipi.poll() is None or self.driver.poll() is None

    def check_exploded(self) -> bool:
        """Scan the new part of the driver's log for its 'structure exploded' report."""
        path = self.run_dir / "driver.log"
        try:
            with open(path, "rb") as f:
                f.seek(self.log_pos)
                chunk = f.read()
        except OSError:
            return self.exploded
        # keep a little overlap so that a line split between reads is still seen
        self.log_pos += max(0, len(chunk) - 64)
        if _EXPLODED_MARK.encode() in chunk:
            self.exploded = True
        return self.exploded

    def kill(self) -> None:
        for proc in (self.ipi, self.driver):
            if proc.poll() is None:
                signal_group_or_pid(proc.pid, proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        for proc in (self.ipi, self.driver):
            if proc.poll() is None:
                signal_group_or_pid(proc.pid, proc.pid, signal.SIGKILL)
                proc.wait()

    def close_logs(self) -> None:
        for f in self.logs:
            f.close()
        sock = Path(f"/tmp/ipi_{self.socket_name}")
        if sock.exists():
            try:
                sock.unlink()
            except OSError:
                pass


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
                 previous_iter_dir: str | os.PathLike | None = None, log: Callable[[str], None] = print):
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
                     velocities="keep" if keep else "thermal", timeout=s.socket_timeout_s)
        run_id = f"{spec.name}.it{self.iteration:03d}.a{rec['attempt']}"
        env = self.state.child_env()
        env.setdefault("OMP_NUM_THREADS", "1")
        ipi_log = open(run_dir / "ipi.log", "w")
        drv_log = open(run_dir / "driver.log", "w")
        ipi = subprocess.Popen([executable("i-pi"), f"{PREFIX}.xml"], cwd=run_dir, stdout=ipi_log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               start_new_session=True, preexec_fn=set_parent_death_signal)
        self.state.add_child(ipi.pid, "i-pi", spec.name)
        cmd = [executable("mpirun"), "-n", str(s.mpi_ranks), executable("nanosil-driver"),
               "--models", str(self.models_dir), "--structure", f"{PREFIX}.init.xyz",
               "--unix", socket_name, "--flag-endpoint", self.endpoint, "--run-id", run_id,
               "--flag-file", "flagged_fallback.extxyz", "--threads", str(s.driver_threads),
               "--dtype", s.dtype, "--log-every", str(s.log_every)]
        if s.force_threshold is not None:
            cmd += ["--force-threshold", f"{s.force_threshold:.10g}"]
        if s.energy_threshold is not None:
            cmd += ["--energy-threshold", f"{s.energy_threshold:.10g}"]
        if s.upper_cap is not None:
            cmd += ["--upper-cap", f"{s.upper_cap:.10g}"]
        driver = subprocess.Popen(cmd, cwd=run_dir, stdout=drv_log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                  preexec_fn=set_parent_death_signal)
        self.state.add_child(driver.pid, "mpirun", spec.name)
        quota = max(0, self.settings.frames_per_run - rec["frames"])
        live = _Live(spec, run_dir, run_id, socket_name, quota, ipi, driver, logs=[ipi_log, drv_log])
        rec["status"], rec["start"], rec["reason"] = "running", note, ""
        self.state.save()
        self.by_run_id[run_id] = spec.name
        self.log(f"iteration {self.iteration}: start {spec.name} (attempt {rec['attempt']}, seed {rec['seed']}, "
                 f"{s.steps} steps max, wants {quota} frame(s)) from {note}")
        return live

    # -- receiving -------------------------------------------------------------------------------
    def _accept(self, message: dict) -> None:
        name = self.by_run_id.get(str(message.get("run_id")))
        live = self.live.get(name) if name else None
        # step 0 is the start configuration: the reference minimum (part of the initial data) or where the
        # previous iteration stopped, right after its own flagged frame; labelling it again teaches nothing
        if live is None or live.quota <= 0 or message.get("kind") != "uncertain" or int(message.get("step", 0)) == 0:
            self.record["ignored_frames"] = self.record.get("ignored_frames", 0) + 1
            return
        spec, rec = live.spec, self.record["runs"][name]
        try:
            numbers = [int(z) for z in message["numbers"]]
            positions = np.asarray(message["positions"], dtype=float).reshape(len(numbers), 3)
        except (KeyError, TypeError, ValueError):
            self.record["ignored_frames"] = self.record.get("ignored_frames", 0) + 1
            return
        if not np.all(np.isfinite(positions)):
            self.record["ignored_frames"] = self.record.get("ignored_frames", 0) + 1
            return
        frame = {"id": f"{self.iteration:03d}-{name}-{rec['frames']}", "run": name, "run_id": live.run_id,
                 "structure": spec.structure, "temperature": spec.temperature,
                 "step": int(message.get("step", -1)), "numbers": numbers, "positions": positions.tolist(),
                 "energy_std_per_atom": message.get("energy_std_per_atom"),
                 "max_force_std": message.get("max_force_std"), "criterion": message.get("criterion"),
                 "model_version": message.get("model_version")}
        self.record["frames"].append(frame)
        rec["frames"] += 1
        live.quota -= 1
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
        if live.exit_requested is None and live.check_exploded():
            live.request_exit("structure exploded")
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
        leftovers = [p for p in tagged_processes(self.state.token) if _cwd_is(p, live.run_dir)]
        if leftovers:
            end_processes(leftovers, grace=5.0)
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.monotonic() - live.started, 1)
        steps = _last_step(live.run_dir / f"{PREFIX}.out")
        rec["steps"] = steps
        if live.check_exploded():
            rec["status"], rec["reason"] = "exploded", _tail_reason(live.run_dir / "driver.log", (_EXPLODED_MARK,))
        elif rc_ipi == 0 and rc_drv == 0:
            rec["status"] = "done"
            rec["reason"] = live.why_stop or f"maximum MD time ({steps} steps)"
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
        self.collector = FlagCollector("tcp://127.0.0.1:*")
        self.endpoint = self.collector.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        try:
            while todo or self.live:
                while todo and len(self.live) < max(1, self.settings.max_parallel):
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
            "md_ps": round(sum((r.get("steps") or 0) for r in runs) * TIMESTEP_FS / 1000.0, 3)}


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


def _cwd_is(pid: int, folder: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == folder.resolve()
    except OSError:
        return False


__all__ = ["SamplingSettings", "RunSpec", "Sampler", "plan_runs", "read_ipi_checkpoint", "latest_checkpoint",
           "start_point", "frames_as_atoms", "summarize", "executable"]
