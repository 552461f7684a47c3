"""`nanosil evaluate --db TEST.db --models MODELS_DIR`: an error table like the paper's Table I."""
from __future__ import annotations

import argparse

ROWS = [("energy per atom (meV)", "energy_mae_meV_per_atom", "energy_rmse_meV_per_atom"),
        ("forces (eV/Å)", "force_mae_eV_per_A", "force_rmse_eV_per_A"),
        ("dipole (Debye)", "dipole_mae_D", "dipole_rmse_D")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="test structures with labels (ASE database or file)")
    p.add_argument("--method", default=None, metavar="NAME",
                   help="the reference method to use when the database holds several (e.g. xtb:GFN2-xTB)")
    p.add_argument("--models", required=True, help="committee folder")
    p.add_argument("--json", default=None, help="also write the table as JSON")
    from driver.device import add_device_argument

    add_device_argument(p)


def format_table(tables: dict[str, dict]) -> str:
    sets = list(tables)
    head = f"{'':24s}" + "".join(f"{s + ' MAE':>16s}{s + ' RMSE':>16s}" for s in sets)
    lines = [head, "-" * len(head)]
    for label, mae, rmse in ROWS:
        if not any(mae in t for t in tables.values()):
            continue
        cells = "".join(f"{t.get(mae, float('nan')):16.4f}{t.get(rmse, float('nan')):16.4f}" for t in tables.values())
        lines.append(f"{label:24s}{cells}")
    lines.append(f"{'structures':24s}" + "".join(f"{t.get('n', 0):16d}{'':16s}" for t in tables.values()))
    return "\n".join(lines)


def print_table(tables: dict[str, dict]) -> None:
    print(format_table(tables))


def training_overlap(committee, frames) -> int:
    """How many of ``frames`` the committee was trained (or validated) on, from the structure hashes its
    training recorded in ``metadata["structure_hashes"]`` (:func:`driver.data.structure_hash` of numbers and
    positions, without the method, possibly cut to a prefix); -1 when the committee records none."""
    from driver.data import structure_hash

    known = committee.metadata.get("structure_hashes")
    if not known:
        return -1
    known = {str(h) for h in known}
    width = min(len(h) for h in known)
    return sum(structure_hash(f.numbers, f.positions)[:width] in known for f in frames)


def run(args) -> int:
    import sys

    from al_manager.cli import UsageError
    from driver.data import read_frames
    from driver.models.committee import load_committee
    from driver.training import error_table

    committee = load_committee(args.models, dtype=__import__("torch").float64, device=args.device)
    frames = read_frames(args.db, method=args.method)
    if not frames:
        raise UsageError(f"{args.db} holds no labelled structures: nothing to evaluate")
    for i, f in enumerate(frames):
        committee.validate(f.numbers, f.positions, source=f"{args.db} (structure {i})")
    seen = training_overlap(committee, frames)
    if seen > 0:
        print(f"nanosil evaluate: warning: {seen} of {len(frames)} structures in {args.db} are in the training "
              f"data of {args.models}: the test errors are optimistic", file=sys.stderr, flush=True)
    tables = {}
    errors = committee.metadata.get("errors", {})
    for name in ("train", "validation"):
        if errors.get(name):
            tables[name] = errors[name]
    tables["test"] = error_table(committee, frames)
    print_table(tables)
    if args.json:
        from spectra.atomic import write_json

        write_json(args.json, tables, indent=2)
    return 0
