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
    "train": ("al_manager.commands.train", "train a committee of energy/force (and dipole) models on an ASE database"),
    "evaluate": ("al_manager.commands.evaluate", "error table (energy, forces, dipole; MAE/RMSE) of a committee on a database"),
    "label": ("al_manager.commands.label", "label every frame of a file with a reference backend into a database"),
    "harmonic": ("al_manager.commands.harmonic", "harmonic frequencies and IR intensities with a reference backend"),
    "structures": ("al_manager.commands.structures", "find low-energy isomers of a formula by global search"),
    "al": ("al_manager.commands.al", "active learning: init | run | status"),
    "ir-campaign": ("al_manager.commands.campaign", "production MD IR spectra for many clusters, temperatures and seeds"),
    "md": ("al_manager.commands.md", "one i-PI MD run of a structure with the committee, ending in its IR spectrum"),
    "spectrum": ("al_manager.commands.spectrum", "MD IR spectrum (CSV + PNG) from dipole files or i-PI extras"),
    "compare": ("al_manager.commands.compare", "compare two spectra or harmonic sets: MAE/RMSE table, JSON, overlay PNG"),
    "sum": ("al_manager.commands.sum", "sum spectra over cluster sizes: absorption table, cross-section, kappa"),
    "transferability": ("al_manager.commands.transferability",
                        "a committee on structures it was not trained on: errors, isomer energies, harmonic IR, SOAP map"),
}


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a bad option is one line on stderr (exit code 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number(kind=int, minimum=None, maximum=None, exclusive_minimum=False):
    """An argparse ``type`` for a finite number in a range: ``--epochs -5`` is refused before any work."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        low_ok = minimum is None or (value > minimum if exclusive_minimum else value >= minimum)
        if value != value or value in (float("inf"), float("-inf")) or not low_ok or (
                maximum is not None and value > maximum):
            if minimum is not None and maximum is not None:
                want = f"between {minimum} and {maximum}"
            elif minimum is not None:
                want = f"> {minimum}" if exclusive_minimum else f">= {minimum}"
            else:
                want = f"<= {maximum}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


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
    sub = _SubcommandParser(prog=f"nanosil {name}", description=SUBCOMMANDS[name][1])
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
