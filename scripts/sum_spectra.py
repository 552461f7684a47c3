#!/usr/bin/env python3
"""Sum IR spectra over cluster sizes (or temperatures): ``nanosil sum`` from a checkout without installing.

Example (pyroxene (MgSiO3)N, N = 1..3, equal weights as in the paper's Fig. 8):
    scripts/sum_spectra.py P1_400K.csv P2_400K.csv P3_400K.csv --formula-unit MgSiO3 --sizes 1 2 3 \
        --out pyroxene_400K.txt --plot pyroxene_400K.png

The options and the work are those of :mod:`al_manager.commands.sum` (``nanosil sum --help``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spectra.cli import command_script  # noqa: E402

if __name__ == "__main__":
    sys.exit(command_script("sum_spectra.py", "al_manager.commands.sum"))
