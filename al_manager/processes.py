"""Child processes, in one place: executables, the child environment, spawning children that die with
their parent, and ending children and orphans. Two ways to recognise our own processes after a crash:
by an owner tag in the environment (``NANOSIL_AL_OWNER``, the active-learning manager: it also finds MPI
ranks and workers that were never recorded) and by pid + kernel start time (campaigns: one recorded
process, safe against pid reuse). Linux ``/proc`` is read for both; elsewhere they find nothing."""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket as socketlib
import sys
import time
from pathlib import Path

OWNER_ENV = "NANOSIL_AL_OWNER"
# BLAS/OpenMP threads of every child: parallelism comes from processes (see ../shared/notes), never oversubscribe
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---------------------------------------------------------------------- executables and environment
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


def child_env(threads: int = 1, base: dict | None = None) -> dict:
    """The environment of a child: ``base`` (default ``os.environ``) with ``threads`` BLAS/OpenMP threads
    and this Python's bin folder first on PATH (so ``i-pi``, ``mpirun`` and ``nanosil-driver`` of the same
    environment are found)."""
    env = dict(os.environ if base is None else base)
    env.update({name: str(threads) for name in THREAD_VARS})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# ---------------------------------------------------------------------- ending processes
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
    """SIGTERM each, wait up to ``grace`` s, SIGKILL what is left and wait (up to 5 s) until it is gone, so
    that what it held (a listening socket, a file lock) is released on return; returns the PIDs that had to
    be killed."""
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
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(is_running(p) for p in killed):
        time.sleep(0.01)
    return killed


def parsl_interchanges(run_dir: str | os.PathLike) -> list[int]:
    """Live Parsl interchanges ("parsl: HTEX interchange") with a file open under ``run_dir`` (their log):
    those of a manager of that run folder. Parsl starts them without our owner tag, and one whose manager
    was SIGKILLed lives on, so they are found by what they hold open."""
    root = str(Path(run_dir).resolve()) + os.sep
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read().startswith(b"parsl: HTEX interchange"):
                    continue
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(root):
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def end_orphans(state, grace: float = 5.0) -> list[int]:
    """End every process a previous (killed) manager of this work directory left behind: the recorded
    children's process groups, then anything else that carries the work directory's tag (MPI ranks,
    label and training workers). Clears ``state['children']``. Returns the PIDs that were found alive."""
    found = []
    for child in state.data.get("children", []):
        pid, pgid = int(child["pid"]), int(child.get("pgid") or 0)
        if is_running(pid) and carries_token(pid, state.token):
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


def carries_token(pid: int, token: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{OWNER_ENV}={token}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """For ``subprocess.Popen(preexec_fn=...)``: the child gets ``sig`` when the manager dies, even by
    SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``); a no-op where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # pragma: no cover - not Linux
        pass


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None: with the pid it identifies a
    process even after its pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def end_process(pid: int | None, started: int | None, grace: float = 30.0) -> bool:
    """SIGTERM (then SIGKILL after ``grace`` s) the process ``pid`` if it is still the one that started at
    ``started``; True when one was ended."""
    if not pid or started is None or start_time(pid) != started:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if start_time(pid) != started:
            return True
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


def cwd_is(pid: int, folder: Path) -> bool:
    """True when ``pid`` runs in ``folder`` (to tell one run's leftovers from another's)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == folder.resolve()
    except OSError:
        return False


def remove_stale_socket(path: str) -> None:
    """Remove a UNIX socket file nobody listens on (left by a killed i-PI); refuse to touch a live one."""
    probe = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise RuntimeError(f"an i-PI server is still listening on {path}; is another campaign using this folder?")


def end_pool(pool) -> None:
    """End a concurrent.futures process pool now (SIGTERM, Ctrl-C, an error): its workers are terminated
    rather than awaited, so no worker (and, with them gone, no multiprocessing resource tracker) outlives
    its owner. Results in flight are lost."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    try:
        pool.shutdown(wait=bool(processes), cancel_futures=True)
    except Exception:  # pragma: no cover - a pool broken by the terminated workers
        pass
    for proc in processes:
        proc.join(timeout=5)
        if proc.is_alive():  # pragma: no cover - ignores SIGTERM
            proc.kill()
            proc.join(timeout=5)
