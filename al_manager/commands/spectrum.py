"""``nanosil spectrum``: MD IR spectrum in absolute units from dipole time series (i-PI extras, extxyz, npz, text).

Examples:
    nanosil spectrum run*/sim.dipole_0 --timestep 0.5 --temperature 400 --out P2_400K.csv --plot P2_400K.png
    scripts/ir_spectrum.py ...           # the same, from a checkout without installing

Writes a CSV with columns wavenumber_cm-1,wavelength_um,intensity,stderr: intensity = A(nu~) in km/mol per
cm^-1 (a classical harmonic band integrates to its harmonic intensity in km/mol), mean over the files
(independent runs), stderr = standard error of that mean (0 for one run): the sampling noise of the MD.
With --committee-band, one per-member dipole file per run adds the column std_committee: the std over the
dipole committee members of their spectra on the same trajectories, the model uncertainty of the dipole
surface (not of the trajectory). The plot shows both bands, each labelled.

Post-processing only: this module and what it imports (:mod:`spectra`, numpy, scipy, ASE, matplotlib) never
import torch (``tests/test_spectra_no_torch.py``).
"""
from __future__ import annotations

import argparse
import functools

DESCRIPTION = __doc__.split("\n\n")[0].split(": ", 1)[1]
EPILOG = "Each file is one independent run; all need the same time step and stride."


