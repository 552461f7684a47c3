"""``nanosil harmonic IN.xyz --backend xtb|pyscf|orca --out DIR``: harmonic IR spectrum of one structure, by a
reference backend or (``--models DIR``) by an ML committee.

Writes into DIR:

* ``harmonic.csv``: mode, frequency (cm^-1; imaginary as negative), IR intensity (km/mol), vibration (1, or 0
  for the 6 rigid-body modes of smallest |frequency|);
* ``spectrum.csv`` and ``spectrum.png``: the vibrations broadened with Gaussians (FWHM ``--fwhm``, peak height =
  intensity, the paper's harmonic plots, grid 0-4000 cm^-1 with 1024 points);
* ``structure.xyz``: the geometry used (relaxed first with ``--relax``).

xtb and pyscf use finite differences of forces and dipoles (ASE ``Infrared``; displaced results are
cached in ``DIR/ir_cache`` so an interrupted run resumes); orca runs its analytic ``Freq``; a committee gives
its exact Hessian and dipole derivatives (autograd, :func:`spectra.harmonic.harmonic_autograd`), relaxed on
its own surface first with ``--relax``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from al_manager.learning.measure import STENCIL
from spectra.atomic import write_text

from ._common import add_backend_arguments, backend_name, backend_options, read_structures


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN.xyz", help="structure file (ASE-readable)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--index", default="-1", help="which frame of the file (ASE index, default the last)")
    parser.add_argument("--relax", action="store_true", help="relax with the backend before the analysis")
    parser.add_argument("--fmax", type=float, default=0.001, help="relaxation threshold (eV/Å, default 0.001)")
    parser.add_argument("--delta", type=float, default=STENCIL["delta"],
                        help=f"finite-difference step (Å, default {STENCIL['delta']:g})")
    parser.add_argument("--nfree", type=int, choices=(2, 4), default=STENCIL["nfree"],
                        help=f"finite-difference points per coordinate (default {STENCIL['nfree']}, the "
                             "active-learning yardstick's: 2 overestimates stiff modes by a few tenths of a cm^-1)")
    parser.add_argument("--fwhm", type=float, default=10.0, help="Gaussian FWHM of the spectrum (cm^-1, default 10)")
    parser.add_argument("--models", metavar="DIR", default=None,
                        help="an ML committee (with a dipole model) instead of a reference backend")
    from driver.device import add_device_argument

    add_device_argument(parser, "the committee of --models")
    add_backend_arguments(parser)




def broadened(frequencies, intensities, fwhm: float):
    """(grid cm^-1, intensity km/mol) on 0..4000 cm^-1, Gaussian lines with peak height = intensity."""
    try:
        from spectra.broadening import broaden

        s = broaden(frequencies, intensities, fwhm=fwhm, shape="gaussian", normalization="height")
        return s.wavenumber, s.intensity
    except ImportError:  # spectra package not installed: the same Gaussians here
        grid = np.linspace(0.0, 4000.0, 1024)
        f, i = np.asarray(frequencies), np.asarray(intensities)
        keep = f >= 0
        sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        return grid, np.exp(-0.5 * ((grid[:, None] - f[keep]) / sigma) ** 2) @ i[keep]


def vibration_mask(atoms, frequencies) -> np.ndarray:
    """True for vibrations, False for the 6 (5 if linear) rigid-body modes: those of smallest |frequency|."""
    inertia = atoms.get_moments_of_inertia()
    n_rigid = 5 if inertia.min() < 1e-6 * max(inertia.max(), 1e-12) else 6
    n_rigid = min(n_rigid, len(frequencies))
    mask = np.ones(len(frequencies), dtype=bool)
    mask[np.argsort(np.abs(frequencies))[:n_rigid]] = False
    return mask


def _plot(path: Path, freq, inten, grid, spec, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    keep = freq >= 0
    ax.vlines(freq[keep], 0, inten[keep], color="k", lw=1.0, label="modes")
    ax.plot(grid, spec, lw=1.2, label="broadened")
    top = max(float(freq.max()) * 1.1, 100.0)
    ax.set_xlim(0, min(4000.0, top))
    ax.set_xlabel("wavenumber / cm$^{-1}$")
    ax.set_ylabel("intensity / km mol$^{-1}$")
    ax.set_title(title)
    ax.legend(frameon=False)
    fig.tight_layout()
    from spectra.atomic import write_with

    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"), suffix=".png")
    finally:
        plt.close(fig)


def _committee_harmonic(args, atoms):
    """(atoms, HarmonicIR, method) of the committee in ``args.models``: exact derivatives, after an optional
    BFGS relaxation on the committee surface."""
    import torch
    from ase import Atoms
    from ase.optimize import BFGS

    from al_manager.cli import UsageError
    from driver.calculator import NanosilCalculator
    from spectra.harmonic import harmonic_autograd

    if not (Path(args.models) / "committee.json").is_file():
        raise UsageError(f"{args.models} is not a nanosil model folder (no committee.json)")
    calc = NanosilCalculator(args.models, dtype=torch.float64, device=args.device)
    committee = calc.committee
    if committee.dipole_model is None:
        raise UsageError(f"the committee in {args.models} has no dipole model (no IR intensities): train it "
                         f"with --dipole --dipole-members 1")
    committee.validate(atoms.numbers, atoms.positions, source=f"{args.input} frame {args.index}")
    work = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    if args.relax:
        work.calc = calc
        print(f"relaxing on the committee surface to fmax {args.fmax} eV/Å ...", flush=True)
        if not BFGS(work, logfile=None, maxstep=0.1).run(fmax=args.fmax, steps=2000):
            raise UsageError(f"{args.input}: the relaxation on the committee surface did not converge to "
                             f"fmax {args.fmax} eV/Å in 2000 steps")
    print(f"harmonic analysis with the committee {committee.version} ({len(work)} atoms, exact derivatives) ...",
          flush=True)
    return work, harmonic_autograd(work, calc), f"ML committee {committee.version}"


def run(args) -> int:
    from ase.io import write

    from al_manager.cli import UsageError
    from al_manager.reference import get_backend

    if args.fwhm <= 0 or args.delta <= 0 or args.fmax <= 0:
        raise UsageError("--fwhm, --delta and --fmax must be positive")
    frames = read_structures(args.input, args.index)
    if len(frames) != 1:
        raise UsageError(f"{args.input}: --index {args.index!r} selects {len(frames)} frames; give one frame")
    atoms = frames[0]
    out = Path(args.out)
    if args.models is not None:
        if args.backend is not None:
            raise UsageError("give --models (an ML committee) or --backend (a reference method), not both")
        atoms, har, method = _committee_harmonic(args, atoms)
        out.mkdir(parents=True, exist_ok=True)
        write(str(out / "structure.xyz"), atoms, format="extxyz")
    else:
        out.mkdir(parents=True, exist_ok=True)
        backend = get_backend(backend_name(args), **backend_options(args))
        backend.check_available()
        backend.check(atoms, frame=f"{args.input} frame {args.index}")
        if args.relax:
            print(f"relaxing with {backend.method} to fmax {args.fmax} eV/Å ...", flush=True)
            atoms = backend.relax(atoms, fmax=args.fmax)
        write(str(out / "structure.xyz"), atoms, format="extxyz")
        print(f"harmonic analysis with {backend.method} ({len(atoms)} atoms) ...", flush=True)
        kwargs = {} if backend_name(args) == "orca" else {"delta": args.delta, "nfree": args.nfree,
                                                               "workdir": out / "ir_cache"}
        har = backend.harmonic(atoms, **kwargs)
        method = backend.method

    vib = vibration_mask(atoms, har.frequencies)
    rows = ["mode,frequency_cm-1,intensity_km_per_mol,vibration"]
    rows += [f"{k},{f:.4f},{i:.6f},{int(v)}"
             for k, (f, i, v) in enumerate(zip(har.frequencies, har.intensities, vib))]
    write_text(out / "harmonic.csv", "\n".join(rows) + "\n")
    freq, inten = har.frequencies[vib], har.intensities[vib]
    grid, spec = broadened(freq, inten, args.fwhm)
    write_text(out / "spectrum.csv", "wavenumber_cm-1,intensity_km_per_mol\n"
                  + "".join(f"{g:.4f},{s:.6g}\n" for g, s in zip(grid, spec)))
    _plot(out / "spectrum.png", freq, inten, grid, spec,
          f"{atoms.get_chemical_formula()} harmonic IR, {method}")
    if np.any(freq < 0):
        print(f"warning: {int(np.sum(freq < 0))} imaginary mode(s): not a minimum (use --relax)")
    strongest = np.flatnonzero(vib)[np.argsort(inten)[::-1][:3]]
    peaks = ", ".join(f"{har.frequencies[k]:.0f} cm^-1 ({har.intensities[k]:.0f} km/mol)" for k in strongest)
    print(f"{out}/harmonic.csv, spectrum.csv, spectrum.png written; strongest: {peaks}")
    return 0
