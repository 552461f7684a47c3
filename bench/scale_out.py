"""Labelling throughput through Parsl against today's local process pool, and Parsl's cost per task.

``N`` distinct xTB structures (slightly displaced copies of a paper cluster, P3 by default: ~60 ms per
label) are labelled by ``label_structures`` four ways, each into a fresh database: the local pool
(``executor="process"``) with 1 and 2 workers, and a real Parsl HighThroughputExecutor (local provider) with
1 and 2 workers (``executor="parsl"`` inside an ``al_manager.execution.session``). Both sides pay their
workers' imports (ase, tblite) inside the timed call; the local pool also pays its process start, which it
pays on every call, while the Parsl session is started before the clock (once per AL run; its start-up is
printed apart). Each figure is the best of ``--repeat`` runs, each Parsl run in a fresh session.

Per-task overhead: ``--noop`` tasks that do nothing (``abs``) are run one after another (submit, wait for
the result) through a warm local pool of 2 and a warm Parsl pool of 2; ``parsl_task_overhead_ms`` is the
median round trip through Parsl minus the local pool's: what Parsl (DataFlowKernel, interchange, ZMQ with
CurveZMQ encryption, worker pool) adds to every task. Tasks submitted all at once are printed too.

    OMP_NUM_THREADS=1 .venv/bin/python bench/scale_out.py [--n 40] [--size P3] [--repeat 2] [--json out.json]

JSON keys: ``parsl_over_local_labels_per_s`` (Parsl / local labels per s at 2 workers; target >= 0.9) and
``parsl_task_overhead_ms``.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from _common import write_json

REPO = Path(__file__).resolve().parents[1]
STRUCTURES = REPO / ".." / "shared" / "data" / "structures"
sys.path.insert(0, str(REPO))


def structures(size: str, n: int, seed: int = 0):
    """``n`` distinct structures: the paper's cluster of ``size`` displaced by 0.03 Å (or, without the shared
    data, a random cluster of the same composition)."""
    import numpy as np
    from ase.io import read

    family = {"P": "pyroxene", "O": "olivine"}[size[0].upper()]
    units = int(size[1:])
    path = STRUCTURES / f"{family}_N{units:02d}_GM.xyz"
    rng = np.random.default_rng(seed)
    if path.exists():
        base = read(str(path))
    else:
        from ase.data import atomic_numbers

        from al_manager.structures import formula_symbols, random_cluster

        symbols = formula_symbols("MgSiO3" if family == "pyroxene" else "Mg2SiO4", units)
        base = random_cluster([atomic_numbers[s] for s in symbols], rng)
    out = []
    for _ in range(n):
        a = base.copy()
        a.positions += rng.normal(0.0, 0.03, a.positions.shape)
        out.append(a)
    return out


def parsl_settings(workers: int):
    from al_manager.execution import ExecutionSettings

    return ExecutionSettings(mode="parsl", provider="local", max_workers_per_node=workers, retries=1)


def wait_for_workers(executor, workers: int) -> None:
    """Block until ``workers`` workers answer (no-op tasks): the session's start-up is over."""
    for f in [executor.submit(abs, -k) for k in range(4 * workers)]:
        f.result(timeout=300)


def label_local(frames, workers: int, folder: Path) -> float:
    from al_manager.reference.labelling import label_structures

    report = label_structures(frames, "xtb", folder / f"local_{workers}_{time.time_ns()}.db", workers=workers,
                              executor="process", backend_options={"threads": 1}, progress=False)
    assert report.n_labelled == len(frames), report.failures[:3]
    return report.seconds


