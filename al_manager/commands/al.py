"""``nanosil al``: active learning from a TOML configuration.

    nanosil al init CONFIG.toml     initial data (normal modes + FPS), labels, first committee, its errors
    nanosil al run CONFIG.toml      the whole loop (does ``init`` first when needed); rerun to resume
    nanosil al status WORKDIR       where a work directory stands: phase, runs, labels, report

Killing ``al run`` at any moment and running it again resumes where it stopped (see
:mod:`al_manager.learning.loop`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="al_command", metavar="{init,run,status}", required=True)
    p = sub.add_parser("init", help="initial data, labels and the first committee (iteration 0)")
    p.add_argument("config", help="TOML configuration (see examples/quickstart.toml)")
    p = sub.add_parser("run", help="run or resume the active-learning loop")
    p.add_argument("config", help="TOML configuration (see examples/quickstart.toml)")
    p = sub.add_parser("status", help="show where a work directory stands")
    p.add_argument("workdir", help="the work directory (the configuration's workdir)")
    p.add_argument("--json", action="store_true", help="print the state summary as JSON")


def run(args) -> int:
    if args.al_command == "status":
        return status(Path(args.workdir), as_json=args.json)
    return start(Path(args.config), init_only=args.al_command == "init")


# ---------------------------------------------------------------------- init / run
def start(config_path: Path, init_only: bool) -> int:
    from al_manager.cli import UsageError
    from al_manager.learning.config import load_config
    from al_manager.learning.loop import run_loop
    from al_manager.learning.sampling import SamplingFailed
    from al_manager.learning.state import WorkdirBusy
    from al_manager.reference.base import ReferenceError

    config = load_config(config_path)  # every problem of the file, before any work starts
    try:
        return run_loop(config, init_only=init_only, config_text=config_path.read_text())
    except WorkdirBusy as exc:
        raise UsageError(str(exc)) from None
    except (ReferenceError, SamplingFailed) as exc:  # a reference relaxation failed, every sampling run crashed
        print(f"nanosil al: error: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------- status
def status(workdir: Path, as_json: bool = False) -> int:
    from al_manager.learning.state import LOCK_FILE, State, WorkdirBusy, WorkdirLock

    state = State.load(workdir)
    running = False
    if (workdir / LOCK_FILE).exists():
        try:
            WorkdirLock(workdir).acquire().release()
        except WorkdirBusy:
            running = True
    labels = _count_labels(workdir / "data.db")
    k = state.iteration
    summary = {"workdir": str(workdir), "phase": state.phase, "iteration": k, "manager_running": running,
               "labels": labels, "best_harmonic_mae_cm-1": state.get("best_mae"),
               "best_iteration": state.get("best_iteration"), "since_best": state.get("since_best"),
               "stop_reason": state.get("stop_reason"), "updated": state.get("updated")}
    record = state["iterations"].get(str(k))
    if record:
        summary["runs"] = {name: {key: r.get(key) for key in ("status", "frames", "attempt", "steps", "reason")}
                           for name, r in record.get("runs", {}).items()}
        summary["flagged_frames"] = len(record.get("frames", []))
    report = workdir / "report.csv"
    rows = []
    if report.exists():
        from al_manager.learning.report import read_report_csv

        rows = read_report_csv(report)
    summary["report"] = rows
    if as_json:
        print(json.dumps(summary, indent=1))
        return 0
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["updated"] or 0))
    print(f"{workdir}: phase {state.phase}, iteration {k} ({'manager running' if running else 'no manager running'}; "
          f"state updated {when})")
    print(f"labels in data.db: {labels}")
    if summary.get("best_harmonic_mae_cm-1") is not None:
        print(f"best harmonic MAE {summary['best_harmonic_mae_cm-1']:.2f} cm^-1 at iteration "
              f"{summary['best_iteration']}; {summary['since_best']} iteration(s) without improvement")
    if state.get("stop_reason"):
        print(f"stopped: {state['stop_reason']}")
    if summary.get("runs"):
        print(f"iteration {k} runs ({summary['flagged_frames']} flagged frame(s)):")
        for name, r in summary["runs"].items():
            reason = f" - {r['reason']}" if r.get("reason") else ""
            print(f"  {name:<16} {r['status']:<9} frames {r['frames']}  attempt {r['attempt']}  "
                  f"steps {r.get('steps') if r.get('steps') is not None else '-'}{reason}")
    if rows:
        print(f"report {report}:")
        print(f"  {'iter':>4} {'labels':>7} {'new':>5} {'MAE cm-1':>9} {'RMSE cm-1':>10} {'val F MAE':>10}")
        for r in rows:
            print(f"  {r['iteration']:>4} {r['labels']:>7} {r['new_labels'] or '-':>5} {_f(r['harmonic_mae_cm-1']):>9} "
                  f"{_f(r['harmonic_rmse_cm-1']):>10} {_f(r['val_force_mae_eV_per_A'], 3):>10}")
    return 0


def _f(value, digits: int = 2) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "-"


def _count_labels(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    from driver.data import connect

    return connect(db_path).count()


if __name__ == "__main__":  # pragma: no cover
    from al_manager.cli import main

    sys.exit(main(["al", *sys.argv[1:]]))
