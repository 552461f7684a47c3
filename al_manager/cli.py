"""The `nanosil` command: one subcommand per job.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported lazily so ``nanosil --help`` stays quick and a
user who only post-processes spectra never pays for torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). The module owns the arguments and the work.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("driver.commands.train", "train a committee of energy/force (and dipole) models on an ASE database"),
    "evaluate": ("driver.commands.evaluate", "error table (energy, forces, dipole; MAE/RMSE) of a committee on a database"),
    "label": ("al_manager.reference.commands.label", "label every frame of a file with a reference backend into a database"),
    "harmonic": ("al_manager.reference.commands.harmonic", "harmonic frequencies and IR intensities with a reference backend"),
    "structures": ("al_manager.commands.structures", "find low-energy isomers of a formula by global search"),
    "al": ("al_manager.commands.al", "active learning: init | run | status"),
    "ir-campaign": ("al_manager.commands.campaign", "production MD IR spectra for many clusters, temperatures and seeds"),
}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


def _load(name: str):
    module_name, _ = SUBCOMMANDS[name]
    return importlib.import_module(module_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanosil",
        description="Anharmonic IR spectra of nanosilicate clusters with actively learned ML potentials.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = _load(name)
    sub = argparse.ArgumentParser(prog=f"nanosil {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"nanosil {name}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"nanosil {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
