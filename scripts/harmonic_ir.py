#!/usr/bin/env python3
"""Harmonic IR of a structure: frequencies (cm^-1), intensities (km/mol) and a broadened spectrum.

Example:
    scripts/harmonic_ir.py P2.xyz --calculator xtb --relax 0.001 --out P2_xtb
    scripts/harmonic_ir.py P2.xyz --calculator ml --models models/ --out P2_ml --plot P2_ml.png

Writes PREFIX_modes.txt (frequency_cm-1 intensity_km_mol, imaginary modes negative) and PREFIX_spectrum.csv
(wavenumber_cm-1,wavelength_um,intensity,stderr; by default Gaussians of FWHM 10 cm^-1 on linspace(0, 4000, 1024)
with peak height = intensity in km/mol, as in the paper; --normalization area gives km/mol per cm^-1).
The ML model uses its exact autograd Hessian and dipole derivatives; other calculators go through ASE Infrared.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from spectra.cli import OneLineParser, run_script  # noqa: E402

CALCULATORS = ("xtb", "pyscf", "orca", "ml")


def build_parser() -> OneLineParser:
    from spectra.broadening import NORMALIZATIONS, SHAPES
    from spectra.harmonic import METHODS

    p = OneLineParser(prog="harmonic_ir.py", description=__doc__.split("\n\n")[0])
    p.add_argument("structure", help="structure file readable by ASE (xyz, extxyz, traj, ...)")
    p.add_argument("--index", default="-1", help="frame of the structure file (default: last)")
    p.add_argument("--calculator", choices=CALCULATORS, required=True,
                   help="xtb (GFN2-xTB), pyscf, orca (reference backends) or ml (needs --models)")
    p.add_argument("--models", metavar="DIR", help="committee folder for --calculator ml")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="autograd (ML model), ase (finite differences) or auto (default)")
    p.add_argument("--delta", type=float, default=0.01, help="finite-difference step of the ase route in Angstrom (default 0.01)")
    p.add_argument("--relax", type=float, metavar="FMAX", default=None,
                   help="relax with BFGS to this max force (eV/Angstrom) first (default: no relaxation)")
    p.add_argument("--fwhm", type=float, default=10.0, help="line FWHM in cm^-1 (default 10)")
    p.add_argument("--shape", choices=SHAPES, default="gaussian", help="line shape (default gaussian)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="height",
                   help="height: peak = intensity (km/mol, the paper); area: integral = intensity (km/mol per cm^-1)")
    p.add_argument("--grid", type=float, nargs=3, default=(0.0, 4000.0, 1024), metavar=("LO", "HI", "N"),
                   help="wavenumber grid (default 0 4000 1024)")
    p.add_argument("--out", required=True, metavar="PREFIX", help="output prefix")
    p.add_argument("--plot", metavar="PNG", help="also plot sticks and broadened spectrum")
    return p


def make_calculator(name: str, models: str | None):
    """An ASE calculator by name: the ML committee or a reference backend's calculator."""
    if name == "ml":
        if not models:
            raise ValueError("--calculator ml needs --models DIR")
        if not Path(models).is_dir():
            raise FileNotFoundError(f"{models}: no such models folder")
        from driver.calculator import NanosilCalculator

        return NanosilCalculator(models)
    from al_manager.reference.base import get_backend

    try:
        return get_backend(name).calculator()
    except ModuleNotFoundError as exc:
        if name == "xtb":  # the backend module is optional here: tblite alone gives the same method
            from tblite.ase import TBLite

            return TBLite(method="GFN2-xTB", verbosity=0)
        raise ValueError(f"reference backend {name!r} is not available ({exc})") from None


def work(args) -> int:
    import numpy as np
    from ase.io import read

    from spectra.broadening import broaden
    from spectra.harmonic import harmonic_ir, write_harmonic
    from spectra.spectrum import write_spectrum_csv

    if not Path(args.structure).is_file():
        raise FileNotFoundError(f"{args.structure}: no such file")
    try:
        atoms = read(args.structure, index=args.index)
    except Exception as exc:  # ASE raises many kinds for unreadable files
        raise ValueError(f"{args.structure}: cannot read structure ({exc.__class__.__name__}: {exc})") from None
    lo, hi, n = args.grid
    if not (hi > lo and n >= 2 and int(n) == n):
        raise ValueError(f"bad grid {lo:g} {hi:g} {n:g}: need LO < HI and an integer N >= 2")
    calc = make_calculator(args.calculator, args.models)
    atoms.calc = calc
    print(f"{args.structure}: {atoms.get_chemical_formula()}, {len(atoms)} atoms, calculator {args.calculator}", flush=True)
    if args.relax is not None:
        from ase.optimize import BFGS

        BFGS(atoms, logfile="-").run(fmax=args.relax, steps=2000)
    print(f"harmonic analysis ({args.method}; the ase route runs {6 * len(atoms) + 1} calculations)", flush=True)
    result = harmonic_ir(atoms, calc, method=args.method, delta=args.delta)
    grid = np.linspace(lo, hi, int(n))
    spectrum = broaden(result.frequencies, result.intensities, grid, args.fwhm, args.shape, args.normalization)
    modes_path, spec_path = f"{args.out}_modes.txt", f"{args.out}_spectrum.csv"
    write_harmonic(modes_path, result)
    write_spectrum_csv(spec_path, spectrum)
    from spectra.compare import drop_zero_modes

    vib = drop_zero_modes(result) if len(result.frequencies) > 6 else result
    n_imag = int(np.sum(vib.frequencies < 0))
    print(f"{len(result.frequencies)} modes ({result.method}); of the {len(vib.frequencies)} beyond the six "
          f"rigid-body ones, {n_imag} imaginary; "
          f"strongest {result.frequencies[np.argmax(result.intensities)]:.1f} cm^-1 at {result.intensities.max():.1f} km/mol")
    print(f"wrote {modes_path} and {spec_path}")
    if args.plot:
        from spectra.plotting import plot_harmonic

        plot_harmonic(args.plot, result.frequencies, result.intensities,
                      spectrum if args.normalization == "height" else None, xlim=(lo, hi))
        print(f"wrote {args.plot}")
    return 0


def main(argv=None) -> int:
    return run_script(build_parser(), work, argv)


if __name__ == "__main__":
    sys.exit(main())
