"""The work directory's state: one JSON file, rewritten atomically after every step, and the child
processes the manager started (so that a restarted manager can end the ones a killed manager left).

``WORKDIR/state.json`` (schema ``nanosil.al-state/1``) holds everything the manager needs to resume:

- ``phase``: ``initial_data`` -> ``initial_label`` -> ``initial_train`` -> ``measure`` (iteration 0), then per
  iteration ``sampling`` -> ``labelling`` -> ``training`` -> ``measure``; ``done`` when a stopping rule fired;
- ``iteration`` (0 = the initial committee) and, per iteration, the sampling runs (status, attempts, frames
  received, crash reasons), the flagged frames (positions in Å, so labelling can resume from them), which
  of them were labelled or failed, and the measured errors;
- ``children``: PID, process group and role of every i-PI and ``mpirun`` process alive at the last write;
- ``token``: a random tag put into the environment (``NANOSIL_AL_OWNER``) of every process the manager
  starts, directly or not (MPI ranks, label and training workers inherit it). On resume, any process that
  still carries this work directory's tag belonged to a killed manager and is ended (:func:`al_manager.processes.end_orphans`);
  the tag, unlike a PID, cannot be reused by an unrelated process.

A lock (``fcntl.flock`` on ``WORKDIR/.lock``, released by the kernel even on SIGKILL) keeps two managers off
one work directory.
"""
from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import secrets
import time
from pathlib import Path

from spectra.atomic import write_json

from al_manager.processes import OWNER_ENV

SCHEMA = "nanosil.al-state/1"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another manager holds the work directory's lock."""


# ---------------------------------------------------------------------- atomic files
# ---------------------------------------------------------------------- the state
def _new_state() -> dict:
    return {
        "schema": SCHEMA,
        "token": secrets.token_hex(8),
        "created": time.time(),
        "updated": time.time(),
        "phase": "initial_data",
        "iteration": 0,
        "config": None,          # path and digest of the config that created the work directory
        "initial": {},           # n_frames, labelled, failed, model
        "iterations": {},        # "1": {"runs": {...}, "frames": [...], ...}
        "children": [],          # [{"pid", "pgid", "role", "run"}]
        "best_mae": None,
        "since_best": 0,
        "stop_reason": None,
    }


class State:
    """The parsed ``state.json`` of a work directory; :meth:`save` after every step."""

    def __init__(self, workdir: str | os.PathLike, data: dict):
        self.workdir = Path(workdir)
        self.data = data

    # -- loading and saving ----------------------------------------------------------------------
    @classmethod
    def load(cls, workdir: str | os.PathLike, create: bool = False) -> "State":
        workdir = Path(workdir)
        path = workdir / STATE_FILE
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"{path} does not exist: {workdir} is not an active-learning work "
                                        f"directory (start one with `nanosil al init CONFIG.toml`)")
            workdir.mkdir(parents=True, exist_ok=True)
            state = cls(workdir, _new_state())
            state.save()
            return state
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc}); the file is written atomically, so it was "
                             f"edited or damaged by hand") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ValueError(f"{path}: not a nanosil active-learning state (schema {SCHEMA} expected)")
        return cls(workdir, data)

    def save(self) -> None:
        self.data["updated"] = time.time()
        write_json(self.workdir / STATE_FILE, self.data)

    # -- convenience ----------------------------------------------------------------------------
    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def token(self) -> str:
        return self.data["token"]

    @property
    def phase(self) -> str:
        return self.data["phase"]

    @property
    def iteration(self) -> int:
        return int(self.data["iteration"])

    def set_phase(self, phase: str, iteration: int | None = None) -> None:
        self.data["phase"] = phase
        if iteration is not None:
            self.data["iteration"] = int(iteration)
        self.save()

    def iteration_record(self, iteration: int) -> dict:
        """The record of iteration ``iteration`` (>= 1), created empty when missing."""
        rec = self.data["iterations"].setdefault(str(int(iteration)), {
            "runs": {}, "frames": [], "labelled": [], "label_failed": [], "label_done": False,
            "model": None, "measured": None, "ignored_frames": 0})
        return rec

    def snapshot(self) -> dict:
        return copy.deepcopy(self.data)

    # -- children -------------------------------------------------------------------------------
    def add_child(self, pid: int, role: str, run: str = "") -> None:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            pgid = pid
        self.data["children"].append({"pid": int(pid), "pgid": int(pgid), "role": role, "run": run,
                                      "started": time.time()})
        self.save()

    def remove_child(self, pid: int) -> None:
        before = len(self.data["children"])
        self.data["children"] = [c for c in self.data["children"] if c["pid"] != pid]
        if len(self.data["children"]) != before:
            self.save()

    def child_env(self, base: dict | None = None) -> dict:
        """The environment for a child process: ``base`` (default ``os.environ``) plus the owner tag."""
        env = dict(os.environ if base is None else base)
        env[OWNER_ENV] = self.token
        return env


# ---------------------------------------------------------------------- the lock
class WorkdirLock:
    """Exclusive ``flock`` on ``WORKDIR/.lock``; the kernel drops it when the holder dies (SIGKILL too)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                try:
                    holder = self.path.read_text().strip()
                except OSError:
                    pass
                raise WorkdirBusy(f"another active-learning manager{f' (PID {holder})' if holder else ''} is "
                                  f"running on {self.path.parent}; wait for it or stop it first") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
