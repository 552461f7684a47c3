"""``nanosil compare``: compare two IR spectra or two harmonic sets: MAE/RMSE table, optional JSON and overlay PNG.

Examples:
    nanosil compare dft_modes.txt ml_modes.txt                 # harmonic sets: frequency MAE/RMSE, intensity MAE
    nanosil compare dft_400K.csv ml_400K.csv --normalize max --plot overlay.png
    scripts/compare_spectra.py ...                             # the same, from a checkout without installing

Harmonic sets (2-column text: frequency_cm-1 intensity_km_mol) are matched mode by mode after sorting, the
6 zero modes left out of a set that has them (give --n-atoms when both sets have the same length but
contain them). Spectra (the project's CSV, the paper's .npy, text tables) are compared on the first one's
grid; a harmonic set compared with a spectrum is broadened first (--fwhm, --broaden-normalization).
Post-processing only: never imports torch.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from al_manager.commands.spectrum import check_outputs, one_line_os_errors

DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("first", help="reference: spectrum or harmonic set")
    p.add_argument("second", help="compared: spectrum or harmonic set")
    p.add_argument("--kind", choices=("auto", "spectrum", "harmonic"), default="auto",
                   help="what both files are (default: detected per file)")
    p.add_argument("--labels", nargs=2, default=None, metavar=("A", "B"), help="names in the table and plot")
    p.add_argument("--n-atoms", type=int, default=None, help="atoms of the cluster (to find the zero modes)")
    p.add_argument("--range", type=float, nargs=2, default=(0.0, 4000.0), metavar=("LO", "HI"),
                   help="wavenumber range compared, cm^-1 (default 0 4000)")
    p.add_argument("--normalize", choices=("none", "max", "area"), default="none",
                   help="scale both spectra first (max or area for arbitrary units; default none)")
    p.add_argument("--fwhm", type=float, default=10.0, help="FWHM for broadening harmonic sets (default 10 cm^-1)")
    p.add_argument("--broaden-normalization", choices=("height", "area"), default="height",
                   help="broadened lines peak at (height) or integrate to (area) the intensity (default height)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--plot", metavar="PNG", help="overlay plot")


@one_line_os_errors
def run(args) -> int:
    import json

    import numpy as np

    from spectra.atomic import write_text
    from spectra.broadening import broaden
    from spectra.compare import compare_harmonic, compare_spectra, normalized, read_comparable
    from spectra.harmonic import HarmonicIR
    from spectra.spectrum import Spectrum

    check_outputs(json=args.json, plot=args.plot)
    lo, hi = args.range
    if lo >= hi:
        raise ValueError(f"empty range {lo:g}-{hi:g} cm^-1")
    labels = args.labels or [Path(args.first).name, Path(args.second).name]
    kind = args.kind
    a = read_comparable(args.first, kind)
    b = read_comparable(args.second, kind)
    # a harmonic set is broadened onto the other file's grid when that one is a spectrum
    other = next((x for x in (a, b) if isinstance(x, Spectrum)), None)
    grid = other.wavenumber if other is not None else np.linspace(lo, hi, max(1024, int(hi - lo) + 1))

    def as_spectrum(x):
        if isinstance(x, Spectrum):
            return x
        return broaden(x.frequencies, x.intensities, grid, args.fwhm, normalization=args.broaden_normalization)

    if isinstance(a, HarmonicIR) and isinstance(b, HarmonicIR):
        figures = {"kind": "harmonic", **compare_harmonic(a, b, args.n_atoms)}
        print(f"{'harmonic sets':<24s} {labels[0]} vs {labels[1]}")
        for key in ("n_modes", "frequency_mae_cm-1", "frequency_rmse_cm-1", "frequency_max_abs_cm-1",
                    "intensity_mae_km_mol", "intensity_rmse_km_mol"):
            print(f"{key:<24s} {figures[key]:.4g}")
    else:
        sa, sb = as_spectrum(a), as_spectrum(b)
        figures = {"kind": "spectrum", **compare_spectra(sa, sb, lo, hi, args.normalize)}
        print(f"{'spectra':<24s} {labels[0]} vs {labels[1]} ({figures['range_cm-1'][0]:g}-{figures['range_cm-1'][1]:g} cm^-1, normalize {args.normalize})")
        for key in ("n_points", "mae", "rmse", "cosine_similarity", "max_peak_a_cm-1", "max_peak_b_cm-1", "area_a", "area_b"):
            print(f"{key:<24s} {figures[key]:.6g}")
    figures["labels"] = labels
    if args.json:
        write_text(args.json, json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from spectra.plotting import plot_spectra

        sa, sb = as_spectrum(a), as_spectrum(b)
        norm = args.normalize
        plot_spectra(args.plot, [normalized(sa, norm, lo, hi), normalized(sb, norm, lo, hi)], labels,
                     xlim=(lo, hi), ylabel="intensity" if norm == "none" else f"intensity ({norm}-normalised)")
        print(f"wrote {args.plot}")
    return 0
