"""``nanosil sum``: sum IR spectra over cluster sizes (or temperatures) for astronomers: wavelength axis, cross-section, kappa.

Example (pyroxene (MgSiO3)N, N = 1..3, equal weights as in the paper's Fig. 8):
    nanosil sum P1_400K.csv P2_400K.csv P3_400K.csv --formula-unit MgSiO3 --sizes 1 2 3 \
        --out pyroxene_400K.txt --plot pyroxene_400K.png
    scripts/sum_spectra.py ...           # the same, from a checkout without installing

Inputs are spectra in km/mol per cm^-1 (the CSV of ``nanosil spectrum``). Weights: equal (the paper), number
(the --distribution values are numbers of clusters) or mass (they are mass fractions). The table has columns
wavenumber_cm-1 wavelength_um intensity_km_mol_per_cm-1 stderr_km_mol_per_cm-1 cross_section_cm2 kappa_cm2_g
(cross-section per average cluster, kappa = mass absorption coefficient of the mixture).
Post-processing only: never imports torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from al_manager.commands.spectrum import check_outputs, one_line_os_errors

DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spectra", nargs="+", metavar="SPECTRUM", help="spectrum files (CSV of nanosil spectrum), one per size")
    masses = p.add_mutually_exclusive_group(required=True)
    masses.add_argument("--formula-unit", metavar="FORMULA",
                        help="formula unit of the clusters, e.g. MgSiO3 or Mg2SiO4 (with --sizes)")
    masses.add_argument("--masses", type=float, nargs="+", metavar="AMU", help="cluster masses in amu, one per spectrum")
    masses.add_argument("--structures", nargs="+", metavar="FILE", help="structure files (masses from ASE), one per spectrum")
    p.add_argument("--sizes", type=int, nargs="+", metavar="N", help="cluster size N of each spectrum (with --formula-unit)")
    p.add_argument("--weights", choices=("equal", "number", "mass"), default="equal", help="size weights (default equal)")
    p.add_argument("--distribution", type=float, nargs="+", metavar="X",
                   help="size distribution, one value per spectrum (numbers for --weights number, mass fractions for mass)")
    p.add_argument("--out", required=True, metavar="TABLE.txt", help="plain-text absorption table")
    p.add_argument("--csv", metavar="SUM.csv", help="also write the summed spectrum as a spectrum CSV")
    p.add_argument("--plot", metavar="PNG", help="plot kappa against wavelength, marking 9.7 and 18 um")
    p.add_argument("--plot-range-um", type=float, nargs=2, default=(5.0, 40.0), metavar=("LO", "HI"),
                   help="wavelength range of the plot (default 5 40 um)")


def _masses(args, n: int):
    from spectra.sums import formula_mass_amu

    if args.formula_unit:
        if not args.sizes:
            raise ValueError("--formula-unit needs --sizes (one size per spectrum)")
        if len(args.sizes) != n:
            raise ValueError(f"{len(args.sizes)} sizes for {n} spectra")
        if any(s < 1 for s in args.sizes):
            raise ValueError(f"sizes must be >= 1, got {args.sizes}")
        unit = formula_mass_amu(args.formula_unit)
        return [s * unit for s in args.sizes]
    if args.masses:
        if len(args.masses) != n:
            raise ValueError(f"{len(args.masses)} masses for {n} spectra")
        if any(not m > 0 for m in args.masses):
            raise ValueError(f"masses must be positive, got {args.masses}")
        return list(args.masses)
    if len(args.structures) != n:
        raise ValueError(f"{len(args.structures)} structure files for {n} spectra")
    from ase.io import read

    out = []
    for path in args.structures:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            out.append(float(read(path).get_masses().sum()))
        except Exception as exc:  # ASE raises many kinds for unreadable files
            raise ValueError(f"{path}: cannot read structure ({exc.__class__.__name__}: {exc})") from None
    return out


@one_line_os_errors
def run(args) -> int:
    import numpy as np

    from spectra.spectrum import read_spectrum, write_spectrum_csv
    from spectra.sums import size_weights, weighted_sum, write_absorption_table

    check_outputs(out=args.out, csv=args.csv, plot=args.plot)
    n = len(args.spectra)
    masses = _masses(args, n)
    weights = size_weights(args.weights, n, args.distribution, masses)
    spectra = [read_spectrum(p) for p in args.spectra]
    total = weighted_sum(spectra, weights)
    mean_mass = float(np.dot(weights, masses))
    for path, w, m in zip(args.spectra, weights, masses):
        print(f"{path}: mass {m:.3f} amu, number fraction {w:.4f}")
    header = (f"sum of {n} IR spectra, weights {args.weights}: "
              + ", ".join(f"{Path(p).name}={w:.6g}" for p, w in zip(args.spectra, weights)))
    write_absorption_table(args.out, total, mean_mass, header=header)
    print(f"wrote {args.out} (mean cluster mass {mean_mass:.3f} amu)")
    if args.csv:
        write_spectrum_csv(args.csv, total)
        print(f"wrote {args.csv}")
    if args.plot:
        from spectra.plotting import plot_spectra
        from spectra.spectrum import Spectrum
        from spectra.sums import kappa_cm2_g

        kappa = Spectrum(total.wavenumber, kappa_cm2_g(total.intensity, mean_mass), kappa_cm2_g(total.stderr, mean_mass))
        plot_spectra(args.plot, [kappa], [f"{args.weights} weights, {n} spectra"], axis="wavelength",
                     xlim=tuple(args.plot_range_um), ylabel="κ / cm$^2$ g$^{-1}$")
        print(f"wrote {args.plot}")
    return 0
