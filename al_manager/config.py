"""The active-learning configuration: one typed object (:class:`ALConfig`) read from a TOML file.

Every problem is a :class:`ConfigError` (a ValueError, so the CLI prints it as one line) that names the
file and the key: unknown keys (with a suggestion), wrong types, impossible values, an unknown reference
backend or backend option, a missing structure file. Relative paths resolve against the TOML file's folder.

Layout (every section and key but ``structures`` is optional; the values shown are the defaults)::

    workdir = "al_run"                 # all state of the run: database, models, i-PI runs, report
    temperatures = [100, 400, 800, 1200]   # K, sampling temperatures (the paper's low and high)
    seed = 0

    [structures]                       # name = file (extxyz/xyz, first frame); or a list of files,
    P1 = "structures/P1.xyz"           # structures = ["a.xyz", "b.xyz"], named by their file stems

    [reference]
    backend = "xtb"                    # xtb | pyscf | orca
    label_workers = 1                  # processes labelling in parallel
    options = {}                       # passed to the backend (e.g. { threads = 1 }, { command = "/opt/orca/orca" })

    [committee]
    size = 3                           # energy/force members K
    dipole_size = 1                    # dipole members J (0: no dipole model)

    [thresholds]                       # a frame is uncertain when threshold < committee std < upper_cap
    energy_per_atom = 0.002            # eV/atom, calibrated committee std of the energy per atom
    # force = 0.3                      # eV/Å, max calibrated force std; used instead of the energy when set
    # upper_cap = 0.05                 # same unit as the criterion in use: at or above, the frame "exploded"

    [sampling]
    max_md_ps = 5.0                    # maximum MD time per run and iteration (the paper: 5 ps)
    timestep_fs = 0.5
    parallel_runs = 1                  # i-PI runs at once
    mpi_ranks = 1                      # MPI ranks per nanosil-driver
    frames_per_run = 1                 # uncertain frames collected from a run before it is stopped

    [stopping]
    patience = 3                       # iterations without a better harmonic-frequency MAE
    max_iterations = 20

    [initial_data]                     # al_manager.initial_data.InitialDataSettings
    relax = true
    temperatures = [100, 300, 600, 1000, 1500]   # K, normal-mode amplitudes (turning points at k_B T)
    max_displacement = 0.3             # Å
    n_random = 10                      # random combinations of modes
    # n_select = 15                    # default 3 x N_atoms (per structure)

    [train]                            # driver.training.TrainConfig fields, passed through as given
    epochs = 400

The committee sizes of ``[committee]`` become ``TrainConfig.committee`` / ``dipole_members``
(:meth:`ALConfig.train_config_kwargs`); setting them in ``[train]`` too is an error.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .initial_data import InitialDataSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A bad configuration: one line naming the file and the key."""


@dataclass
class StructureEntry:
    name: str
    path: Path          # absolute


@dataclass
class ReferenceSettings:
    backend: str = "xtb"
    label_workers: int = 1
    options: dict = field(default_factory=dict)


@dataclass
class CommitteeSettings:
    size: int = 3           # energy/force members
    dipole_size: int = 1    # dipole members


@dataclass
class ThresholdSettings:
    energy_per_atom: float | None = 0.002   # eV/atom
    force: float | None = None              # eV/Å (takes precedence over the energy criterion)
    upper_cap: float | None = None          # unit of the criterion in use


@dataclass
class SamplingLimits:
    max_md_ps: float = 5.0
    timestep_fs: float = 0.5
    parallel_runs: int = 1
    mpi_ranks: int = 1
    frames_per_run: int = 1


@dataclass
class StoppingRule:
    patience: int = 3
    max_iterations: int = 20


DEFAULT_TEMPERATURES = [100.0, 400.0, 800.0, 1200.0]


