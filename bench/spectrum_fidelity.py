"""Spectrum fidelity of the production defaults (issue 15): what the cheap settings cost the IR spectrum.

    OMP_NUM_THREADS=1 .venv/bin/python bench/spectrum_fidelity.py [--models DIR] [--ps 10] [--seeds 3] [--json FILE]

Three (four) real campaigns (``nanosil campaign``'s runner: i-PI + batched driver, SVR thermostat) of the same
cluster, temperature and seeds, each alone on the machine:

- ``reference``: the committee mean propagates, the dipole is computed and written every 0.5 fs step;
- ``stride``: the same propagation, the dipole every ``md.dipole_stride_fs`` (the default 2 fs);
- ``member``: the default stride, and energy member 0 propagates with the whole committee checked every
  ``--committee-every-fs`` (``md.committee_every_fs``);
- ``timestep`` (with ``--timestep-fs X``): the committee mean and the default stride, with an X fs time step;

``default`` is whichever of them the campaign defaults (``MDSettings()``) select. Trajectories of different
settings part ways after a few hundred fs (MD is chaotic), so the comparison is statistical: the mean
spectra of the seeds, and as their error band the spread between the reference's own seeds (each seed
against the mean of the others). Peak positions are the ``--peaks`` most prominent maxima of the
reference below 2000 cm^-1, each refined by a parabola through its three grid points and matched to the
nearest maximum of the other spectrum. Band areas are integrals over 0-2000 cm^-1 (km/mol).

Resumable: a rerun continues the campaigns in ``--workdir`` (default ``bench/results/spectrum_fidelity``).
Keys (``--json``): ``spectrum_peak_shift_cm-1_default_vs_reference``, ``band_area_ratio_default_vs_reference``,
the same per variant, the reference's run-to-run peak shift and area ratio range, and each variant's ps/hour.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO / ".." / "shared" / "data" / "structures"
CLUSTERS = {"P2": "pyroxene_N02_GM.xyz", "O2": "olivine_N02_GM.xyz", "P1": "pyroxene_N01_GM.xyz"}
AREA_RANGE = (0.0, 2000.0)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common, also when imported by a test
from _common import short_campaign  # noqa: E402


def default_models() -> Path | None:
    """The final committee of bench/label_efficiency.py (trained on P1, O1, P2, O2 with xTB), if present."""
    record = REPO / "bench" / "results" / "label_efficiency.json"
    if record.is_file():
        path = Path(json.loads(record.read_text()).get("final_models", ""))
        if (path / "committee.json").is_file():
            return path
    return None


REFERENCE_TIMESTEP_FS = 0.5   # the paper's time step: the reference propagates with it


def variants(committee_every_fs: float, timestep_fs: float | None = None) -> tuple[dict[str, dict], str]:
    """The [md] settings of each variant, and the name of the one the campaign defaults select.
    ``timestep_fs``: also a variant with that time step (the default stride, the committee mean)."""
    from al_manager.campaign.config import MDSettings

    md = MDSettings()
    dt = REFERENCE_TIMESTEP_FS
    out = {"reference": {"timestep_fs": dt, "dipole_stride_fs": dt, "committee_every_fs": "none"},
           "stride": {"timestep_fs": dt, "dipole_stride_fs": md.dipole_stride_fs, "committee_every_fs": "none"},
           "member": {"timestep_fs": dt, "dipole_stride_fs": md.dipole_stride_fs,
                      "committee_every_fs": committee_every_fs}}
    if timestep_fs is not None:
        out["timestep"] = {"timestep_fs": timestep_fs, "dipole_stride_fs": md.dipole_stride_fs,
                           "committee_every_fs": "none"}
    default = {"timestep_fs": md.timestep_fs, "dipole_stride_fs": md.dipole_stride_fs,
               "committee_every_fs": "none" if md.committee_every_fs is None else md.committee_every_fs}
    name = next((k for k, v in out.items() if v == default), "default")
    out.setdefault(name, default)
    return out, name


def refined_peaks(spectrum, n: int, lo: float, hi: float) -> np.ndarray:
    """The ``n`` most prominent maxima in [lo, hi] (:func:`spectra.compare.peak_positions`), each refined by a
    parabola through its 3 grid points."""
    from spectra.compare import peak_positions

    x, y = spectrum.wavenumber, spectrum.intensity
    out = []
    for i in np.searchsorted(x, peak_positions(spectrum.cropped(lo, hi), n, min_prominence=0.03)):
        y0, y1, y2 = y[i - 1], y[i], y[i + 1]
        denom = y0 - 2 * y1 + y2
        shift = 0.5 * (y0 - y2) / denom if denom != 0 else 0.0
        out.append(x[i] + shift * (x[i + 1] - x[i]))
    return np.array(out)


def peak_shifts(reference, other, n: int) -> np.ndarray:
    """|shift| (cm^-1) of each of the reference's ``n`` main peaks to the nearest maximum of ``other``."""
    ref = refined_peaks(reference, n, *AREA_RANGE)
    cand = refined_peaks(other, 4 * n, *AREA_RANGE)
    return np.array([np.min(np.abs(cand - p)) for p in ref]) if len(cand) else np.full(len(ref), np.nan)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spectrum_fidelity.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, default=None, help="committee folder (default: label_efficiency's final_models)")
    p.add_argument("--cluster", choices=sorted(CLUSTERS), default="P2")
    p.add_argument("--temperature", type=float, default=400.0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ps", type=float, default=10.0, help="production ps per run (default 10)")
    p.add_argument("--equilibration-ps", type=float, default=2.0, help="NVT equilibration before it (default 2)")
    p.add_argument("--committee-every-fs", type=float, default=2.0, help="the member variant's check interval")
    p.add_argument("--timestep-fs", type=float, default=None, metavar="X",
                   help="also a variant that propagates with an X fs time step (the default dipole stride, a "
                        "multiple of X; the committee mean)")
    p.add_argument("--peaks", type=int, default=4, help="main peaks compared (default 4)")
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "results" / "spectrum_fidelity")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    models = args.models or default_models()
    if models is None or not (Path(models) / "committee.json").is_file():
        print("spectrum_fidelity: no committee: give --models DIR (or run bench/label_efficiency.py first)",
              file=sys.stderr)
        return 2
    if not (DATA / CLUSTERS[args.cluster]).is_file():
        print(f"spectrum_fidelity: reference structures not available ({DATA}): skipped", file=sys.stderr)
        return 2

    from al_manager.campaign.config import config_from_dict
    from al_manager.campaign.runner import run_campaign
    from spectra.autocorrelation import mean_spectrum
    from spectra.spectrum import read_spectrum

    work = args.workdir.resolve()
    results = {}
    plan, default = variants(args.committee_every_fs, args.timestep_fs)
    for name, md in plan.items():
        out = work / name
        cfg = config_from_dict(short_campaign(
            Path(models).resolve(), out, {args.cluster: (DATA / CLUSTERS[args.cluster]).resolve()}, args.temperature,
            args.seeds, args.ps, {"equilibration_ps": args.equilibration_ps, "checkpoint_ps": 0.5, **md},
            {"workers": args.seeds, "drivers": 1, "threads": 1}), work)
        t0 = time.time()
        print(f"[{name}] time step {md['timestep_fs']:g} fs, dipole every {md['dipole_stride_fs']:g} fs, committee every "
              f"{md['committee_every_fs']} fs; {args.seeds} x {args.ps:g} ps of {args.cluster} at "
              f"{args.temperature:g} K -> {out}", flush=True)
        summary = run_campaign(cfg, log=lambda m: None)
        # the speed of the invocation that ran the MD (a resumed, finished campaign runs none)
        speed_file = out / "bench_throughput.json"
        throughput = summary.get("throughput", {})
        if throughput.get("md_steps"):
            from spectra.atomic import write_json

            write_json(speed_file, throughput)
        elif speed_file.is_file():
            throughput = json.loads(speed_file.read_text())
        runs = sorted((out / "runs").rglob("spectrum.csv"))   # runs/CLUSTER/T/seedN/spectrum.csv
        folder = out / "spectra" / args.cluster / f"{args.temperature:g}K"
        results[name] = {"md": md, "mean": read_spectrum(folder / "spectrum.csv"),
                         "runs": [read_spectrum(r) for r in runs], "throughput": throughput,
                         "seconds_this_invocation": time.time() - t0}
        print(f"[{name}] {len(runs)} run(s); {results[name]['throughput']}", flush=True)

    ref = results["reference"]
    lo, hi = AREA_RANGE
    area_ref = ref["mean"].integral(lo, hi)
    # the reference's own run-to-run band: each seed against the mean of the other seeds
    noise_shift, noise_area = [], []
    for k, run in enumerate(ref["runs"]):
        others = mean_spectrum([r for j, r in enumerate(ref["runs"]) if j != k])
        noise_shift.append(float(np.max(peak_shifts(others, run, args.peaks))))
        noise_area.append(run.integral(lo, hi) / others.integral(lo, hi))
    out = {"cluster": args.cluster, "temperature_K": args.temperature, "seeds": args.seeds, "production_ps": args.ps,
           "models": str(Path(models).resolve()), "reference_peaks_cm-1": refined_peaks(ref["mean"], args.peaks, lo, hi).tolist(),
           "run_to_run_peak_shift_cm-1_max": max(noise_shift) if noise_shift else None,
           "run_to_run_band_area_ratio_range": [min(noise_area), max(noise_area)] if noise_area else None,
           "variants": {}}
    print(f"\n{args.cluster} at {args.temperature:g} K, {args.seeds} seeds x {args.ps:g} ps; reference peaks "
          + ", ".join(f"{x:.1f}" for x in out["reference_peaks_cm-1"]) + " cm^-1")
    print(f"{'variant':10s} {'step fs':>7s} {'dipole fs':>9s} {'committee':>10s} {'max shift':>10s} {'mean shift':>10s} "
          f"{'area ratio':>10s} {'ps/hour':>9s} {'speed vs ref':>12s}")
    ref_speed = ref["throughput"].get("ps_per_hour")
    for name, r in results.items():
        shifts = peak_shifts(ref["mean"], r["mean"], args.peaks)
        ratio = r["mean"].integral(lo, hi) / area_ref
        speed = r["throughput"].get("ps_per_hour")
        rel = speed / ref_speed if speed and ref_speed else None
        out["variants"][name] = {"md": r["md"], "peak_shift_cm-1_max": float(np.max(shifts)),
                                 "peak_shift_cm-1_mean": float(np.mean(shifts)), "band_area_ratio": ratio,
                                 "peaks_cm-1": refined_peaks(r["mean"], args.peaks, lo, hi).tolist(),
                                 "ps_per_hour": speed, "speed_vs_reference": rel}
        print(f"{name:10s} {r['md']['timestep_fs']:7g} {r['md']['dipole_stride_fs']:9g} {str(r['md']['committee_every_fs']):>10s} "
              f"{np.max(shifts):10.2f} {np.mean(shifts):10.2f} {ratio:10.4f} {speed or float('nan'):9.2f} "
              f"{rel or float('nan'):11.2f}x")
    if noise_area:
        print(f"run-to-run (reference seeds, each against the others): max peak shift {max(noise_shift):.2f} cm^-1, "
              f"area ratio {min(noise_area):.3f}-{max(noise_area):.3f}")
    d = out["variants"][default]
    out["default_variant"] = default
    out["spectrum_peak_shift_cm-1_default_vs_reference"] = d["peak_shift_cm-1_max"]
    out["band_area_ratio_default_vs_reference"] = d["band_area_ratio"]
    print(f"default ({default}): peak shift {d['peak_shift_cm-1_max']:.2f} cm^-1 (bar <= 2), band area ratio "
          f"{d['band_area_ratio']:.4f} (bar 0.97-1.03)")
    if args.json:
        from spectra.atomic import write_json

        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
