"""Production IR campaigns: the typed configuration, the plan (one trajectory per cluster, temperature and
seed) and :func:`run_campaign`, which runs the MD (:mod:`al_manager.production`) and then writes the
spectra, plots, size sums and ``summary.json`` (:mod:`al_manager.campaign_report`).

Configuration (TOML; paths relative to the file; every key optional except ``models`` and ``clusters``)::

    models = "models"                   # committee folder
    output = "campaign"                 # results folder (default: next to the TOML file, named after it)
    temperatures = [100, 400, 800]      # K (vibrational temperature, see ipi_inputs.render)
    seeds = 3                           # independent runs per (cluster, T): a count (seeds 1..n) or a list
    ensemble = "nvt"                    # production ensemble: nvt (SVR thermostat) or nve (after NVT equilibration)

    [md]
    equilibration_ps = 5.0              # NVT before production (for nvt: the first part of one run)
    production_ps = 40.0
    timestep_fs = 0.5
    discard_ps = 5.0                    # dropped at the start of production when computing spectra
    checkpoint_ps = 0.5                 # i-PI checkpoint interval (resume granularity)

    [run]
    workers = 8                         # trajectories at once (one i-PI each)
    drivers = "auto"                    # batched driver processes: auto = min(cores // threads, workers // 4)
    threads = 1                         # torch threads per driver; drivers x threads <= cores
    order = "by-size"                   # queue order: by-size keeps similar sizes in the same batches | listed
    gather_ms = 20.0                    # how long a driver waits for the other trajectories before a pass

    [trust]
    measure = "force"                   # max force std (eV/Å) | energy (std per atom, eV/atom)
    cap = 1.0                           # stop a trajectory whose disagreement reaches this; "none": never
    fragment_distance = 4.0             # Å: stop when the cluster falls apart into parts this far apart

    [spectra]
    correlation_depth_fs = 2048.0
    window = "hann"
    harmonic = true                     # harmonic spectrum of the committee (autograd Hessian) on the plots
    relax = true                        # relax the structure with the committee before the Hessian
    harmonic_fwhm_cm = 16.0             # Gaussian width of the harmonic lines on the plots

    [clusters]                          # name = structure file, or a table
    P1 = "structures/pyroxene_N01_GM.xyz"
    O2 = { structure = "structures/olivine_N02_GM.xyz", composition = "olivine", size = 2 }

Every bad value raises ``ValueError`` naming the key (``md.production_ps``, ``clusters.P1.structure`` ...).
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENSEMBLES = ("nvt", "nve")
ORDERS = ("by-size", "listed")
MEASURES = ("force", "energy")
WINDOWS = ("hann", "none")
COMPOSITIONS = {"pyroxene": {"Mg": 1, "Si": 1, "O": 3}, "olivine": {"Mg": 2, "Si": 1, "O": 4}}


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    structure: Path
    composition: str | None = None   # e.g. "pyroxene"; default from the formula
    size: int | None = None          # formula units N; default from the formula


@dataclass(frozen=True)
class MDSettings:
    equilibration_ps: float = 5.0
    production_ps: float = 40.0
    timestep_fs: float = 0.5
    discard_ps: float = 5.0
    checkpoint_ps: float = 0.5

    def steps(self, ps: float) -> int:
        return int(round(ps * 1000.0 / self.timestep_fs))

    @property
    def equilibration_steps(self) -> int:
        return self.steps(self.equilibration_ps)

    @property
    def production_steps(self) -> int:
        return self.steps(self.production_ps)

    @property
    def checkpoint_steps(self) -> int:
        return max(1, self.steps(self.checkpoint_ps))


@dataclass(frozen=True)
class RunSettings:
    workers: int = 8
    drivers: int = 2
    threads: int = 1
    order: str = "by-size"
    gather_ms: float = 20.0


@dataclass(frozen=True)
class TrustSettings:
    measure: str = "force"
    cap: float | None = 1.0
    fragment_distance: float | None = 4.0


@dataclass(frozen=True)
class SpectraSettings:
    correlation_depth_fs: float = 2048.0
    window: str = "hann"
    harmonic: bool = True
    relax: bool = True
    harmonic_fwhm_cm: float = 16.0


@dataclass(frozen=True)
class CampaignConfig:
    models: Path
    output: Path
    clusters: tuple[ClusterSpec, ...]
    temperatures: tuple[float, ...] = (100.0, 400.0, 800.0)
    seeds: tuple[int, ...] = (1, 2, 3)
    ensemble: str = "nvt"
    md: MDSettings = field(default_factory=MDSettings)
    run: RunSettings = field(default_factory=RunSettings)
    trust: TrustSettings = field(default_factory=TrustSettings)
    spectra: SpectraSettings = field(default_factory=SpectraSettings)
    source: Path | None = None       # the TOML file

    def trajectories(self) -> list["TrajectorySpec"]:
        """Every (cluster, temperature, seed), in the order they are queued (see ``run.order``)."""
        out = []
        for c_index, cluster in enumerate(self.clusters):
            for temperature in self.temperatures:
                for seed in self.seeds:
                    out.append(TrajectorySpec(cluster, float(temperature), int(seed), c_index))
        if self.run.order == "by-size":
            sizes = {c.name: n_atoms(c.structure) for c in self.clusters}
            out.sort(key=lambda t: (sizes[t.cluster.name], t.cluster_index, t.temperature, t.seed))
        return out


@dataclass(frozen=True)
class TrajectorySpec:
    cluster: ClusterSpec
    temperature: float
    seed: int
    cluster_index: int = 0

    @property
    def id(self) -> str:
        return f"{self.cluster.name}_{self.temperature:g}K_s{self.seed}"

    def folder(self, output: Path) -> Path:
        return Path(output) / "runs" / self.cluster.name / f"{self.temperature:g}K" / f"seed{self.seed}"


_N_ATOMS_CACHE: dict[str, int] = {}


def n_atoms(path: Path) -> int:
    key = str(path)
    if key not in _N_ATOMS_CACHE:
        from ipi_inputs.render import read_cluster

        _N_ATOMS_CACHE[key] = len(read_cluster(path))
    return _N_ATOMS_CACHE[key]


def composition_of(cluster: ClusterSpec, atoms=None) -> tuple[str, int]:
    """(composition name, size N): pyroxene (MgSiO3)N and olivine (Mg2SiO4)N are recognised from the
    formula; anything else is its own composition (its empirical formula) of size 1. The config's
    ``composition`` and ``size`` override both."""
    if atoms is None:
        from ipi_inputs.render import read_cluster

        atoms = read_cluster(cluster.structure)
    symbols = atoms.get_chemical_symbols()
    counts = {s: symbols.count(s) for s in set(symbols)}
    name, size = atoms.get_chemical_formula(mode="hill", empirical=True), 1
    for candidate, unit in COMPOSITIONS.items():
        ratios = {counts[s] / unit[s] for s in unit} if set(counts) == set(unit) else set()
        if len(ratios) == 1 and float(next(iter(ratios))).is_integer():
            name, size = candidate, int(next(iter(ratios)))
    return cluster.composition or name, cluster.size or size


# ---------------------------------------------------------------------- loading
class _Table:
    """A TOML table being consumed: typed getters that name the key, and a check for unknown keys."""

    def __init__(self, data: dict, prefix: str = ""):
        if not isinstance(data, dict):
            raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a table")
        self.data, self.prefix, self.used = data, prefix, set()

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def has(self, name: str) -> bool:
        return name in self.data

    def raw(self, name: str, default=None):
        self.used.add(name)
        return self.data.get(name, default)

    def number(self, name: str, default: float, *, positive: bool = False, minimum: float | None = None,
               optional: bool = False) -> float | None:
        value = self.raw(name, default)
        if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off"))):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{self.key(name)} must be a number, got {value!r}")
        if positive and not value > 0:
            raise ValueError(f"{self.key(name)} must be positive, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{self.key(name)} must be >= {minimum:g}, got {value!r}")
        return float(value)

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.key(name)} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"{self.key(name)} must be >= {minimum}, got {value}")
        return int(value)

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name, default)
        if value not in choices:
            raise ValueError(f"{self.key(name)} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"{self.key(name)} must be true or false, got {value!r}")
        return value

    def table(self, name: str) -> "_Table":
        return _Table(self.raw(name, {}) or {}, f"{self.prefix}{name}.")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ValueError(f"unknown key {self.key(unknown[0])}" + (f" (and {', '.join(self.key(k) for k in unknown[1:])})"
                                                                     if len(unknown) > 1 else ""))


def _path(base: Path, value, key: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key} must be a path (string), got {value!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path)


def load_config(path: str | os.PathLike, check_files: bool = True) -> CampaignConfig:
    """Read and validate a campaign TOML file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"campaign config {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from None
    return config_from_dict(data, path.resolve().parent, source=path, check_files=check_files)


