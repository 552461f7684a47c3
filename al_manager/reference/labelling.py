"""Parallel, failure-safe labelling of many structures into the dataset (an ASE SQLite database).

The active-learning manager and ``nanosil label`` call :func:`label_structures`::

    from al_manager.reference.labelling import label_structures
    report = label_structures(frames, "xtb", "data.db", workers=2,
                              metadata={"origin": "al_iter_003"})   # or one dict per frame
    report.n_labelled, report.n_skipped, report.n_failed, report.failures

What it guarantees:

* every frame is checked before any calculation (atoms closer than 0.5 Å, elements the method cannot
  treat, odd electron count without a multiplicity): one bad frame refuses the whole batch with a
  ValueError naming the frame;
* identical structures (:func:`driver.data.structure_hash` of numbers, positions and method) are never
  computed twice: neither those already in the database nor repeats inside the batch; structures that
  already failed with the same method are skipped too unless ``retry_failed=True``;
* each finished label is written at once, in its own transaction (``driver.data.add_labelled``): a crash
  loses at most the calculations in flight;
* a failure (SCF not converged after the backend's retries, a program crash, an exception in a worker,
  a worker process that dies) goes to the ``failed`` table of the same SQLite file with its reason, and
  the batch goes on.

Interruption: when the call is left by an exception (SIGTERM turned into SystemExit by the caller, Ctrl-C,
an error) the pool's workers are terminated at once, not awaited; pool workers also end when the labelling
process dies (``PR_SET_PDEATHSIG``), so a SIGKILL leaves no worker behind.

Parallelism: ``executor="process"`` (default) runs a local pool of ``workers`` processes with ``threads``
OpenMP threads each, ``workers x threads = cores`` unless given; ``executor="mpi"`` uses
``mpi4py.futures.MPIPoolExecutor`` for multi-node runs (start with
``mpiexec -n 65 python -m mpi4py.futures script.py``); ``executor="serial"`` computes in the calling
process (no start-up cost; for tiny xTB batches and debugging). Process pools start workers with
``spawn``: call from under ``if __name__ == "__main__":`` in scripts.
"""
from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
import traceback
from collections import Counter, deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import Atoms

from al_manager.processes import end_pool

from .base import ReferenceError, _one_line, get_backend, set_num_threads

#: metadata keys taken from ``atoms.info`` when present
INFO_KEYS = ("cluster", "origin", "temperature")
_RESERVED = {"id", "unique_id", "ctime", "mtime", "user", "calculator", "energy", "forces", "dipole",
             "numbers", "positions", "method", "hash", "natoms", "fmax", "smax", "charge", "mass",
             "magmom", "volume", "pbc", "cell", "formula", "age"}
_FAILED_SCHEMA = """CREATE TABLE IF NOT EXISTS failed (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL,
    method TEXT NOT NULL,
    frame TEXT,
    formula TEXT,
    reason TEXT NOT NULL,
    numbers TEXT,
    positions TEXT,
    metadata TEXT,
    time REAL
)"""


@dataclass
class Failure:
    index: int        # position in the input list
    frame: str        # e.g. "in.xyz frame 3"
    hash: str
    reason: str


@dataclass
class LabelReport:
    n_labelled: int
    n_skipped: int
    n_failed: int
    failures: list[Failure] = field(default_factory=list)
    #: input index -> database row id of every label written by this call
    rows: dict[int, int] = field(default_factory=dict)
    method: str = ""
    seconds: float = 0.0
    #: times the process pool was restarted after a worker process died
    pool_restarts: int = 0

    def summary(self) -> str:
        return (f"{self.n_labelled} labelled, {self.n_skipped} skipped (already known), {self.n_failed} failed "
                f"[{self.method}, {self.seconds:.1f} s]")


# --------------------------------------------------------------------------------------------------
# the failed table

def _sqlite(db_path) -> sqlite3.Connection:
    con = sqlite3.connect(str(db_path), timeout=120)
    con.execute(_FAILED_SCHEMA)
    return con


def record_failure(db_path, atoms: Atoms, *, hash: str, method: str, reason: str, frame: str = "",
                   metadata: dict | None = None) -> None:
    """Append one failure to the ``failed`` table (its own transaction)."""
    con = _sqlite(db_path)
    try:
        with con:
            con.execute("INSERT INTO failed (hash, method, frame, formula, reason, numbers, positions, metadata, "
                        "time) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (hash, method, frame, atoms.get_chemical_formula(), reason,
                         json.dumps([int(z) for z in atoms.numbers]),
                         json.dumps(np.round(atoms.positions, 8).tolist()),
                         json.dumps(metadata or {}), time.time()))
    finally:
        con.close()


