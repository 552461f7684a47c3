"""``nanosil md STRUCTURE --models DIR -T 400 --ps 10``: one i-PI MD run of a cluster with the committee
(``nanosil-driver``), ending in its IR spectrum: the shortest path from a structure to a spectrum.

- ``--ensemble nvt`` (default): one i-PI run (``OUT/md/``, template ``production_nvt``: global SVR
  thermostat, tau 100 fs) of ``--equilibration-ps`` + ``--ps``; the spectrum uses the last ``--ps``.
- ``--ensemble nve``: an NVT equilibration (``OUT/equilibration/``) of ``--equilibration-ps``, then ``--ps``
  of NVE (``OUT/production/``, template ``production_nve``) from its last checkpoint.

The spectrum (:mod:`spectra.autocorrelation`, as ``nanosil spectrum``) comes from i-PI's dipole file
(``md.dipole_0``, e·Bohr): the first ``--discard-ps`` (default min(0.5, ps/4)) of the production are
discarded, the correlation depth is min(2048 fs, half of what is left). Outputs: ``OUT/spectrum.csv``
(km/mol per cm^-1), ``OUT/spectrum.png``, ``OUT/md.json`` (settings, timings, steps/s); each phase folder
keeps i-PI's files, ``ipi.log`` and ``driver.log``.

Before anything starts, the committee's ``committee.json`` is read (not its weights): a committee without a
dipole model, or one that does not know an element of the structure, is refused with one line. i-PI and the
driver are children of this process: they die with it (``PR_SET_PDEATHSIG``), and Ctrl-C / SIGTERM / SIGHUP
end both before it exits (status 130 / 143 / 129). Exit status: 0 done, 1 the MD failed (the message names
the log), 2 bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from al_manager.cli import UsageError, number

PREFIX = "md"                  # i-PI output prefix of every phase
DEFAULT_DEPTH_FS = 2048.0      # the paper's correlation depth
DEFAULT_MAX_DISCARD_PS = 0.5
PROGRESS_EVERY_S = 30.0
END_GRACE_S = 30.0             # how long one child may outlive the other after a normal end
STOP_GRACE_S = 10.0            # SIGTERM -> SIGKILL when interrupted
OUTPUT_NAMES = ("md.json", "spectrum.csv", "spectrum.png", "md", "equilibration", "production")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = ("Outputs: OUT/spectrum.csv (km/mol per cm^-1), OUT/spectrum.png, OUT/md.json (settings, timings, "
                "steps/s), and i-PI's files with ipi.log and driver.log in OUT/md/ (nvt) or OUT/equilibration/ + "
                "OUT/production/ (nve).")
    p.add_argument("structure", metavar="STRUCTURE", help="start structure (any ASE format, or an i-PI xyz)")
    p.add_argument("--models", required=True, metavar="DIR", help="committee folder with a dipole model")
    p.add_argument("-T", "--temperature", type=number(float, 0, exclusive_minimum=True), required=True,
                   metavar="K", help="vibrational temperature (K) of the NVT run or equilibration")
    p.add_argument("--ps", type=number(float, 0, exclusive_minimum=True), required=True,
                   help="production length in ps (the spectrum's trajectory)")
    p.add_argument("--ensemble", choices=("nvt", "nve"), default="nvt",
                   help="nvt: SVR thermostat throughout (default); nve: NVE production after the NVT equilibration")
    p.add_argument("--equilibration-ps", type=number(float, 0), default=1.0, metavar="PS",
                   help="NVT before the production (default 1 ps; nvt: the first part of the same run; "
                        "0 allowed with nvt only)")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=1, metavar="N",
                   help="start velocities and thermostat (default 1)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default md_<structure>_<T>K_<ensemble> in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    p.add_argument("--timestep-fs", type=number(float, 0, 5, exclusive_minimum=True), default=0.5, metavar="FS",
                   help="MD time step (default 0.5 fs)")
    p.add_argument("--threads", type=number(int, 1), default=1, metavar="N", help="torch threads of the driver (default 1)")
    from driver.device import add_device_argument

    add_device_argument(p, "the driver's committee")
    g = p.add_argument_group("spectrum (as nanosil spectrum)")
    g.add_argument("--discard-ps", type=number(float, 0), default=None, metavar="PS",
                   help="production discarded before the autocorrelation (default min(0.5, ps/4))")
    g.add_argument("--depth-fs", type=number(float, 0, exclusive_minimum=True), default=None, metavar="FS",
                   help="correlation depth (default min(2048, half the analysed time) fs)")
    g.add_argument("--window", choices=("parzen", "bartlett", "hann", "none"), default="parzen",
                   help="lag window (default parzen: non-negative; hann: the paper's processing)")
    g.add_argument("--max-wavenumber", type=number(float, 0, exclusive_minimum=True), default=4000.0,
                   metavar="CM-1", help="CSV up to this wavenumber (default 4000 cm^-1)")


# ---------------------------------------------------------------------- checks before anything starts
def committee_facts(models: Path) -> dict:
    """Species and member counts from ``committee.json`` (no weights, no torch), with one-line errors."""
    if not models.is_dir():
        raise FileNotFoundError(f"model folder {models} does not exist")
    meta_file = models / "committee.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{models} is not a nanosil model folder (no committee.json)")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{meta_file}: cannot be read as a committee ({' '.join(str(exc).split())})") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_file}: not a nanosil committee")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    species = meta.get("species") or config.get("species")
    n_dipole, n_energy = meta.get("n_dipole_members"), meta.get("n_energy_members")
    if not isinstance(species, list) or not isinstance(n_dipole, int) or not isinstance(n_energy, int):
        raise UsageError(f"{meta_file}: no species or member counts: damaged or not written by nanosil")
    return {"species": [str(s) for s in species], "n_dipole_members": n_dipole, "n_energy_members": n_energy,
            "version": meta.get("version")}


def check_structure(structure: Path, models: Path, facts: dict):
    from ipi_inputs.files import read_cluster

    atoms = read_cluster(structure)
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(facts["species"]))
    if unknown:
        raise UsageError(f"element {', '.join(unknown)} in {structure} is not supported by the committee in "
                         f"{models} (its species: {', '.join(facts['species'])})")
    if len(atoms) < 2:
        raise UsageError(f"{structure}: a single atom has no vibrations")
    return atoms


def plan(args) -> dict:
    """Steps and spectrum settings, checked so a long run cannot end in a spectrum that is impossible."""
    dt = float(args.timestep_fs)
    production = int(round(args.ps * 1000.0 / dt))
    equilibration = int(round(args.equilibration_ps * 1000.0 / dt))
    if production < 10:
        raise UsageError(f"--ps {args.ps:g} is {production} steps of {dt:g} fs; give at least 10 steps")
    if args.ensemble == "nve" and equilibration < 1:
        raise UsageError("--ensemble nve starts from an equilibrated NVT checkpoint: give --equilibration-ps > 0")
    discard = min(DEFAULT_MAX_DISCARD_PS, args.ps / 4) if args.discard_ps is None else float(args.discard_ps)
    analysed_ps = args.ps - discard
    if analysed_ps <= 0:
        raise UsageError(f"--discard-ps {discard:g} leaves nothing of the {args.ps:g} ps production")
    depth = min(DEFAULT_DEPTH_FS, analysed_ps * 1000.0 / 2) if args.depth_fs is None else float(args.depth_fs)
    kept = production + 1 - int(round(discard * 1000.0 / dt))
    lags = int(round(depth / dt))
    if lags < 2 or kept - 2 < lags:
        raise UsageError(f"correlation depth {depth:g} fs ({lags} frames) does not fit the {kept} frames left "
                         f"after discarding {discard:g} ps of {args.ps:g} ps: give a longer --ps or a smaller "
                         f"--depth-fs")
    return {"timestep_fs": dt, "production_steps": production, "equilibration_steps": equilibration,
            "discard_ps": round(discard, 9), "depth_fs": round(depth, 6)}


def output_folder(args) -> Path:
    out = Path(args.out) if args.out else Path(f"md_{Path(args.structure).stem}_{args.temperature:g}K_{args.ensemble}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    found = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if found and not args.overwrite:
        raise UsageError(f"{out} already holds a run ({', '.join(found)}): give another --out, or --overwrite")
    for name in found:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------- children and signals
class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class MDFailed(Exception):
    """i-PI or the driver ended badly: the message names the log."""


@contextlib.contextmanager
def signals_raise():
    """SIGINT/SIGTERM/SIGHUP become :class:`Interrupted` (once: a second signal while the children are being
    ended is ignored), so the ``finally`` that ends them always runs."""
    state = {"raised": False}

    def handler(signum, frame):
        if not state["raised"]:
            state["raised"] = True
            raise Interrupted(signum)

    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4000))
            lines = [x.strip() for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _last_step(out_file: Path) -> int | None:
    """The step of the last row of i-PI's properties file (cheap: reads its tail)."""
    try:
        with open(out_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 2000))
            rows = [x.split() for x in f.read().decode(errors="replace").splitlines()
                    if x.strip() and not x.startswith("#")]
        return int(float(rows[-2 if len(rows) > 1 else -1][0])) if rows else None
    except (OSError, ValueError, IndexError):
        return None


