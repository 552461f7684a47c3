"""``nanosil ir-campaign CONFIG.toml``: production MD IR spectra for many clusters, temperatures and seeds.

Runs (or resumes: finished trajectories are never repeated, unfinished ones continue from their i-PI
checkpoints) every trajectory of the campaign described in CONFIG.toml (see :mod:`al_manager.campaign.config`),
then writes the spectra with error bands, harmonic overlays, size sums (kappa tables) and summary.json.
Exit status: 0 when every trajectory finished (trusted or stopped outside the trusted region), 1 when
some failed, 2 for bad input.
"""
from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("config", metavar="CONFIG.toml", help="campaign configuration (TOML)")
    parser.add_argument("--analyse-only", action="store_true",
                        help="run no MD: rewrite spectra, plots, sums and summary.json from the files")
    parser.add_argument("--no-retry-failed", action="store_true",
                        help="leave trajectories that failed in an earlier invocation alone")
    parser.add_argument("--dry-run", action="store_true", help="validate the configuration, print the plan, run nothing")


def preflight(config) -> None:
    """What would otherwise fail later, found before anything runs (also with ``--dry-run``): the
    committee loads, has a dipole model (the spectra need it), knows every cluster's elements, and every
    structure has finite positions and no atoms on top of each other."""
    from al_manager.cli import UsageError
    from driver.geometry_checks import non_finite, too_close
    from driver.models.committee import load_committee
    from ipi_inputs.files import read_cluster

    committee = load_committee(config.models)
    if committee.dipole_model is None:
        raise UsageError(f"{config.models}: the committee has no dipole model, so it gives no IR spectrum: "
                         f"train it with --dipole-members 1 (or [train] dipole_members = 1)")
    species = set(committee.species)
    for cluster in config.clusters:
        atoms = read_cluster(cluster.structure)
        unknown = sorted(set(atoms.get_chemical_symbols()) - species)
        if unknown:
            raise UsageError(f"{cluster.structure} (clusters.{cluster.name}): element(s) {', '.join(unknown)} "
                             f"not in the committee's species ({', '.join(committee.species)})")
        why = non_finite(atoms.positions) or too_close(atoms.numbers, atoms.positions, 0.5)
        if why:
            raise UsageError(f"{cluster.structure} (clusters.{cluster.name}): {why}")


def run(args) -> int:
    from al_manager.campaign.config import describe, load_config
    from al_manager.campaign.runner import run_campaign

    config = load_config(args.config)   # its errors name the file and the key
    preflight(config)
    print(f"nanosil ir-campaign: {describe(config)}; output {config.output}", file=sys.stderr, flush=True)
    if args.dry_run:
        for spec in config.trajectories():
            print(f"{spec.id}\t{spec.folder(config.output)}")
        return 0
    try:
        summary = run_campaign(config, analyse_only=args.analyse_only, retry_failed=not args.no_retry_failed)
    except KeyboardInterrupt:
        print("nanosil ir-campaign: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # lost drivers, a changed i-PI template: stop with the reason, resumable
        print(f"nanosil ir-campaign: error: {exc}; run the same command to resume", file=sys.stderr)
        return 1
    return 1 if summary["counts"]["failed"] else 0