def read_failures(db_path, method: str | None = None) -> list[dict]:
    """Rows of the ``failed`` table (dicts with hash, method, frame, formula, reason, numbers, positions
    (Å), metadata, time); an empty list when there is none."""
    if not Path(db_path).exists():
        return []
    con = sqlite3.connect(str(db_path), timeout=120)
    try:
        if not con.execute("SELECT name FROM sqlite_master WHERE name='failed'").fetchone():
            return []
        query = "SELECT hash, method, frame, formula, reason, numbers, positions, metadata, time FROM failed"
        rows = con.execute(query + (" WHERE method = ?" if method else "") + " ORDER BY id",
                           (method,) if method else ()).fetchall()
    finally:
        con.close()
    keys = ("hash", "method", "frame", "formula", "reason", "numbers", "positions", "metadata", "time")
    out = []
    for row in rows:
        d = dict(zip(keys, row))
        for k in ("numbers", "positions", "metadata"):
            d[k] = json.loads(d[k]) if d[k] else None
        out.append(d)
    return out


def failed_atoms(db_path, method: str | None = None) -> list[Atoms]:
    """The failed structures as Atoms (``info``: reason, frame, metadata), e.g. to retry them."""
    return [Atoms(numbers=r["numbers"], positions=r["positions"],
                  info={"reason": r["reason"], "frame": r["frame"], **(r["metadata"] or {})})
            for r in read_failures(db_path, method)]


# --------------------------------------------------------------------------------------------------
# the worker side

_WORKER_BACKENDS: dict = {}


def _init_worker(threads: int | None, parent: int | None = None) -> None:
    if parent is not None:  # a pool worker: it ends with the labeller, even one killed by SIGKILL
        import signal

        from al_manager.processes import die_with_parent

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the labeller's to handle (it ends the pool)
        die_with_parent(signal.SIGTERM)
        if os.getppid() != parent:  # the labeller died before prctl took effect
            os._exit(1)
    if threads:
        set_num_threads(threads)


def _label_task(backend: str, options: dict, numbers, positions, info: dict) -> dict:
    """Label one structure in a worker; failures come back as ``{"ok": False, "reason": ...}``."""
    key = (backend, json.dumps(options, sort_keys=True, default=str))
    try:
        be = _WORKER_BACKENDS.get(key)
        if be is None:
            be = _WORKER_BACKENDS[key] = get_backend(backend, **options)
        atoms = Atoms(numbers=numbers, positions=positions, info=info)
        t0 = time.perf_counter()
        lab = be.label(atoms)
        return {"ok": True, "energy": lab.energy, "forces": lab.forces, "dipole": lab.dipole,
                "seconds": time.perf_counter() - t0}
    except ReferenceError as exc:
        return {"ok": False, "reason": _one_line(exc, 500)}
    except Exception as exc:  # a bug or library error in the worker: recorded, the batch goes on
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        return {"ok": False, "reason": f"worker exception {type(exc).__name__}: {_one_line(exc, 400)}{where}"}


class _SerialExecutor:
    """The executor interface, computing in the calling process at submit time."""

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:  # pragma: no cover - _label_task catches everything
            fut.set_exception(exc)
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _make_executor(kind: str, workers: int, threads: int | None):
    if kind == "serial":
        _init_worker(threads)
        return _SerialExecutor()
    if kind == "process":
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=(threads, os.getpid()))
    if kind == "mpi":
        from mpi4py.futures import MPIPoolExecutor

        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        return MPIPoolExecutor(max_workers=workers, env=env)
    if kind == "parsl":  # the open al_manager.execution.session's labelling pool, else a private local one
        from al_manager.execution import parsl_executor

        return parsl_executor(workers, threads)
    raise ValueError(f"executor must be 'process', 'mpi', 'parsl' or 'serial', not {kind!r}")


# --------------------------------------------------------------------------------------------------
# the driver