@dataclass
class ALConfig:
    """The whole configuration, validated, paths absolute."""

    structures: list[StructureEntry]
    workdir: Path
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    seed: int = 0
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    committee: CommitteeSettings = field(default_factory=CommitteeSettings)
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    sampling: SamplingLimits = field(default_factory=SamplingLimits)
    stopping: StoppingRule = field(default_factory=StoppingRule)
    initial_data: InitialDataSettings = field(default_factory=InitialDataSettings)
    train: dict = field(default_factory=dict)
    source: Path | None = None    # the TOML file

    @property
    def structure_files(self) -> dict[str, Path]:
        """name -> absolute structure file, in the order of the configuration."""
        return {s.name: s.path for s in self.structures}

    def backend(self):
        """The configured reference backend (a fresh object)."""
        from al_manager.reference import get_backend

        return get_backend(self.reference.backend, **self.reference.options)

    def train_config_kwargs(self, **overrides) -> dict:
        """Keyword arguments for ``driver.training.TrainConfig``: ``[train]`` plus the committee sizes;
        ``overrides`` win (e.g. ``warm_start``)."""
        kw = dict(self.train)
        kw["committee"] = self.committee.size
        kw["dipole_members"] = self.committee.dipole_size
        kw.update(overrides)
        return kw


# ---------------------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> ALConfig:
    """Read and validate a TOML configuration file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.resolve().parent, source=path.resolve())


_TOP_KEYS = ("workdir", "temperatures", "seed", "structures", "reference", "committee", "thresholds",
             "sampling", "stopping", "initial_data", "train")
_SECTIONS = {"reference": ReferenceSettings, "committee": CommitteeSettings, "thresholds": ThresholdSettings,
             "sampling": SamplingLimits, "stopping": StoppingRule, "initial_data": InitialDataSettings}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_config(data: dict, base_dir: str | Path = ".", source: Path | None = None) -> ALConfig:
    """Validate a parsed TOML document (a dict); relative paths resolve against ``base_dir``."""
    where = str(source) if source is not None else "configuration"
    base_dir = Path(base_dir).resolve()

    def fail(key: str, problem: str):
        raise ConfigError(f"{where}: {key}: {problem}")

    _check_keys(data, _TOP_KEYS, "", fail)

    # sections
    sections = {}
    for name, cls in _SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            fail(name, f"must be a table ([{name}]), got {_tname(table)}")
        sections[name] = _build(cls, table, name, fail)

    # top level
    seed = _convert(data.get("seed", 0), int, "seed", fail)
    temperatures = _convert(data.get("temperatures", DEFAULT_TEMPERATURES), list[float], "temperatures", fail)
    if not temperatures:
        fail("temperatures", "needs at least one temperature (K)")
    for k, t in enumerate(temperatures):
        if not t > 0:
            fail(f"temperatures[{k}]", f"{t:g} K: temperatures must be > 0 K")
    if len(set(temperatures)) != len(temperatures):
        fail("temperatures", f"repeated temperature in {temperatures}")
    workdir_raw = _convert(data.get("workdir", "al_run"), str, "workdir", fail)
    if not workdir_raw.strip():
        fail("workdir", "must not be empty")
    workdir = (base_dir / Path(workdir_raw).expanduser()).resolve()
    structures = _structures(data.get("structures"), base_dir, fail)
    train = data.get("train", {})
    if not isinstance(train, dict):
        fail("train", f"must be a table ([train]), got {_tname(train)}")

    cfg = ALConfig(structures=structures, workdir=workdir, temperatures=[float(t) for t in temperatures],
                   seed=seed, train=dict(train), source=source, **sections)
    _validate(cfg, fail)
    return cfg


def _structures(value, base_dir: Path, fail) -> list[StructureEntry]:
    if value is None:
        fail("structures", "missing: give [structures] name = \"file.xyz\" entries or structures = [\"file.xyz\", ...]")
    if isinstance(value, list):
        items = []
        for k, v in enumerate(value):
            if not isinstance(v, str):
                fail(f"structures[{k}]", f"must be a file name (string), got {_tname(v)}")
            items.append((Path(v).stem, v, f"structures[{k}]"))
    elif isinstance(value, dict):
        items = []
        for name, v in value.items():
            if not isinstance(v, str):
                fail(f"structures.{name}", f"must be a file name (string), got {_tname(v)}")
            items.append((name, v, f"structures.{name}"))
    else:
        fail("structures", f"must be a table of name = file or a list of files, got {_tname(value)}")
    if not items:
        fail("structures", "no structure given")
    out, seen = [], set()
    for name, file, key in items:
        if not _NAME.match(name):
            fail(key, f"name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names files and runs)")
        if name in seen:
            fail(key, f"structure name {name!r} used twice")
        seen.add(name)
        path = (base_dir / Path(file).expanduser()).resolve()
        if not path.is_file():
            fail(key, f"structure file {path} does not exist")
        try:
            from ase.io import read

            atoms = read(str(path), index=0)
        except Exception as exc:
            fail(key, f"cannot read {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
        if len(atoms) < 2:
            fail(key, f"{path} holds {len(atoms)} atom(s): a cluster needs at least 2")
        out.append(StructureEntry(name=name, path=path))
    return out


def _validate(cfg: ALConfig, fail) -> None:
    from al_manager.reference.base import _BACKENDS, get_backend

    ref = cfg.reference
    if ref.backend not in _BACKENDS:
        hint = _suggest(ref.backend, _BACKENDS)
        fail("reference.backend", f"unknown backend {ref.backend!r}; choose from {', '.join(_BACKENDS)}{hint}")
    try:
        get_backend(ref.backend, **ref.options)  # checks the option names and values, runs nothing
    except (ValueError, TypeError) as exc:
        fail("reference.options", " ".join(str(exc).split()))
    except ImportError:
        pass  # a backend whose library is missing is reported when it is used, not when planning
    if ref.label_workers < 1:
        fail("reference.label_workers", f"must be >= 1, got {ref.label_workers}")

    com = cfg.committee
    if not 1 <= com.size <= 8:
        fail("committee.size", f"must be 1-8 (the paper: an ensemble of a few models), got {com.size}")
    if com.dipole_size < 0:
        fail("committee.dipole_size", f"must be >= 0, got {com.dipole_size}")

    th = cfg.thresholds
    for key in ("energy_per_atom", "force", "upper_cap"):
        value = getattr(th, key)
        if value is not None and not value > 0:
            fail(f"thresholds.{key}", f"must be > 0, got {value:g}")
    if th.energy_per_atom is None and th.force is None:  # pragma: no cover - TOML has no null
        fail("thresholds", "set energy_per_atom or force")
    in_use, unit = (("force", "eV/Å") if th.force is not None else ("energy_per_atom", "eV/atom"))
    threshold = getattr(th, in_use)
    if th.upper_cap is not None and th.upper_cap <= threshold:
        fail("thresholds.upper_cap", f"{th.upper_cap:g} must be above the {in_use} threshold {threshold:g} {unit}")

    s = cfg.sampling
    for key in ("max_md_ps", "timestep_fs"):
        if not getattr(s, key) > 0:
            fail(f"sampling.{key}", f"must be > 0, got {getattr(s, key):g}")
    if s.timestep_fs > 5:
        fail("sampling.timestep_fs", f"{s.timestep_fs:g} fs is too long for MD with O and Mg (use 0.5-2 fs)")
    if s.max_md_ps * 1000.0 < s.timestep_fs:
        fail("sampling.max_md_ps", f"{s.max_md_ps:g} ps is shorter than one time step")
    for key in ("parallel_runs", "mpi_ranks", "frames_per_run"):
        if getattr(s, key) < 1:
            fail(f"sampling.{key}", f"must be >= 1, got {getattr(s, key)}")
    members = com.size + com.dipole_size
    if s.mpi_ranks > members:
        fail("sampling.mpi_ranks", f"{s.mpi_ranks} ranks for {members} committee members: ranks split the "
                                   f"members, so at most {members}")

    st = cfg.stopping
    if st.patience < 1:
        fail("stopping.patience", f"must be >= 1, got {st.patience}")
    if st.max_iterations < 0:
        fail("stopping.max_iterations", f"must be >= 0, got {st.max_iterations}")

    _validate_train(cfg.train, fail)


def _train_fields() -> tuple[str, ...]:
    try:
        from driver.training import TrainConfig
    except ImportError:  # pragma: no cover - the training module is part of the project
        return ()
    return tuple(f.name for f in dataclasses.fields(TrainConfig))


def _validate_train(train: dict, fail) -> None:
    for key, managed in (("committee", "committee.size"), ("dipole_members", "committee.dipole_size")):
        if key in train:
            fail(f"train.{key}", f"set it as {managed} in [committee]")
    if "warm_start" in train:
        fail("train.warm_start", "is set by the active-learning loop (the previous iteration's models)")
    known = _train_fields()
    if known:
        for key in train:
            if key not in known:
                fail(f"train.{key}", f"unknown training setting{_suggest(key, known)}; known: {', '.join(known)}")


# ---------------------------------------------------------------------------------------- typing
def _check_keys(table: dict, known, prefix: str, fail) -> None:
    for key in table:
        if key not in known:
            full = f"{prefix}{key}"
            fail(full, f"unknown key{_suggest(key, known)}; known here: {', '.join(known)}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _tname(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _build(cls, table: dict, section: str, fail):
    """A settings dataclass from a TOML table: unknown keys and wrong types refused, then the class's own
    checks (``__post_init__``), whose messages start with the field name."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(table, names, f"{section}.", fail)
    kwargs = {key: _convert(value, hints[key], f"{section}.{key}", fail) for key, value in table.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        m = re.match(r"^([A-Za-z_]\w*)(\[\d+\])?", message)
        if m and m.group(1) in names:
            fail(f"{section}.{m.group(1)}{m.group(2) or ''}", message)
        fail(section, message)


def _convert(value, tp, key: str, fail):
    """``value`` (from TOML) as type ``tp``; ints are accepted for floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(types, "UnionType", typing.Union)):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, key, fail)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, f"must be true or false, got {_tname(value)} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, f"must be an integer, got {_tname(value)} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, f"must be a number, got {_tname(value)} {value!r}")
        if not math.isfinite(value):
            fail(key, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(key, f"must be a string, got {_tname(value)} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            fail(key, f"must be a list, got {_tname(value)} {value!r}")
        (item,) = typing.get_args(tp) or (typing.Any,)
        return [_convert(v, item, f"{key}[{k}]", fail) for k, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            fail(key, f"must be a table, got {_tname(value)} {value!r}")
        return dict(value)
    if tp is Path:
        return Path(_convert(value, str, key, fail))
    return value  # typing.Any


# ---------------------------------------------------------------------------------------- the loop
def loop_plan(cfg: ALConfig):
    """The :class:`al_manager.loop.LoopPlan` of a configuration (what ``nanosil al run`` executes)."""
    from . import loop, sampling

    fields = {f.name for f in dataclasses.fields(sampling.SamplingSettings)}
    s = cfg.sampling
    sampling_kw = dict(max_md_ps=s.max_md_ps, frames_per_run=s.frames_per_run, max_parallel=s.parallel_runs,
                       mpi_ranks=s.mpi_ranks, energy_threshold=cfg.thresholds.energy_per_atom,
                       force_threshold=cfg.thresholds.force, upper_cap=cfg.thresholds.upper_cap, seed=cfg.seed)
    if "timestep_fs" in fields:
        sampling_kw["timestep_fs"] = s.timestep_fs
    elif not math.isclose(s.timestep_fs, getattr(sampling, "TIMESTEP_FS", s.timestep_fs)):
        raise ConfigError(f"{cfg.source or 'configuration'}: sampling.timestep_fs: the sampler runs "
                          f"{sampling.TIMESTEP_FS:g} fs steps (ipi_inputs/al_sampling.xml); got {s.timestep_fs:g}")
    sampling_settings = sampling.SamplingSettings(**{k: v for k, v in sampling_kw.items() if k in fields})
    plan_fields = {f.name for f in dataclasses.fields(loop.LoopPlan)}
    plan_kw = dict(workdir=cfg.workdir, structures={n: str(p) for n, p in cfg.structure_files.items()},
                   temperatures=list(cfg.temperatures), backend=cfg.reference.backend,
                   backend_options=dict(cfg.reference.options), label_workers=cfg.reference.label_workers,
                   train=cfg.train_config_kwargs(), sampling=sampling_settings, patience=cfg.stopping.patience,
                   max_iterations=cfg.stopping.max_iterations, relax_reference=cfg.initial_data.relax,
                   seed=cfg.seed, initial_data=cfg.initial_data)
    return loop.LoopPlan(**{k: v for k, v in plan_kw.items() if k in plan_fields})
