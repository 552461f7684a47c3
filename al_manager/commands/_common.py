"""Arguments and helpers shared by ``nanosil label`` and ``nanosil harmonic``: backend choice and options,
and reading the input structures with errors that name the file."""
from __future__ import annotations

import argparse
from pathlib import Path

BACKENDS = ("xtb", "pyscf", "orca")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("reference backend")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="xtb: GFN2-xTB (fast); pyscf: PBE0/def2-SVP (the paper's level, open); "
                        "orca: the paper's exact ORCA input (needs an ORCA binary)")
    g.add_argument("--charge", type=int, default=0, help="total charge (default 0; atoms.info['charge'] wins)")
    g.add_argument("--multiplicity", type=int, default=None,
                   help="spin multiplicity (default: singlet; required for an odd electron count)")
    g.add_argument("--threads", type=int, default=None, help="OpenMP threads per calculation (xtb, pyscf)")
    g.add_argument("--orca-command", default=None, metavar="PATH",
                   help="full path of the ORCA binary (else $ORCA_COMMAND, else 'orca' on PATH)")
    g.add_argument("--nprocs", type=int, default=1, help="ORCA %%pal nprocs per calculation")
    g.add_argument("--maxcore", type=int, default=1000, help="ORCA %%maxcore (MB per process)")


def backend_name(args) -> str:
    """``--backend``, xtb when not given."""
    return args.backend or "xtb"


def backend_options(args) -> dict:
    opts: dict = {"charge": args.charge}
    if args.multiplicity is not None:
        opts["multiplicity"] = args.multiplicity
    if backend_name(args) == "orca":
        opts.update(nprocs=args.nprocs, maxcore=args.maxcore)
        if args.orca_command:
            opts["command"] = args.orca_command
    elif args.threads:
        opts["threads"] = args.threads
    return opts


def read_structures(path: str, index: str = ":"):
    """All frames (or ``index``) of an ASE-readable file; one-line errors naming the file (and, for a
    malformed xyz file, the line and frame: :func:`ipi_inputs.files.xyz_problem`)."""
    from ase.io import read

    from al_manager.cli import UsageError

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    try:
        frames = read(str(p), index=index)
    except Exception as exc:  # ASE raises many kinds for a malformed file; its words name no file nor line
        from ipi_inputs.files import xyz_problem

        problem = xyz_problem(p) if p.suffix.lower() in (".xyz", ".extxyz") else None
        raise UsageError(problem or f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split())}") from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames:
        raise UsageError(f"{path}: no structures (index {index!r})")
    return frames