def _metadata_for(atoms: Atoms, index: int, metadata, frame: str) -> dict:
    meta = {k: atoms.info[k] for k in INFO_KEYS if k in atoms.info}
    if isinstance(metadata, dict):
        meta.update(metadata)
    elif metadata is not None:
        meta.update(metadata[index] or {})
    for k, v in list(meta.items()):
        if v is None:
            del meta[k]
            continue
        if not k.isidentifier() or k in _RESERVED:
            raise ValueError(f"{frame}: metadata key {k!r} is reserved or not a valid name")
        if isinstance(v, np.generic):
            meta[k] = v = v.item()
        if not isinstance(v, (str, int, float, bool)):
            raise ValueError(f"{frame}: metadata {k}={v!r} must be a string or a number")
    if "temperature" in meta:
        meta["temperature"] = float(meta["temperature"])
    return meta


def label_structures(structures: list[Atoms], backend: str, db_path, *, workers: int | None = None,
                     backend_options: dict | None = None, metadata=None, executor: str = "process",
                     source: str = "", retry_failed: bool = False, progress: bool = True) -> LabelReport:
    """Label ``structures`` with a reference ``backend`` ("xtb" | "pyscf" | "orca") into the dataset ``db_path``.

    Parameters
    ----------
    structures : list of ase.Atoms
        Isolated clusters (Å). ``atoms.info`` may carry ``charge``/``multiplicity`` (passed to the backend)
        and ``cluster``/``origin``/``temperature`` (stored with the label).
    backend : str
        Backend name for :func:`al_manager.reference.get_backend`.
    db_path : str or Path
        The ASE SQLite dataset (created when missing); failures go to its ``failed`` table.
    workers : int, optional
        Parallel workers; default ``cores // threads`` (process pool) or the MPI universe (mpi).
    backend_options : dict, optional
        Constructor options of the backend (e.g. ``{"threads": 2}``, ``{"command": "/opt/orca/orca",
        "nprocs": 4}``). For xtb/pyscf ``threads`` defaults to ``max(1, cores // workers)``.
    metadata : dict or list of dict, optional
        Key-value pairs stored with every label (one dict for all, or one per structure), e.g.
        ``cluster``, ``origin``, ``temperature``; they override ``atoms.info``.
    executor : "process" | "mpi" | "parsl" | "serial"
        "parsl": a Parsl HighThroughputExecutor (:mod:`al_manager.execution`): the open ``session``'s
        labelling pool (cluster nodes), else a private local one of ``workers`` workers; a task whose
        worker died is retried by Parsl.
    source : str
        Name used in messages ("<source> frame <i>"), e.g. the input file.
    retry_failed : bool
        Compute again structures already in the ``failed`` table for this method.
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    LabelReport
        ``n_labelled``, ``n_skipped`` (already labelled, repeated in the batch, or failed before),
        ``n_failed``, ``failures`` (index, frame, hash, reason) and ``rows`` (input index -> row id).

    Raises
    ------
    ValueError
        A frame is refused (the message names it) or an option is invalid; nothing was computed.
    FileNotFoundError / ImportError
        The backend cannot run here (e.g. no ORCA binary; the message says how to point at one).
    """
    from driver.data import add_labelled, connect, known_hashes, structure_hash

    t_start = time.perf_counter()
    structures = list(structures)
    if metadata is not None and not isinstance(metadata, dict) and len(metadata) != len(structures):
        raise ValueError(f"metadata has {len(metadata)} entries for {len(structures)} structures")
    options = dict(backend_options or {})
    cores = _cores()
    threads = None
    if backend in ("xtb", "pyscf"):
        threads = options.get("threads") or (max(1, cores // workers) if workers else 1)
        options["threads"] = threads
    elif backend == "orca":
        threads = 1  # ORCA parallelises itself with %pal nprocs
    if executor == "mpi":
        workers = workers  # None: MPIPoolExecutor takes the universe size
    elif executor == "serial":
        workers = 1
    else:
        per_worker = options.get("nprocs", 1) if backend == "orca" else threads or 1
        workers = int(workers or max(1, cores // per_worker))
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")

    try:
        be = get_backend(backend, **options)
    except TypeError as exc:
        raise ValueError(f"backend {backend!r}: {exc}") from exc
    be.check_available()
    method = be.method
    if Path(db_path).is_file():
        from driver.data import connect as _connect, label_methods

        others = {m: n for m, n in label_methods(_connect(db_path)).items() if m != method}
        if others:
            raise ValueError(f"{db_path} already holds labels of another reference method ("
                             + ", ".join(f"{m}: {n}" for m, n in others.items())
                             + f"); labels of {method} go into a database of their own")
    prefix = f"{source} " if source else ""

    # 1. refuse bad input before anything runs
    frames, metas, hashes = [], [], []
    refused = []
    for i, atoms in enumerate(structures):
        name = f"{prefix}frame {i}"
        if atoms.info.get("cluster"):
            name += f" ({atoms.info['cluster']})"
        frames.append(name)
        try:
            be.check(atoms, frame=name)
            metas.append(_metadata_for(atoms, i, metadata, name))
        except ValueError as exc:
            refused.append(str(exc))
            metas.append({})
        hashes.append(structure_hash(atoms.numbers, atoms.positions, method))
    if refused:
        more = f" ({len(refused) - 1} more frame(s) refused)" if len(refused) > 1 else ""
        raise ValueError(f"{refused[0]}{more}; nothing was computed")

    # 2. never compute a structure twice
    db = connect(db_path)
    skip = set(known_hashes(db))
    if not retry_failed:
        skip |= {r["hash"] for r in read_failures(db_path, method)}
    todo, n_skipped = [], 0
    for i, h in enumerate(hashes):
        if h in skip:
            n_skipped += 1
        else:
            skip.add(h)
            todo.append(i)

    report = LabelReport(0, n_skipped, 0, method=method)
    if not todo:
        report.seconds = time.perf_counter() - t_start
        return report

    def keep_info(atoms):
        return {k: atoms.info[k] for k in ("charge", "multiplicity") if k in atoms.info}

    def submit(pool, i):
        a = structures[i]
        return pool.submit(_label_task, backend, options, np.asarray(a.numbers), np.asarray(a.positions),
                           keep_info(a))

    def fail(i, reason):
        record_failure(db_path, structures[i], hash=hashes[i], method=method, reason=reason, frame=frames[i],
                       metadata=metas[i])
        report.failures.append(Failure(i, frames[i], hashes[i], reason))
        report.n_failed += 1

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"label {backend}", unit="frame", file=sys.stderr, leave=True)

    # 3. compute; write each result at once
    from concurrent.futures.process import BrokenProcessPool

    pending = deque(todo)
    inflight: dict = {}
    crashes: Counter = Counter()
    max_inflight = 2 * (workers or 64)
    pool = _make_executor(executor, workers, threads)
    finished = False
    try:
        fruitless_restarts = 0
        while pending or inflight:
            pool_broke = False
            while pending and len(inflight) < max_inflight:
                i = pending[0]
                if crashes[i] and inflight:
                    break  # a structure that was in flight when a worker died runs alone
                try:
                    future = submit(pool, i)
                except BrokenProcessPool:
                    pool_broke = True  # a worker died before this was handed over; i stays pending
                    break
                pending.popleft()
                inflight[future] = i
                if crashes[i]:
                    break
            done = wait(list(inflight), return_when=FIRST_COMPLETED)[0] if inflight else ()
            broken = []
            for fut in done:
                i = inflight.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool:
                    broken.append(i)
                    continue
                except Exception as exc:
                    fail(i, f"worker exception {type(exc).__name__}: {_one_line(exc, 400)}")
                else:
                    if out["ok"]:
                        row = add_labelled(db, structures[i], out["energy"], out["forces"], out["dipole"],
                                           method=method, **metas[i])
                        report.rows[i] = row
                        report.n_labelled += 1
                    else:
                        fail(i, out["reason"])
                if bar is not None:
                    bar.update(1)
                fruitless_restarts = 0
            if broken or pool_broke:
                # the pool is unusable: everything in flight is lost; a structure that was alone dies for good
                fruitless_restarts += 1
                broken += list(inflight.values())
                inflight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                for i in reversed(broken):
                    if crashes[i]:
                        fail(i, "worker process died (crash or out of memory) while computing this structure")
                        fruitless_restarts = 0
                        if bar is not None:
                            bar.update(1)
                    else:
                        crashes[i] += 1
                        pending.appendleft(i)
                if fruitless_restarts > 5:
                    raise RuntimeError(f"the {backend} worker processes keep dying before any structure "
                                       f"completes ({fruitless_restarts} pool restarts in a row); "
                                       "check memory limits and the backend's installation")
                pool = _make_executor(executor, workers, threads)
                report.pool_restarts += 1
        finished = True
    finally:
        if finished:
            pool.shutdown(wait=True, cancel_futures=True)
        else:
            end_pool(pool)   # the labels already written stay, and a rerun skips them
        if bar is not None:
            bar.close()
    report.seconds = time.perf_counter() - t_start
    return report
