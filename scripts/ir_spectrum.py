#!/usr/bin/env python3
"""MD IR spectrum in absolute units from dipole time series: ``nanosil spectrum`` from a checkout without installing.

Example:
    scripts/ir_spectrum.py run*/sim.dipole_0 --timestep 0.5 --temperature 400 --out P2_400K.csv --plot P2_400K.png

The options and the work are those of :mod:`al_manager.commands.spectrum` (``nanosil spectrum --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from al_manager.commands import spectrum as command  # noqa: E402
from spectra.cli import OneLineParser, run_script  # noqa: E402


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="ir_spectrum.py", description=command.DESCRIPTION)
    command.add_arguments(p)
    return p


def main(argv=None) -> int:
    return run_script(build_parser(), command.run, argv)


if __name__ == "__main__":
    sys.exit(main())
