"""`nanosil train --db DATA.db --out MODELS_DIR [--committee 3] [--dipole] [--device cpu|cuda|auto]`."""
from __future__ import annotations

import argparse
import signal
import sqlite3
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from al_manager.cli import number

    count = number(int, minimum=1)
    p.add_argument("--db", required=True, help="labelled dataset: ASE database (.db) or any file ASE reads with labels")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="the reference method to use when the database holds several (e.g. xtb:GFN2-xTB)")
    p.add_argument("--out", required=True, help="folder for the trained committee")
    p.add_argument("--committee", type=number(int, 1, 8), default=3,
                   help="energy/force members, 1-8 (default 3; uncertainties need >= 2)")
    p.add_argument("--dipole", action="store_true", help="also train the charge-based dipole model")
    p.add_argument("--dipole-members", type=count, default=1, help="dipole members with --dipole (default 1)")
    p.add_argument("--epochs", type=count, default=400)
    p.add_argument("--patience", type=count, default=200, help="early stopping patience in epochs (default 200)")
    p.add_argument("--batch-size", type=count, default=8)
    p.add_argument("--lr", type=number(float, 0, exclusive_minimum=True), default=2e-3)
    p.add_argument("--hidden", type=count, nargs="+", default=None, help="atomic network widths (default 512 512)")
    p.add_argument("--warm-start", default=None, help="start from this committee's weights")
    p.add_argument("--workers", type=count, default=None, help="parallel training processes (default: cores)")
    p.add_argument("--max-minutes", type=number(float, 0, exclusive_minimum=True), default=None,
                   help="wall-clock limit per member")
    from driver.device import add_device_argument

    add_device_argument(p, "the members train (every worker process)")


def run(args) -> int:
    from driver.device import resolve_device
    from driver.training import TrainConfig, train_committee

    resolve_device(args.device)  # cuda without CUDA: one line, exit 2, before anything is read
    if not Path(args.db).exists():
        raise FileNotFoundError(f"dataset {args.db} does not exist")
    if args.warm_start:  # a damaged committee is refused before the data is read
        from driver.models.committee import load_committee

        load_committee(args.warm_start)
    if Path(args.db).suffix == ".db" and Path(args.db).is_file():
        from driver.data import connect, database_error

        try:
            n = len(connect(args.db))  # also refuses a file that is not SQLite, naming it
        except sqlite3.Error as exc:
            raise database_error(args.db, exc) from None
        if n < 2:
            raise ValueError(f"dataset {args.db} holds {n} labelled structure(s); training needs at least 2")
    model = {"hidden": tuple(args.hidden)} if args.hidden else {}
    cfg = TrainConfig(committee=args.committee, dipole_members=args.dipole_members if args.dipole else 0,
                      epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                      warm_start=args.warm_start, workers=args.workers, max_minutes=args.max_minutes, model=model,
                      device=args.device)
    def stop(signum, frame):  # SIGTERM unwinds like Ctrl-C: workers end, temporary files go
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        from driver.data import read_frames

        committee = train_committee(read_frames(args.db, method=args.method), args.out, cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from al_manager.commands.evaluate import print_table

    print_table({"train": committee.metadata["errors"]["train"],
                 "validation": committee.metadata["errors"]["validation"]})
    return 0
