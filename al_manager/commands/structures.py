"""``nanosil structures``: low-energy isomers of a formula by basin hopping on a reference backend
(:mod:`al_manager.structures`), written as extxyz files plus a CSV of relative energies."""
from __future__ import annotations

import argparse
import sys
import time

from al_manager.commands._common import add_backend_arguments, backend_name, backend_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from al_manager.structures import SearchSettings

    d = SearchSettings()
    parser.add_argument("--formula", required=True, help="formula unit, e.g. MgSiO3 or Mg2SiO4")
    parser.add_argument("--units", type=int, default=1, help="formula units in the cluster (default 1)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: <formula>_<units>_isomerNN.xyz and <formula>_<units>_isomers.csv")
    parser.add_argument("--isomers", type=int, default=5, help="distinct lowest isomers to keep (default 5)")
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    parser.add_argument("--starts", type=int, default=d.starts,
                        help="random starting clusters, one basin-hopping walk each (default %(default)s)")
    parser.add_argument("--steps", type=int, default=d.hops,
                        help="basin-hopping steps per start (default %(default)s; raise both for > 15 atoms)")
    parser.add_argument("--kT", type=float, default=d.kT, help="Metropolis temperature in eV (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="processes running starts in parallel (default 1)")
    add_backend_arguments(parser)


def run(args) -> int:
    from al_manager.cli import UsageError
    from al_manager.reference import get_backend
    from al_manager.structures import SearchSettings, formula_symbols, search_isomers, write_isomers

    symbols = formula_symbols(args.formula, args.units)  # ValueError -> one line, exit 2
    if args.isomers < 1:
        raise UsageError(f"--isomers must be >= 1, got {args.isomers}")
    try:
        settings = SearchSettings(starts=args.starts, hops=args.steps, kT=args.kT, seed=args.seed,
                                  workers=args.workers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    backend = get_backend(backend_name(args), **backend_options(args))
    backend.check_available()
    formula = args.formula
    print(f"searching {formula} x {args.units} ({len(symbols)} atoms) with {backend.method}: {settings.starts} "
          f"starts x {settings.hops} basin-hopping steps, seed {settings.seed}", flush=True)
    t0 = time.time()
    result = search_isomers(symbols, backend, settings, n_isomers=args.isomers,
                            progress=lambda line: print(f"  {line}", flush=True))
    if not result.isomers:
        print(f"nanosil structures: no valid minimum found ({result.n_failed} failed trials); "
              f"examples: {'; '.join(result.failures[:3])}", file=sys.stderr)
        return 1
    files, csv_path = write_isomers(result, formula, args.units, args.out, method=backend.method)
    e0 = result.isomers[0].energy
    print(f"{len(result.isomers)} isomer(s) in {time.time() - t0:.0f} s ({result.n_relaxations} relaxations, "
          f"{result.n_failed} failed trials):")
    for path, iso in zip(files, result.isomers):
        print(f"  {path}  E = {iso.energy:.4f} eV  ({iso.energy - e0:+.3f} eV)")
    print(f"relative energies: {csv_path}")
    return 0
