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

from spectra.cli import command_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(command_script("ir_spectrum.py", "al_manager.commands.spectrum"))