def one_line_os_errors(work):
    """``work(args)`` with an OSError other than FileNotFoundError (permission denied, a folder where a file
    should be) turned into a ValueError naming the file: ``nanosil`` prints those as one line too."""
    @functools.wraps(work)
    def wrapped(args):
        try:
            return work(args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            text = f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else (str(exc) or type(exc).__name__)
            raise ValueError(" ".join(text.split())) from None
    return wrapped


def check_outputs(**paths) -> None:
    """Refuse an output path that is a folder before any work (the atomic writer's message would name its
    temporary file): ``check_outputs(out=args.out, plot=args.plot)``; None is skipped."""
    from pathlib import Path

    for option, path in paths.items():
        if path is not None and Path(path).is_dir():
            raise ValueError(f"--{option.replace('_', '-')} {path} is a folder: give a file name")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from spectra.autocorrelation import QUANTUM_CORRECTIONS, WINDOWS, SpectrumOptions
    from spectra.constants import DIPOLE_UNIT_TO_EA
    from spectra.io import FORMATS

    d = SpectrumOptions()
    p.epilog = EPILOG
    p.add_argument("files", nargs="+", metavar="DIPOLE_FILE", help="dipole time series, one file per run")
    p.add_argument("--timestep", type=float, required=True, metavar="FS",
                   help="MD time step in fs (frames with i-PI step numbers are stride x timestep apart)")
    p.add_argument("--temperature", type=float, required=True, metavar="K", help="simulation temperature in K")
    p.add_argument("--discard-ps", type=float, default=d.discard_ps, help="equilibration discarded per run (default %(default)s ps)")
    p.add_argument("--depth-fs", type=float, default=d.depth_fs, help="maximum correlation depth (default %(default)s fs)")
    p.add_argument("--units", choices=list(DIPOLE_UNIT_TO_EA), default=None,
                   help="dipole unit in the files: au = e*Bohr, eA = e*Angstrom, debye (default: au for i-PI files, eA otherwise)")
    p.add_argument("--format", choices=("auto",) + FORMATS, default="auto", help="file format (default: detected)")
    p.add_argument("--window", choices=WINDOWS, default=d.window,
                   help="lag window on the autocorrelation (default %(default)s). parzen: non-negative spectrum, "
                        "FWHM 2.55/(2 c depth) = 20.8 cm^-1 at 2048 fs; bartlett: non-negative, FWHM 14.4 cm^-1 "
                        "but 4.7%% side lobes; hann: the paper's processing, FWHM 16.3 cm^-1, dips below zero "
                        "beside strong bands; none: sharp cut, FWHM 9.8 cm^-1, side lobes -22%%")
    p.add_argument("--zero-padding", type=int, default=d.zero_padding,
                   help="transform length >= this x 2 x depth, power of two (default %(default)s)")
    p.add_argument("--quantum-correction", choices=QUANTUM_CORRECTIONS, default=d.quantum_correction,
                   help="quantum correction factor (default %(default)s)")
    p.add_argument("--max-wavenumber", type=float, default=None, metavar="CM-1",
                   help="write the CSV up to this wavenumber (default: up to the Nyquist frequency)")
    p.add_argument("--committee-band", nargs="+", default=None, metavar="MEMBERS_FILE",
                   help="per-member dipoles of the dipole committee on the same runs, one file per DIPOLE_FILE in "
                        "the same order (i-PI extras of type dipole_members, or .npz with 'dipole_members' "
                        "(n_members, n_frames, 3)); adds the std over members as column std_committee and a "
                        "second band in the plot. Give it after the dipole files")
    p.add_argument("--out", required=True, metavar="SPECTRUM.csv", help="output CSV")
    p.add_argument("--plot", metavar="SPECTRUM.png", help="also plot the spectrum")
    p.add_argument("--plot-axis", choices=("wavenumber", "wavelength"), default="wavenumber",
                   help="x axis of the plot: wavenumber (cm^-1) or wavelength (um, marking 9.7 and 18 um)")
    p.add_argument("--plot-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="x range of the plot (default 0 1500 cm^-1, or 5 40 um)")


def read_committee(args, runs, fmt):
    """The per-member dipole files of --committee-band, checked against their runs (same frames)."""
    from spectra.io import check_same_trajectory, read_dipole_members

    if len(args.committee_band) != len(runs):
        raise ValueError(f"--committee-band: {len(args.committee_band)} member file(s) for {len(runs)} dipole "
                         "file(s); give one per run, in the same order")
    members = []
    for run, path in zip(runs, args.committee_band):
        series = read_dipole_members(path, args.timestep, units=args.units, fmt=fmt if fmt in ("ipi", "npz") else None)
        check_same_trajectory(run, series)
        print(f"read committee {path}: {series.n_members} dipole members, {series.n_frames} frames", flush=True)
        members.append(series)
    return members


@one_line_os_errors
def run(args) -> int:
    from spectra.autocorrelation import SpectrumOptions, md_committee_spectrum, md_ir_spectrum, with_committee_band
    from spectra.io import read_dipoles
    from spectra.spectrum import write_spectrum_csv

    check_outputs(out=args.out, plot=args.plot)
    options = SpectrumOptions(depth_fs=args.depth_fs, discard_ps=args.discard_ps, window=args.window,
                              zero_padding=args.zero_padding, quantum_correction=args.quantum_correction)
    options.check()
    fmt = None if args.format == "auto" else args.format
    runs = []
    for k, path in enumerate(args.files, 1):
        series = read_dipoles(path, args.timestep, units=args.units, fmt=fmt)
        print(f"read {k}/{len(args.files)}: {path}: {series.n_frames} frames, {series.frame_interval_fs:g} fs apart "
              f"({series.duration_fs / 1000:.3g} ps)", flush=True)
        runs.append(series)
    members = read_committee(args, runs, fmt) if args.committee_band else None
    spectrum = md_ir_spectrum(runs, args.temperature, options, progress=lambda line: print(line, flush=True))
    if members is not None:
        committee = md_committee_spectrum(members, args.temperature, options,
                                          progress=lambda line: print(line, flush=True))
        spectrum = with_committee_band(spectrum, committee)
    if args.max_wavenumber is not None:
        spectrum = spectrum.cropped(0.0, args.max_wavenumber)
    write_spectrum_csv(args.out, spectrum)
    print(f"wrote {args.out}: {len(spectrum.wavenumber)} points, spacing "
          f"{spectrum.wavenumber[1] - spectrum.wavenumber[0]:.4g} cm^-1, {spectrum.n_runs} run(s), "
          f"total band area {spectrum.integral():.5g} km/mol"
          + ("" if members is None else f", committee band of {members[0].n_members} dipole members"))
    if args.plot:
        from spectra.plotting import plot_spectra

        xlim = args.plot_range or ((0.0, 1500.0) if args.plot_axis == "wavenumber" else (5.0, 40.0))
        plot_spectra(args.plot, [spectrum], [f"{args.temperature:g} K, {spectrum.n_runs} run(s)"],
                     axis=args.plot_axis, xlim=tuple(xlim), label_bands=True)
        print(f"wrote {args.plot}")
    return 0
