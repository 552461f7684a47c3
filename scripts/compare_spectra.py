#!/usr/bin/env python3
"""Compare two IR spectra or two harmonic sets: ``nanosil compare`` from a checkout without installing.

Examples:
    scripts/compare_spectra.py dft_modes.txt ml_modes.txt                 # harmonic sets: frequency MAE/RMSE, intensity MAE
    scripts/compare_spectra.py dft_400K.csv ml_400K.csv --normalize max --plot overlay.png

The options and the work are those of :mod:`al_manager.commands.compare` (``nanosil compare --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from al_manager.commands import compare as command  # noqa: E402
from spectra.cli import OneLineParser, run_script  # noqa: E402


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="compare_spectra.py", description=command.DESCRIPTION)
    command.add_arguments(p)
    return p


def main(argv=None) -> int:
    return run_script(build_parser(), command.run, argv)


if __name__ == "__main__":
    sys.exit(main())