def label_parsl(frames, workers: int, folder: Path) -> tuple[float, float]:
    """(labelling seconds, session start-up seconds)."""
    from al_manager.execution import session
    from al_manager.reference.labelling import label_structures

    t0 = time.perf_counter()
    with session(parsl_settings(workers), folder / f"runinfo_{workers}_{time.time_ns()}",
                 stages=("labelling",)) as s:
        wait_for_workers(s.executor("labelling"), workers)
        startup = time.perf_counter() - t0
        report = label_structures(frames, "xtb", folder / f"parsl_{workers}_{time.time_ns()}.db", workers=workers,
                                  executor="parsl", backend_options={"threads": 1}, progress=False)
    assert report.n_labelled == len(frames), report.failures[:3]
    return report.seconds, startup


def round_trips(executor, n: int) -> tuple[float, float]:
    """(median ms of one task submitted and awaited alone, ms per task of ``n`` submitted at once)."""
    for f in [executor.submit(abs, -k) for k in range(8)]:  # warm
        f.result()
    times = []
    for k in range(n):
        t0 = time.perf_counter()
        executor.submit(abs, -k).result()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for f in [executor.submit(abs, -k) for k in range(n)]:
        f.result()
    return 1000 * statistics.median(times), 1000 * (time.perf_counter() - t0) / n


def overheads(n: int, folder: Path) -> dict:
    from al_manager.execution import session

    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        local = round_trips(pool, n)
    with session(parsl_settings(2), folder / "runinfo_noop", stages=("labelling",)) as s:
        wait_for_workers(s.executor("labelling"), 2)
        parsl = round_trips(s.executor("labelling"), n)
    return {"local": local, "parsl": parsl}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="structures labelled per run (default 40)")
    ap.add_argument("--size", default="P3", help="cluster: P1..P10, O1..O10 (default P3)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration, best kept (default 2)")
    ap.add_argument("--noop", type=int, default=200, help="no-op tasks for the overhead (default 200)")
    ap.add_argument("--json", help="write the two figures to this file")
    args = ap.parse_args(argv)

    frames = structures(args.size, args.n)
    rates, startups = {}, []
    with tempfile.TemporaryDirectory(prefix="nanosil-scale-out-") as tmp:
        folder = Path(tmp)
        for rep in range(args.repeat):
            for workers in (1, 2):
                seconds = label_local(frames, workers, folder)
                rates[("local", workers)] = max(rates.get(("local", workers), 0.0), args.n / seconds)
                seconds, startup = label_parsl(frames, workers, folder)
                startups.append(startup)
                rates[("parsl", workers)] = max(rates.get(("parsl", workers), 0.0), args.n / seconds)
        over = overheads(args.noop, folder)

    print(f"{args.n} xTB labels of {args.size} ({len(frames[0])} atoms), best of {args.repeat}; "
          f"{os.cpu_count()} cores (a shared machine: other jobs may run)")
    print(f"{'executor':<28}{'workers':>8}{'labels/s':>10}{'parsl/local':>13}")
    for workers in (1, 2):
        for kind in ("local", "parsl"):
            ratio = rates[("parsl", workers)] / rates[("local", workers)] if kind == "parsl" else 1.0
            name = "process pool" if kind == "local" else "Parsl HTEX (local provider)"
            print(f"{name:<28}{workers:>8}{rates[(kind, workers)]:>10.2f}{ratio:>13.3f}")
    print(f"Parsl session start-up (interchange + worker pool, until workers answer): "
          f"{statistics.median(startups):.1f} s median, not in the Parsl rates")
    (l_rtt, l_batch), (p_rtt, p_batch) = over["local"], over["parsl"]
    print(f"no-op task, one at a time: local pool {l_rtt:.2f} ms, Parsl {p_rtt:.2f} ms (median round trip)")
    print(f"no-op task, {args.noop} at once: local pool {l_batch:.2f} ms/task, Parsl {p_batch:.2f} ms/task")
    figures = {"parsl_over_local_labels_per_s": round(rates[("parsl", 2)] / rates[("local", 2)], 3),
               "parsl_task_overhead_ms": round(p_rtt - l_rtt, 3)}
    print(figures)
    if args.json:
        write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
