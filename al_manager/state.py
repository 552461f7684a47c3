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
  still carries this work directory's tag belonged to a killed manager and is ended (:func:`end_orphans`);
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
import signal
import tempfile
import time
from pathlib import Path

SCHEMA = "nanosil.al-state/1"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
OWNER_ENV = "NANOSIL_AL_OWNER"


class WorkdirBusy(RuntimeError):
    """Another manager holds the work directory's lock."""


# ---------------------------------------------------------------------- atomic files
def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and ``os.replace``: a crash leaves the
    old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - filesystems without directory fsync
        pass


def write_json_atomic(path: str | os.PathLike, data) -> None:
    write_atomic(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


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
        write_json_atomic(self.workdir / STATE_FILE, self.data)

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


# ---------------------------------------------------------------------- processes
def _proc_state(pid: int) -> str | None:
    """The one-letter state of a process ('R', 'S', 'Z', ...), None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text.rpartition(")")[2].split()[0]


def is_running(pid: int) -> bool:
    """True for a live process (zombies, which only wait to be reaped, are not running)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def tagged_processes(token: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """PIDs of live processes whose environment carries ``NANOSIL_AL_OWNER=token`` (Linux /proc)."""
    needle = f"{OWNER_ENV}={token}".encode()
    skip = {os.getpid(), *exclude}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in skip:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except (OSError, ProcessLookupError):
            continue
        if needle in env.split(b"\0") and is_running(int(entry)) and not _own_resource_tracker(int(entry)):
            found.append(int(entry))
    return sorted(found)


def _own_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker of this very process (label workers start it): it ends with us,
    and ending it early only makes multiprocessing start another."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rpartition(")")[2].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, ValueError, IndexError):
        return False
    return ppid == os.getpid() and b"multiprocessing.resource_tracker" in cmd


def signal_group_or_pid(pid: int, pgid: int | None, sig: int) -> None:
    """Send ``sig`` to the process group ``pgid`` (when it is the child's own group) or else to ``pid``."""
    try:
        if pgid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def end_processes(pids: list[int], grace: float = 5.0) -> list[int]:
    """SIGTERM each, wait up to ``grace`` s, SIGKILL what is left; returns the PIDs that had to be killed."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if is_running(p)]
    for pid in killed:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def end_orphans(state: State, grace: float = 5.0) -> list[int]:
    """End every process a previous (killed) manager of this work directory left behind: the recorded
    children's process groups, then anything else that carries the work directory's tag (MPI ranks,
    label and training workers). Clears ``state['children']``. Returns the PIDs that were found alive."""
    found = []
    for child in state.data.get("children", []):
        pid, pgid = int(child["pid"]), int(child.get("pgid") or 0)
        if is_running(pid) and _carries_token(pid, state.token):
            found.append(pid)
            signal_group_or_pid(pid, pgid, signal.SIGTERM)
    tagged = tagged_processes(state.token)
    found += [p for p in tagged if p not in found]
    if found:
        end_processes(sorted(set(found) | set(tagged)), grace=grace)
        # a process may have forked while we were signalling: one more sweep
        late = tagged_processes(state.token)
        if late:
            end_processes(late, grace=1.0)
    if state.data.get("children"):
        state.data["children"] = []
        state.save()
    return sorted(set(found))


def _carries_token(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{OWNER_ENV}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def set_parent_death_signal(sig: int = signal.SIGTERM) -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child gets ``sig`` when the manager dies, even by
    SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``); a no-op where unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # pragma: no cover - not Linux
        pass
