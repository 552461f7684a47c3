"""Production IR campaigns, the configuration: its typed sections and the plan (one trajectory per cluster,
temperature and seed). :mod:`al_manager.campaign.runner` runs the MD, :mod:`al_manager.campaign.report`
writes the spectra, plots, size sums and ``summary.json``.

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
    dipole_stride_fs = 2.0              # dipole (and per-member dipoles) written, and computed, every this many fs;
                                        # a multiple of timestep_fs. The spectrum reaches 1 / (2 c stride):
                                        # 8340 cm^-1 at 2 fs, 4170 at 4 fs (a 4000 cm^-1 band needs <= 4 fs)
    committee_every_fs = "none"         # "none": propagate on the committee mean, the committee every step. A
                                        # multiple of timestep_fs: propagate on energy member 0 alone and run
                                        # the whole committee (disagreement, trust cap) every this many fs,
                                        # ~1/3 of the model's cost for 3 members (driver.ipi.batch_server)

    [run]
    workers = 8                         # trajectories at once (one i-PI each)
    drivers = "auto"                    # batched driver processes: auto = min(cores // threads, workers // 4)
    threads = 1                         # torch threads per driver; drivers x threads <= cores
    order = "by-size"                   # queue order: by-size (largest first) keeps similar sizes in the same batches | listed
    gather_ms = 20.0                    # how long a driver waits for the other trajectories before a pass

    [trust]
    measure = "force"                   # max force std (eV/Å) | energy (std per atom, eV/atom)
    trust_cap = 1.0                     # stop a trajectory whose disagreement reaches this; "none": never
    fragment_distance = 4.0             # Å: stop when the cluster falls apart into parts this far apart

    [spectra]
    correlation_depth_fs = 2048.0
    window = "parzen"                   # lag window: parzen (non-negative spectrum) | bartlett | hann (the paper) | none
    harmonic = true                     # harmonic spectrum of the committee (autograd Hessian) on the plots
    relax = true                        # relax the structure with the committee before the Hessian
    harmonic_fwhm_cm = 16.0             # Gaussian width of the harmonic lines on the plots
    correct_central_difference = true   # divide out the (sin x/x)^2 damping of the dipole's central difference
                                        # (x = 2 pi c nu dt): -4.4% at 1000 cm^-1 with a dipole every 2 fs

    [execution]                         # where the trajectories run: the AL's section (al_manager.execution);
    mode = "parsl"                      # "local" (default) | "parsl": the trajectories are split into shards,
                                        # one Parsl task each on the sampling pool ([execution.sampling]
                                        # pairs_per_node shards per node), each shard a campaign of its own on
                                        # its node ([run] is per node) in the shared output folder; the
                                        # manager assembles the spectra

    [clusters]                          # name = structure file, or a table
    P1 = "structures/pyroxene_N01_GM.xyz"
    O2 = { structure = "structures/olivine_N02_GM.xyz", composition = "olivine", size = 2 }

Read by the one typed loader (:mod:`al_manager.settings`): every bad value is one ``ConfigError`` line naming
the file and the key (``md.production_ps``, ``clusters.P1.structure`` ...); unknown keys get a suggestion.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from al_manager.execution import ExecutionSettings, build_execution
from al_manager.settings import Where, build, check_keys, convert, read_toml, table_of, temperatures

COMPOSITIONS = {"pyroxene": {"Mg": 1, "Si": 1, "O": 3}, "olivine": {"Mg": 2, "Si": 1, "O": 4}}


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    structure: Path
    composition: str | None = None   # e.g. "pyroxene"; default from the formula
    size: int | None = None          # formula units N; default from the formula

    def __post_init__(self):
        if self.composition is not None and not self.composition.strip():
            raise ValueError("composition must be a name")
        if self.size is not None and self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")


def _positive(obj, *names: str, zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value >= 0 if zero_ok else value > 0):
            raise ValueError(f"{name} must be {'>= 0' if zero_ok else 'positive'}, got {value!r}")


@dataclass(frozen=True)
class MDSettings:
    equilibration_ps: float = 5.0
    production_ps: float = 40.0
    timestep_fs: float = 0.5
    discard_ps: float = 5.0
    checkpoint_ps: float = 0.5
    dipole_stride_fs: float = 2.0
    committee_every_fs: float | None = None

    def __post_init__(self):
        _positive(self, "production_ps", "timestep_fs", "checkpoint_ps", "dipole_stride_fs", "committee_every_fs")
        _positive(self, "equilibration_ps", "discard_ps", zero_ok=True)
        for name in ("dipole_stride_fs", "committee_every_fs"):
            value = getattr(self, name)
            ratio = None if value is None else value / self.timestep_fs
            if ratio is not None and (abs(ratio - round(ratio)) > 1e-9 * max(1.0, ratio) or round(ratio) < 1):
                raise ValueError(f"{name} ({value:g} fs) must be a multiple of timestep_fs ({self.timestep_fs:g} fs)")
        if self.production_steps < 10:
            raise ValueError(f"production_ps: {self.production_ps} ps is fewer than 10 steps of {self.timestep_fs} fs")
        if self.discard_ps >= self.production_ps:
            raise ValueError(f"discard_ps ({self.discard_ps} ps) must be shorter than production_ps "
                             f"({self.production_ps} ps)")

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

    @property
    def dipole_stride(self) -> int:
        """MD steps between written (and computed) dipoles."""
        return int(round(self.dipole_stride_fs / self.timestep_fs))

    @property
    def committee_every(self) -> int:
        """MD steps between whole-committee evaluations (1: the committee mean propagates every step)."""
        return 1 if self.committee_every_fs is None else int(round(self.committee_every_fs / self.timestep_fs))


@dataclass(frozen=True)
class RunSettings:
    workers: int = 8
    drivers: int | Literal["auto"] = "auto"   # resolved to a number by config_from_dict
    threads: int = 1
    order: Literal["by-size", "listed"] = "by-size"
    gather_ms: float = 20.0

    def __post_init__(self):
        for name in ("workers", "threads") + (() if self.drivers == "auto" else ("drivers",)):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        _positive(self, "gather_ms", zero_ok=True)


@dataclass(frozen=True)
class TrustSettings:
    measure: Literal["force", "energy"] = "force"
    trust_cap: float | None = 1.0
    fragment_distance: float | None = 4.0

    def __post_init__(self):
        _positive(self, "trust_cap", "fragment_distance")


@dataclass(frozen=True)
class SpectraSettings:
    correlation_depth_fs: float = 2048.0
    window: str = "parzen"
    harmonic: bool = True
    relax: bool = True
    harmonic_fwhm_cm: float = 16.0
    correct_central_difference: bool = True

    def __post_init__(self):
        from spectra.autocorrelation import WINDOWS

        _positive(self, "correlation_depth_fs", "harmonic_fwhm_cm")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {self.window!r}")


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
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)   # [execution], as the AL's
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
            out = [out[k] for k in by_size([sizes[t.cluster.name] for t in out])]
        return out


def by_size(sizes: list[int]) -> list[int]:
    """The ``by-size`` queue order of trajectories with atom counts ``sizes`` (indices): largest first, ties
    as listed. The longest trajectories start early, so the campaign does not end on one big cluster on one
    driver while the other cores idle (longest-processing-time-first)."""
    return sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))


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
        from ipi_inputs.files import read_cluster

        _N_ATOMS_CACHE[key] = len(read_cluster(path))
    return _N_ATOMS_CACHE[key]


def composition_of(cluster: ClusterSpec, atoms=None) -> tuple[str, int]:
    """(composition name, size N): pyroxene (MgSiO3)N and olivine (Mg2SiO4)N are recognised from the
    formula; anything else is its own composition (its empirical formula) of size 1. The config's
    ``composition`` and ``size`` override both."""
    if atoms is None:
        from ipi_inputs.files import read_cluster

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
_TOP = ("models", "output", "temperatures", "seeds", "ensemble", "md", "run", "trust", "spectra", "clusters",
        "execution")
_RENAMED = {"trust.cap": "trust.trust_cap"}


def load_config(path: str | os.PathLike, check_files: bool = True) -> CampaignConfig:
    """Read and validate a campaign TOML file (see the module docstring)."""
    data = read_toml(path, "campaign config")
    path = Path(path)
    return config_from_dict(data, path.resolve().parent, source=path, check_files=check_files)


def config_from_dict(data: dict, base: Path, source: Path | None = None, check_files: bool = True) -> CampaignConfig:
    """Validate a parsed campaign TOML document; relative paths resolve against ``base``."""
    where = Where(source)
    for old, new in _RENAMED.items():
        section, _, key = old.partition(".")
        if key in (data.get(section) or {}):
            where.fail(old, f"is now called {new}")
    check_keys(data, _TOP, "", where)
    if "models" not in data:
        where.fail("models", "missing (the committee folder)")
    models = base / convert(data["models"], Path, "models", where)
    if check_files and not (models / "committee.json").is_file():
        where.fail("models", f"{models} is not a committee folder (no committee.json)")
    default_out = base / (source.stem if source is not None else "campaign")
    output = base / convert(data["output"], Path, "output", where) if "output" in data else default_out

    temps = temperatures(data.get("temperatures", [100, 400, 800]), "temperatures", where)
    seeds = data.get("seeds", 3)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            where.fail("seeds", f"must be >= 1 (a count) or a list, got {seeds}")
        seeds = list(range(1, seeds + 1))
    seeds = convert(seeds, list[int], "seeds", where)
    if not seeds or any(not 0 <= s < 2**32 for s in seeds):
        where.fail("seeds", f"must be a count or a non-empty list of integers in [0, 2^32), got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        where.fail("seeds", f"repeated values in {seeds}")
    ensemble = convert(data.get("ensemble", "nvt"), Literal["nvt", "nve"], "ensemble", where)

    md = build(MDSettings, table_of(data, "md", where), "md", where)
    if ensemble == "nve" and md.equilibration_steps < 1:
        where.fail("md.equilibration_ps", "must be positive for ensemble = \"nve\" (NVE starts from an "
                                          "equilibrated NVT checkpoint)")
    run = build(RunSettings, table_of(data, "run", where), "run", where)
    execution = build_execution(table_of(data, "execution", where), where)
    # [run] describes one node's share: this machine's, or a Parsl node's ([execution] cores_per_node; unknown
    # before the job starts unless given)
    remote = execution.uses_parsl and execution.provider != "local"
    cores = execution.cores_per_node if remote else (os.cpu_count() or 1)
    where_cores = "cores_per_node of [execution]" if remote else "cores of this machine"
    if run.drivers == "auto":
        # one driver per core, each with >= 4 trajectories to batch (bench/campaign_throughput.py)
        run = replace(run, drivers=max(1, min((cores or run.workers) // run.threads, run.workers // 4)))
    if cores and run.drivers * run.threads > cores:
        where.fail("run", f"drivers x threads = {run.drivers * run.threads} torch threads would "
                          f"oversubscribe the {cores} {where_cores}")
    if run.drivers > run.workers:
        where.fail("run.drivers", f"({run.drivers}) must not exceed run.workers ({run.workers})")
    trust = build(TrustSettings, table_of(data, "trust", where), "trust", where)
    spectra = build(SpectraSettings, table_of(data, "spectra", where), "spectra", where)
    usable_fs = (md.production_ps - md.discard_ps) * 1000.0
    if spectra.correlation_depth_fs + 2 * md.dipole_stride_fs > usable_fs:
        where.fail("spectra.correlation_depth_fs", f"({spectra.correlation_depth_fs:g} fs) must be shorter than "
                   f"the production kept for spectra (md.production_ps - md.discard_ps = {usable_fs:g} fs)")

    raw_clusters = data.get("clusters")
    if raw_clusters is None:
        where.fail("clusters", "missing (a table of name = structure file)")
    if not isinstance(raw_clusters, dict) or not raw_clusters:
        where.fail("clusters", "must be a non-empty table of name = structure file")
    clusters = []
    for name, value in raw_clusters.items():
        key = f"clusters.{name}"
        if not name.replace("_", "").replace("-", "").isalnum():
            where.fail(key, "cluster names may use letters, digits, '-' and '_' only")
        if isinstance(value, str):
            value = {"structure": value}
        if not isinstance(value, dict):
            where.fail(key, f"must be a structure file or a table with 'structure', got {value!r}")
        if "structure" not in value:
            where.fail(f"{key}.structure", "missing")
        table = dict(value)
        structure = base / convert(table.pop("structure"), Path, f"{key}.structure", where)
        spec = build(ClusterSpec, table, key, where, name=name, structure=structure)
        if check_files:
            if not spec.structure.is_file():
                where.fail(key, f"structure file {spec.structure} does not exist")
            try:
                n_atoms(spec.structure)
            except (ValueError, FileNotFoundError) as exc:
                where.fail(key, str(exc))
        clusters.append(spec)
    return CampaignConfig(models=models, output=output, clusters=tuple(clusters),
                          temperatures=tuple(temps), seeds=tuple(seeds),
                          ensemble=ensemble, md=md, run=run, trust=trust, spectra=spectra, execution=execution,
                          source=source)


def describe(config: CampaignConfig) -> str:
    n = len(config.clusters) * len(config.temperatures) * len(config.seeds)
    return (f"{len(config.clusters)} cluster(s) x {len(config.temperatures)} temperature(s) x "
            f"{len(config.seeds)} seed(s) = {n} trajectories of {config.md.equilibration_ps:g} ps NVT + "
            f"{config.md.production_ps:g} ps {config.ensemble.upper()} at {config.md.timestep_fs:g} fs, dipole every "
            f"{config.md.dipole_stride_fs:g} fs; "
            f"{config.run.workers} at once, {config.run.drivers} batched driver(s) x {config.run.threads} thread(s)")


__all__ = ["CampaignConfig", "ClusterSpec", "MDSettings", "RunSettings", "TrustSettings", "SpectraSettings",
           "TrajectorySpec", "load_config", "config_from_dict", "composition_of", "describe"]
