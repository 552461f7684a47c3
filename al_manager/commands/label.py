"""``nanosil label IN.xyz --backend xtb|pyscf|orca --db DATA.db``: label every frame of a file into the dataset.

Runs :func:`al_manager.reference.labelling.label_structures`: frames are checked first (a bad frame
stops everything before any calculation, naming the frame), known structures are skipped, each label is
written as soon as it is done, failures go to the ``failed`` table. Exit code 0 when nothing failed,
1 when some frames failed (listed on stderr), 2 for bad input, 128 + the signal number after SIGTERM or
Ctrl-C (the labels written so far are kept; the same command resumes).
"""
from __future__ import annotations

import signal
import sys

from ._common import add_backend_arguments, backend_name, backend_options, read_structures


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN.xyz", help="structures (any ASE-readable file: extxyz, traj, ...)")
    parser.add_argument("--db", required=True, metavar="DATA.db", help="the dataset (ASE SQLite; created when missing)")
    parser.add_argument("--index", default=":", help="frames to label, ASE index syntax (default ':' = all)")
    parser.add_argument("--workers", type=int, default=None, help="parallel workers (default: cores // threads)")
    parser.add_argument("--executor", choices=("process", "mpi", "serial", "parsl"), default="process",
                        help="local process pool (default), mpi4py.futures pool (under mpiexec), in-process, or a "
                             "local Parsl HighThroughputExecutor (pip install nanosil[hpc])")
    parser.add_argument("--cluster", default=None, help="cluster name stored with every label "
                        "(default: the frame's info['cluster'], else the file name)")
    parser.add_argument("--origin", default="import", help="origin stored with every label (default: import)")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (K) to store")
    parser.add_argument("--retry-failed", action="store_true", help="compute again frames that failed before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_backend_arguments(parser)


def run(args) -> int:
    from pathlib import Path

    from al_manager.cli import UsageError
    from al_manager.reference.labelling import label_structures

    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, not {args.workers}")
    frames = read_structures(args.input, args.index)
    stem = Path(args.input).stem
    metadata = []
    for a in frames:
        meta = {"cluster": args.cluster or a.info.get("cluster") or stem, "origin": args.origin}
        if args.temperature is not None:
            meta["temperature"] = args.temperature
        metadata.append(meta)
    def stop(signum, frame):  # SIGTERM unwinds like Ctrl-C: the pool's workers are ended, labels kept
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        report = label_structures(frames, backend_name(args), args.db, workers=args.workers,
                                  backend_options=backend_options(args), metadata=metadata,
                                  executor=args.executor, source=args.input, retry_failed=args.retry_failed,
                                  progress=not args.no_progress)
    except (SystemExit, KeyboardInterrupt) as exc:
        code = exc.code if isinstance(exc, SystemExit) else 128 + signal.SIGINT
        if not isinstance(code, int) or code <= 128:
            raise
        print(f"nanosil label: stopped by {signal.Signals(code - 128).name}; the labels already written to "
              f"{args.db} are kept: run the same command to resume", file=sys.stderr, flush=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{args.db}: {report.summary()}")
    for f in report.failures:
        print(f"failed: {f.frame}: {f.reason}", file=sys.stderr)
    return 1 if report.n_failed else 0
