"""`nanosil train --db DATA.db --out MODELS_DIR [--committee 3] [--dipole]`."""
from __future__ import annotations

import argparse
import signal
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="labelled dataset: ASE database (.db) or any file ASE reads with labels")
    p.add_argument("--out", required=True, help="folder for the trained committee")
    p.add_argument("--committee", type=int, default=3, help="energy/force members, 2-8 (default 3)")
    p.add_argument("--dipole", action="store_true", help="also train the charge-based dipole model")
    p.add_argument("--dipole-members", type=int, default=1, help="dipole members with --dipole (default 1)")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--patience", type=int, default=200, help="early stopping patience in epochs (default 200)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="atomic network widths (default 512 512)")
    p.add_argument("--warm-start", default=None, help="start from this committee's weights")
    p.add_argument("--workers", type=int, default=None, help="parallel training processes (default: cores)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock limit per member")


def run(args) -> int:
    from driver.training import TrainConfig, train_committee

    if not Path(args.db).exists():
        raise FileNotFoundError(f"dataset {args.db} does not exist")
    model = {"hidden": tuple(args.hidden)} if args.hidden else {}
    cfg = TrainConfig(committee=args.committee, dipole_members=args.dipole_members if args.dipole else 0,
                      epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
                      warm_start=args.warm_start, workers=args.workers, max_minutes=args.max_minutes, model=model)
    def stop(signum, frame):  # SIGTERM unwinds like Ctrl-C: workers end, temporary files go
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        committee = train_committee(args.db, args.out, cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from driver.commands.evaluate import print_table

    print_table({"train": committee.metadata["errors"]["train"],
                 "validation": committee.metadata["errors"]["validation"]})
    return 0