def config_from_dict(data: dict, base: Path, source: Path | None = None, check_files: bool = True) -> CampaignConfig:
    top = _Table(data)
    if not top.has("models"):
        raise ValueError("models: missing (the committee folder)")
    models = _path(base, top.raw("models"), "models")
    if check_files and not (models / "committee.json").is_file():
        raise ValueError(f"models: {models} is not a committee folder (no committee.json)")
    default_out = base / (source.stem if source is not None else "campaign")
    output = _path(base, top.raw("output"), "output") if top.has("output") else default_out

    temps = top.raw("temperatures", [100, 400, 800])
    if not isinstance(temps, list) or not temps:
        raise ValueError(f"temperatures must be a non-empty list of K, got {temps!r}")
    for t in temps:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise ValueError(f"temperatures: {t!r} is not a positive temperature in K")
    if len({float(t) for t in temps}) != len(temps):
        raise ValueError(f"temperatures: repeated values in {temps}")

    seeds = top.raw("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1 (a count) or a list, got {seeds}")
        seeds = list(range(1, seeds + 1))
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"seeds must be a count or a non-empty list of integers, got {seeds!r}")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32:
            raise ValueError(f"seeds: {s!r} is not an integer in [0, 2^32)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: repeated values in {seeds}")
    ensemble = top.choice("ensemble", "nvt", ENSEMBLES)

    t_md = top.table("md")
    md = MDSettings(
        equilibration_ps=t_md.number("equilibration_ps", 5.0, minimum=0.0),
        production_ps=t_md.number("production_ps", 40.0, positive=True),
        timestep_fs=t_md.number("timestep_fs", 0.5, positive=True),
        discard_ps=t_md.number("discard_ps", 5.0, minimum=0.0),
        checkpoint_ps=t_md.number("checkpoint_ps", 0.5, positive=True),
    )
    t_md.finish()
    if ensemble == "nve" and md.equilibration_steps < 1:
        raise ValueError("md.equilibration_ps must be positive for ensemble = \"nve\" (NVE starts from an "
                         "equilibrated NVT checkpoint)")
    if md.production_steps < 10:
        raise ValueError(f"md.production_ps: {md.production_ps} ps is fewer than 10 steps of {md.timestep_fs} fs")

    t_run = top.table("run")
    cores = os.cpu_count() or 1
    workers, threads = t_run.integer("workers", 8), t_run.integer("threads", 1)
    if t_run.raw("drivers", "auto") == "auto":
        # one driver per core, each with >= 4 trajectories to batch: measured best on 2 cores (2 x 4 for P2x8)
        drivers = max(1, min(cores // threads, workers // 4))
    else:
        drivers = t_run.integer("drivers", 1)
    run = RunSettings(
        workers=workers,
        drivers=drivers,
        threads=threads,
        order=t_run.choice("order", "by-size", ORDERS),
        gather_ms=t_run.number("gather_ms", 20.0, minimum=0.0),
    )
    t_run.finish()
    if run.drivers * run.threads > cores:
        raise ValueError(f"run.drivers x run.threads = {run.drivers * run.threads} torch threads would "
                         f"oversubscribe the {cores} cores of this machine")
    if run.drivers > run.workers:
        raise ValueError(f"run.drivers ({run.drivers}) must not exceed run.workers ({run.workers})")

    t_trust = top.table("trust")
    trust = TrustSettings(
        measure=t_trust.choice("measure", "force", MEASURES),
        cap=t_trust.number("cap", 1.0, positive=True, optional=True),
        fragment_distance=t_trust.number("fragment_distance", 4.0, positive=True, optional=True),
    )
    t_trust.finish()

    t_sp = top.table("spectra")
    spectra = SpectraSettings(
        correlation_depth_fs=t_sp.number("correlation_depth_fs", 2048.0, positive=True),
        window=t_sp.choice("window", "hann", WINDOWS),
        harmonic=t_sp.boolean("harmonic", True),
        relax=t_sp.boolean("relax", True),
        harmonic_fwhm_cm=t_sp.number("harmonic_fwhm_cm", 16.0, positive=True),
    )
    t_sp.finish()
    usable_fs = (md.production_ps - md.discard_ps) * 1000.0
    if usable_fs <= 0:
        raise ValueError(f"md.discard_ps ({md.discard_ps} ps) must be shorter than md.production_ps "
                         f"({md.production_ps} ps)")
    if spectra.correlation_depth_fs + 2 * md.timestep_fs > usable_fs:
        raise ValueError(f"spectra.correlation_depth_fs ({spectra.correlation_depth_fs:g} fs) must be shorter than "
                         f"the production kept for spectra (md.production_ps - md.discard_ps = {usable_fs:g} fs)")

    if not top.has("clusters"):
        raise ValueError("clusters: missing (a table of name = structure file)")
    raw_clusters = top.raw("clusters")
    if not isinstance(raw_clusters, dict) or not raw_clusters:
        raise ValueError("clusters must be a non-empty table of name = structure file")
    clusters = []
    for name, value in raw_clusters.items():
        key = f"clusters.{name}"
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"{key}: cluster names may use letters, digits, '-' and '_' only")
        if isinstance(value, str):
            spec = ClusterSpec(name, _path(base, value, key))
        elif isinstance(value, dict):
            t_c = _Table(value, key + ".")
            if not t_c.has("structure"):
                raise ValueError(f"{key}.structure: missing")
            structure = _path(base, t_c.raw("structure"), key + ".structure")
            composition = t_c.raw("composition", None)
            if composition is not None and (not isinstance(composition, str) or not composition.strip()):
                raise ValueError(f"{key}.composition must be a name, got {composition!r}")
            size = t_c.integer("size", 1) if t_c.has("size") else None
            t_c.finish()
            spec = ClusterSpec(name, structure, composition, size)
        else:
            raise ValueError(f"{key} must be a structure file or a table with 'structure', got {value!r}")
        if check_files:
            if not spec.structure.is_file():
                raise ValueError(f"{key}: structure file {spec.structure} does not exist")
            try:
                n_atoms(spec.structure)
            except (ValueError, FileNotFoundError) as exc:
                raise ValueError(f"{key}: {exc}") from None
        clusters.append(spec)
    top.finish()
    return CampaignConfig(models=models, output=output, clusters=tuple(clusters),
                          temperatures=tuple(float(t) for t in temps), seeds=tuple(int(s) for s in seeds),
                          ensemble=ensemble, md=md, run=run, trust=trust, spectra=spectra, source=source)


def describe(config: CampaignConfig) -> str:
    n = len(config.clusters) * len(config.temperatures) * len(config.seeds)
    return (f"{len(config.clusters)} cluster(s) x {len(config.temperatures)} temperature(s) x "
            f"{len(config.seeds)} seed(s) = {n} trajectories of {config.md.equilibration_ps:g} ps NVT + "
            f"{config.md.production_ps:g} ps {config.ensemble.upper()} at {config.md.timestep_fs:g} fs; "
            f"{config.run.workers} at once, {config.run.drivers} batched driver(s) x {config.run.threads} thread(s)")


def run_campaign(config: CampaignConfig, log=None, analyse_only: bool = False, retry_failed: bool = True) -> dict:
    """Run (or resume) every trajectory, then write the outputs; returns the summary written to
    ``<output>/summary.json``."""
    from .campaign_report import write_outputs
    from .production import CampaignRunner

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    config.output.mkdir(parents=True, exist_ok=True)
    runner = CampaignRunner(config, log=log)
    with runner.lock():
        if not analyse_only:
            runner.run(retry_failed=retry_failed)
        return write_outputs(config, runner.states(), log=log, throughput=runner.throughput())


__all__ = ["CampaignConfig", "ClusterSpec", "MDSettings", "RunSettings", "TrustSettings", "SpectraSettings",
           "TrajectorySpec", "load_config", "config_from_dict", "run_campaign", "composition_of", "describe"]