class Children:
    """i-PI and the driver of the current phase; :meth:`end` stops whatever still runs."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, cmd: list[str], folder: Path, log_name: str) -> subprocess.Popen:
        from al_manager.processes import child_env, die_with_parent

        with open(folder / log_name, "w") as log:
            # own session: a terminal's Ctrl-C reaches this process only, which ends the children in order
            proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=child_env(1), preexec_fn=die_with_parent, start_new_session=True)
        proc.log_path = folder / log_name  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def end(self, grace: float = STOP_GRACE_S) -> None:
        live = [p for p in self.procs if p.poll() is None]
        for proc in live:  # i-PI: soft exit (RESTART); the driver: ends
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []


# ---------------------------------------------------------------------- one phase
def run_phase(children: Children, folder: Path, xml: Path, structure: Path, models: Path, socket_name: str,
              steps: int, threads: int, say, device: str = "cpu") -> dict:
    from al_manager.processes import executable, remove_stale_socket
    from ipi_inputs.files import SOCKETS_PREFIX, dipole_labels

    socket_path = SOCKETS_PREFIX + socket_name
    if os.path.exists(socket_path):
        remove_stale_socket(socket_path)
    start = time.monotonic()
    ipi = children.start([executable("i-pi"), xml.name], folder, "ipi.log")
    driver = children.start([executable("nanosil-driver"), "--models", str(models), "--structure", str(structure),
                             "--unix", socket_name, "--threads", str(threads), "--device", device,
                             "--log-every", str(max(1000, steps // 10))], folder, "driver.log")
    say(f"    i-PI pid {ipi.pid}, nanosil-driver pid {driver.pid}; logs {folder / 'ipi.log'}, {folder / 'driver.log'}")
    last_line, one_done = start, None
    try:
        while True:
            ri, rd = ipi.poll(), driver.poll()
            if rd not in (None, 0):
                raise MDFailed(f"nanosil-driver exited with status {rd} ({folder / 'driver.log'}: "
                               f"{_last_line(folder / 'driver.log')})")
            if ri not in (None, 0):
                raise MDFailed(f"i-PI exited with status {ri} ({folder / 'ipi.log'}: {_last_line(folder / 'ipi.log')})")
            if ri == 0 and rd == 0:
                break
            now = time.monotonic()
            if ri is not None or rd is not None:  # one has ended normally: the other should follow soon
                one_done = one_done or now
                if now - one_done > END_GRACE_S:
                    children.end()
                    break
            if now - last_line >= PROGRESS_EVERY_S:
                last_line = now
                step = _last_step(folder / f"{PREFIX}.out")
                if step is not None:
                    rate = step / (now - start)
                    say(f"    step {step}/{steps} ({100 * step / steps:.0f}%), {rate:.1f} steps/s, "
                        f"{(steps - step) / max(rate, 1e-9):.0f} s to go")
            time.sleep(0.2)
    finally:
        children.end()
        with contextlib.suppress(OSError, RuntimeError):
            if os.path.exists(socket_path):
                remove_stale_socket(socket_path)
    wall = time.monotonic() - start
    labels = dipole_labels(folder / f"{PREFIX}.dipole_0")
    if labels != list(range(steps + 1)):
        done = max(labels) if labels else 0
        raise MDFailed(f"i-PI ended after {done} of {steps} steps ({folder / 'ipi.log'}: "
                       f"{_last_line(folder / 'ipi.log')}; {folder / 'driver.log'}: {_last_line(folder / 'driver.log')})")
    m = re.search(r"\(([\d.]+) ms per MD step after the first\)", (folder / "driver.log").read_text(errors="replace"))
    return {"folder": str(folder.resolve()), "steps": steps, "wall_s": round(wall, 3), "steps_per_s": round(steps / wall, 3),
            "driver_ms_per_step": float(m.group(1)) if m else None}


# ---------------------------------------------------------------------- the command
def run(args) -> int:
    structure, models = Path(args.structure), Path(args.models)
    facts = committee_facts(models)
    if facts["n_dipole_members"] < 1:
        raise UsageError(f"the committee in {models} has no dipole model: train with --dipole --dipole-members 1")
    atoms = check_structure(structure, models, facts)
    steps = plan(args)
    device = args.device
    if device != "cpu":  # cuda without CUDA: one line before i-PI starts; auto: the driver gets the answer
        from driver.device import resolve_device

        device = resolve_device(device).type
    from al_manager.processes import executable

    for name in ("i-pi", "nanosil-driver"):  # both there before anything starts
        executable(name)
    out = output_folder(args)
    try:
        return _run(args, structure.resolve(), models.resolve(), atoms, facts, steps, out, device)
    except KeyboardInterrupt:  # Ctrl-C after the MD (the children are gone by then)
        print(f"nanosil md: interrupted; partial outputs in {out}", file=sys.stderr, flush=True)
        return 130


def _run(args, structure: Path, models: Path, atoms, facts: dict, plan_: dict, out: Path, device: str = "cpu") -> int:
    from ipi_inputs.files import latest_checkpoint
    from ipi_inputs.render import render_input
    from spectra.atomic import write_json

    def say(message: str) -> None:
        print(message, flush=True)

    dt, n_eq, n_prod = plan_["timestep_fs"], plan_["equilibration_steps"], plan_["production_steps"]
    T, nve = float(args.temperature), args.ensemble == "nve"
    socket_name = f"nsmd{os.getpid()}_{secrets.token_hex(4)}"
    settings = {"structure": str(structure), "formula": str(atoms.symbols.formula), "n_atoms": len(atoms),
                "models": str(models), "committee_version": facts["version"],
                "n_energy_members": facts["n_energy_members"], "n_dipole_members": facts["n_dipole_members"],
                "temperature_K": T, "ensemble": args.ensemble, "production_ps": args.ps,
                "equilibration_ps": args.equilibration_ps, "timestep_fs": dt, "seed": args.seed,
                "production_steps": n_prod, "equilibration_steps": n_eq, "threads": args.threads, "device": device}
    say(f"nanosil md: {structure.name} ({settings['formula']}, {len(atoms)} atoms) at {T:g} K, "
        f"{args.ensemble.upper()} {args.ps:g} ps after {args.equilibration_ps:g} ps NVT equilibration, "
        f"time step {dt:g} fs; committee {models} ({facts['n_energy_members']} energy + "
        f"{facts['n_dipole_members']} dipole members); output {out}")
    common = dict(socket=f"unix:{socket_name}", seed=int(args.seed), prefix=PREFIX, timestep_fs=dt, dipole_flush=100)
    phases: list[dict] = []
    children = Children()
    started = time.monotonic()
    try:
        with signals_raise():
            if nve:
                folder = out / "equilibration"
                say(f"[1/3] equilibration: NVT {n_eq} steps ({args.equilibration_ps:g} ps) in {folder}")
                xml = render_input("production_nvt", folder, structure=structure, temperature=T, steps=n_eq,
                                   velocities="thermal", checkpoint_steps=n_eq, **common)
                phases.append({"name": "equilibration", "ensemble": "nvt",
                               **run_phase(children, folder, xml, structure, models, socket_name, n_eq,
                                           args.threads, say, device)})
                say(f"    done: {n_eq} steps in {phases[-1]['wall_s']:.1f} s ({phases[-1]['steps_per_s']:.1f} steps/s)")
                chk = latest_checkpoint(folder, PREFIX)
                if chk is None or chk[1] != n_eq:
                    raise MDFailed(f"no checkpoint of step {n_eq} in {folder} to start the NVE production from")
                folder = out / "production"
                folder.mkdir(parents=True)
                shutil.copyfile(chk[0], folder / "start.chk")
                say(f"[2/3] production: NVE {n_prod} steps ({args.ps:g} ps) in {folder}")
                xml = render_input("production_nve", folder, checkpoint=folder / "start.chk", steps=n_prod, **common)
                phases.append({"name": "production", "ensemble": "nve",
                               **run_phase(children, folder, xml, structure, models, socket_name, n_prod,
                                           args.threads, say, device)})
                run_discard_ps = plan_["discard_ps"]
            else:
                folder = out / "md"
                total = n_eq + n_prod
                say(f"[1/2] md: NVT {total} steps ({args.equilibration_ps:g} ps equilibration + {args.ps:g} ps "
                    f"production) in {folder}")
                xml = render_input("production_nvt", folder, structure=structure, temperature=T, steps=total,
                                   velocities="thermal", **common)
                phases.append({"name": "md", "ensemble": "nvt",
                               **run_phase(children, folder, xml, structure, models, socket_name, total,
                                           args.threads, say, device)})
                run_discard_ps = n_eq * dt / 1000.0 + plan_["discard_ps"]
            say(f"    done: {phases[-1]['steps']} steps in {phases[-1]['wall_s']:.1f} s "
                f"({phases[-1]['steps_per_s']:.1f} steps/s)")
    except Interrupted as exc:
        children.end()
        print(f"nanosil md: interrupted ({exc}): i-PI and nanosil-driver stopped; partial outputs in {out}",
              file=sys.stderr, flush=True)
        return 128 + exc.signum
    except MDFailed as exc:
        children.end()
        print(f"nanosil md: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return 1
    finally:
        children.end()
    md_wall = time.monotonic() - started

    # ------------------------------------------------------------ the spectrum
    from spectra.autocorrelation import SpectrumOptions, md_ir_spectrum
    from spectra.io import read_dipoles
    from spectra.plotting import plot_spectra
    from spectra.spectrum import write_spectrum_csv

    n = len(phases) + 1
    dipole_file = out / phases[-1]["name"] / f"{PREFIX}.dipole_0"
    t0 = time.monotonic()
    options = SpectrumOptions(depth_fs=plan_["depth_fs"], discard_ps=run_discard_ps, window=args.window)
    say(f"[{n}/{n}] spectrum from {dipole_file}: discard {plan_['discard_ps']:g} ps of the production, "
        f"depth {plan_['depth_fs']:g} fs, window {args.window}")
    series = read_dipoles(dipole_file, dt, units="au", fmt="ipi")
    spectrum = md_ir_spectrum([series], T, options).cropped(0.0, args.max_wavenumber)
    csv, png = out / "spectrum.csv", out / "spectrum.png"
    write_spectrum_csv(csv, spectrum)
    plot_spectra(png, [spectrum], [f"{settings['formula']} {T:g} K, {args.ensemble.upper()} {args.ps:g} ps"],
                 xlim=(0.0, min(1500.0, args.max_wavenumber)))
    spectrum_wall = time.monotonic() - t0
    md_steps = sum(p["steps"] for p in phases)
    record = {
        "command": "nanosil md", "settings": settings,
        "spectrum": {"discard_ps": plan_["discard_ps"], "discarded_from_run_ps": run_discard_ps,
                     "depth_fs": plan_["depth_fs"], "window": args.window, "max_wavenumber_cm-1": args.max_wavenumber,
                     "frames": series.n_frames, "band_area_km_mol": spectrum.integral(),
                     "min_intensity": float(spectrum.intensity.min()), "max_intensity": float(spectrum.intensity.max())},
        "phases": phases,
        "timings": {"md_wall_s": round(md_wall, 3), "spectrum_wall_s": round(spectrum_wall, 3),
                    "total_wall_s": round(md_wall + spectrum_wall, 3), "md_steps": md_steps,
                    "steps_per_s": round(md_steps / md_wall, 3), "simulated_ps": md_steps * dt / 1000.0},
        "outputs": {"spectrum_csv": str(csv.resolve()), "spectrum_png": str(png.resolve()),
                    "dipoles": str(dipole_file.resolve())},
    }
    write_json(out / "md.json", record)
    say(f"    band area {spectrum.integral():.5g} km/mol; {md_steps} MD steps in {md_wall:.1f} s "
        f"({md_steps / md_wall:.1f} steps/s)")
    say(f"wrote {csv}")
    say(f"wrote {png}")
    say(f"wrote {out / 'md.json'}")
    return 0
