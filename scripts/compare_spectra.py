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

from spectra.cli import command_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(command_script("compare_spectra.py", "al_manager.commands.compare"))
