"""The active-learning configuration: one typed object (:class:`ALConfig`) read from a TOML file.

Each TOML section is the very object its consumer takes, built by the shared loader
(:func:`al_manager.settings.build`): ``[sampling]`` is :class:`al_manager.learning.sampling.SamplingSettings`,
``[train]`` is :class:`driver.training.TrainConfig`, ``[initial_data]`` is
:class:`al_manager.learning.initial_data.InitialDataSettings`. A setting has one name from the TOML file to
the command-line flag to the log (``energy_threshold`` is ``--energy-threshold``, ``trust_cap`` is
``--trust-cap``, ``[train] committee`` is ``nanosil train --committee``, ``[reference] workers`` is
``nanosil label --workers``).

Every problem is a :class:`~al_manager.settings.ConfigError` (a ValueError, so the CLI prints it as one line)
that names the file and the key, before any work starts: unknown keys (with a suggestion), old names (with
the new one), wrong types (``epochs = "400"``), impossible values, an unknown reference backend or backend
option, a missing or unreadable structure file, an element the model cannot hold. Relative paths resolve
against the TOML file's folder.

Layout (every section and key but ``structures`` is optional; the values shown are the defaults)::

    workdir = "al_run"                 # all state of the run: database, models, i-PI runs, report
    temperatures = [100, 400, 800, 1200]   # K, sampling temperatures (the paper's low and high)
    seed = 0                           # the sampling runs' seeds derive from it

    [structures]                       # name = file (extxyz/xyz, first frame); or a list of files,
    P1 = "structures/P1.xyz"           # structures = ["a.xyz", "b.xyz"], named by their file stems

    [reference]
    backend = "xtb"                    # xtb | pyscf | orca
    workers = 1                        # processes labelling in parallel (nanosil label --workers)
    options = {}                       # passed to the backend (e.g. { threads = 1 }, { command = "/opt/orca/orca" })

    [sampling]                         # al_manager.learning.sampling.SamplingSettings
    energy_threshold = 0.002           # eV/atom: a frame is uncertain when the calibrated committee std of
                                       # the energy per atom exceeds it (nanosil-driver --energy-threshold)
    # force_threshold = 0.3            # eV/Å, max calibrated force std; used instead of the energy when set
    # trust_cap = 0.05                 # same unit as the criterion in use: at or above, the frame "exploded"
                                       # and the run stops (nanosil-driver --trust-cap); default: no cap
    max_md_ps = 5.0                    # maximum MD time per run and iteration (the paper: 5 ps; at most 5)
    timestep_fs = 0.5                  # MD time step
    parallel_runs = 1                  # i-PI runs at once
    mpi_ranks = 1                      # MPI ranks per nanosil-driver (at most the committee's members)
    frames_per_run = 1                 # uncertain frames collected from a run before it is stopped
    driver_threads = 1                 # torch threads per rank
    dtype = "float32"                  # float32 | float64
    socket_timeout_s = 300.0           # i-PI declares a silent driver dead after this
    exit_grace_s = 60.0                # after EXIT, time i-PI gets to finish its step and checkpoint
    partner_grace_s = 10.0             # after i-PI or the driver ended, time the other gets to follow
    max_wall_s = "none"                # hard wall-clock limit of one run, s ("none": the MD length decides)
    log_every = 1000                   # driver progress line every this many steps

    [stopping]
    patience = 3                       # iterations without a better harmonic-frequency MAE
    max_iterations = 20
    # max_labels = 400                 # a label budget: an iteration labels at most what is left of it
                                       # (its most uncertain frames), and the loop stops when it is spent
    final_epochs = 0                   # > 0: once the loop stops, train the committee from scratch (or from
                                       # [train] pretrained) on every label for this many epochs (no early
                                       # stopping) -> models/final,
                                       # measured like an iteration (row "final" of report.csv)
    # final_from = "scratch"           # "last": continue the last iteration's committee instead (a polish)
    # final_lr = 5e-4                  # its learning rate (default: [train] lr), decaying to zero
    # final_hold_out = true            # false: every label trains every member (no validation tenth, no
                                       # subsample; the calibration is then the last iteration's committee's)

    [initial_data]                     # al_manager.learning.initial_data.InitialDataSettings
    relax = true                       # relax with the reference method first (also the start of sampling)
    relax_fmax = 0.01                  # eV/Å
    temperatures = [100, 300, 600, 1000, 1500]   # K, normal-mode amplitudes (turning points at k_B T)
    max_displacement = 0.3             # Å
    n_random = 10                      # random combinations of modes
    # n_select = 15                    # default 3 x N_atoms (per structure)
    balance_temperatures = true        # FPS takes each temperature in turn, an equal share each (false:
                                       # one FPS over all, which keeps almost only the hottest candidates)
    seed = 0

    [train]                            # driver.training.TrainConfig (the fields of `nanosil train`)
    committee = 3                      # energy/force members K (1-8)
    dipole_members = 1                 # dipole members J (0: no dipole model)
    epochs = 400
    # ... every other TrainConfig field (patience, batch_size, lr, log_every, max_minutes, ...);
    # model = { hidden = [512, 512], species = ["Mg", "Si", "O"] }   # driver.models ModelConfig fields
    # model = { cutoff = 6.0 }         # Å (default 5): a wider radius damps second neighbours less and costs
                                       # more pairs in MD; bench/label_efficiency.py --cutoff measures the accuracy
    # warm_start is set by the loop (the previous iteration's committee)
    # pretrained = "xtb_run/models/iter_005"   # transfer learning: iteration 0 fine-tunes this committee,
                                       # trained on another reference method (e.g. cheap GFN2-xTB labels),
                                       # instead of training from scratch. Its per-element energy shift is
                                       # refitted on the new labels (the methods' total energies differ by
                                       # per-element constants, thousands of eV for xTB vs PBE0), its model
                                       # (sizes, cutoffs, species) is used, so its species must cover the
                                       # structures and its member counts must equal committee and
                                       # dipole_members; [train] model may only repeat its values. Checked
                                       # when the file is read; later iterations warm-start as usual.

Old names are refused with their new one (:data:`RENAMED`): ``[committee] size / dipole_size`` are
``[train] committee / dipole_members``; ``[thresholds] energy_per_atom / force / upper_cap`` are
``[sampling] energy_threshold / force_threshold / trust_cap``; ``reference.label_workers`` is
``reference.workers``.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from al_manager.execution import ExecutionSettings, build_execution
from al_manager.settings import (ConfigError, Where, build, check_keys, convert, read_toml, suggest, table_of,
                                 temperatures as temperature_list, type_name)

from .initial_data import InitialDataSettings
from .sampling import SamplingSettings

if typing.TYPE_CHECKING:  # driver.training imports torch: loaded when a configuration is parsed
    from driver.training import TrainConfig

__all__ = ["ALConfig", "ConfigError", "ReferenceSettings", "StoppingRule", "StructureEntry", "RENAMED",
           "load_config", "parse_config"]


@dataclass
class StructureEntry:
    name: str
    path: Path          # absolute


@dataclass
class ReferenceSettings:
    """The ``[reference]`` section: the labelling method."""

    backend: str = "xtb"
    workers: int = 1                                   # processes labelling in parallel
    options: dict = field(default_factory=dict)        # passed to the backend

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class StoppingRule:
    """The ``[stopping]`` section."""

    patience: int = 3           # iterations without a better harmonic-frequency MAE
    max_iterations: int = 20
    max_labels: int | None = None   # stop once the dataset holds this many labels (a label budget)
    # A long training from fresh weights once the loop stops (0: the last iteration's committee is the
    # result). Off by default: on the full run of bench/label_efficiency.py a final schedule as long as three
    # retrains ended worse than the chain of warm-started retrains it replaces; it is meant for a final
    # schedule much longer than the whole chain's.
    final_epochs: int = 0
    # "scratch": fresh weights (or [train] pretrained); "last": continue the last iteration's committee (a
    # polish: on that run, 800 epochs at lr 5e-4 from iteration 11 took the MAE from 2.74 to 2.55 cm^-1; on
    # the next full run, from a committee at 2.19, to 2.22: it mends a drifted retrain)
    final_from: Literal["scratch", "last"] = "scratch"
    final_lr: float | None = None      # learning rate of the final training (default: [train] lr)
    # False: every label trains every member of the final committee: the validation tenth too
    # (driver.training.TrainConfig.hold_out) and no [train] subsample. Under a label budget the tenth held
    # out, and the tenth each member skips, are labels lost to the result (bench/label_efficiency.py
    # measures it). With final_from = "last" the calibration factors are the last iteration's committee's,
    # which held those frames out.
    final_hold_out: bool = True

    def __post_init__(self):
        if self.final_epochs < 0:
            raise ValueError(f"final_epochs must be >= 0, got {self.final_epochs}")
        if self.final_lr is not None and not self.final_lr > 0:
            raise ValueError(f"final_lr must be > 0, got {self.final_lr:g}")
        if self.max_labels is not None and self.max_labels < 1:
            raise ValueError(f"max_labels must be >= 1, got {self.max_labels}")
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.max_iterations < 0:
            raise ValueError(f"max_iterations must be >= 0, got {self.max_iterations}")


DEFAULT_TEMPERATURES = [100.0, 400.0, 800.0, 1200.0]


def _default_train():
    from driver.training import TrainConfig

    return TrainConfig()


@dataclass
class ALConfig:
    """The whole configuration, validated, paths absolute: what the loop (:mod:`al_manager.learning.loop`) runs."""

    structures: list[StructureEntry]
    workdir: Path
    temperatures: list[float] = field(default_factory=lambda: list(DEFAULT_TEMPERATURES))
    seed: int = 0
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    stopping: StoppingRule = field(default_factory=StoppingRule)
    initial_data: InitialDataSettings = field(default_factory=InitialDataSettings)
    train: "TrainConfig" = field(default_factory=_default_train)
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)   # where the work runs
    source: Path | None = None    # the TOML file

    @property
    def structure_files(self) -> dict[str, Path]:
        """name -> absolute structure file, in the order of the configuration."""
        return {s.name: s.path for s in self.structures}

    def backend(self):
        """The configured reference backend (a fresh object)."""
        from al_manager.reference import get_backend

        return get_backend(self.reference.backend, **self.reference.options)

    def train_config(self, warm_start: str | Path | None = None) -> "TrainConfig":
        """``[train]`` with the loop's warm start (a new object; the configuration is not modified). Without
        a warm start (iteration 0) a ``pretrained`` committee stays; with one it is dropped: the previous
        iteration's committee already descends from it."""
        if warm_start is None:
            return dataclasses.replace(self.train, warm_start=None)
        return dataclasses.replace(self.train, warm_start=str(warm_start), pretrained=None)


# ---------------------------------------------------------------------------------------- names
# old key (dotted) -> what to write instead; refused with that hint
RENAMED = {
    "committee": "[train] committee, dipole_members",
    "committee.size": "train.committee",
    "committee.dipole_size": "train.dipole_members",
    "thresholds": "[sampling] energy_threshold, force_threshold, trust_cap",
    "thresholds.energy_per_atom": "sampling.energy_threshold",
    "thresholds.force": "sampling.force_threshold",
    "thresholds.upper_cap": "sampling.trust_cap",
    "sampling.upper_cap": "sampling.trust_cap",
    "sampling.max_parallel": "sampling.parallel_runs",
    "reference.label_workers": "reference.workers",
    "initial_data.relax_reference": "initial_data.relax",
}

# keys of a section that the configuration sets elsewhere
_SET_ELSEWHERE = {
    "sampling.seed": "set by the top-level seed",
    "train.warm_start": "set by the active-learning loop (the previous iteration's committee)",
}

_TOP_KEYS = ("workdir", "temperatures", "seed", "structures", "reference", "sampling", "stopping",
             "initial_data", "train", "execution")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _refuse_old_names(data: dict, where: Where) -> None:
    for key, value in data.items():
        if isinstance(value, dict):
            for sub in value:
                full = f"{key}.{sub}"
                if full in RENAMED:
                    where.fail(full, f"renamed: use {RENAMED[full]}")
                if full in _SET_ELSEWHERE:
                    where.fail(full, f"is not a setting here: {_SET_ELSEWHERE[full]}")
        if key in RENAMED:
            where.fail(key, f"renamed: use {RENAMED[key]}")


# ---------------------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> ALConfig:
    """Read and validate a TOML configuration file."""
    path = Path(path)
    data = read_toml(path)
    return parse_config(data, base_dir=path.resolve().parent, source=path.resolve())


def parse_config(data: dict, base_dir: str | Path = ".", source: Path | None = None) -> ALConfig:
    """Validate a parsed TOML document (a dict); relative paths resolve against ``base_dir``."""
    from driver.models.committee import ModelConfig
    from driver.training import TrainConfig

    where = Where(source)
    base_dir = Path(base_dir).resolve()
    _refuse_old_names(data, where)
    check_keys(data, _TOP_KEYS, "", where)

    # top level
    seed = convert(data.get("seed", 0), int, "seed", where)
    if not 0 <= seed < 2**31:
        where.fail("seed", f"must be in [0, 2^31), got {seed}")
    temps = temperature_list(data.get("temperatures", DEFAULT_TEMPERATURES), "temperatures", where)
    workdir = (base_dir / convert(data.get("workdir", "al_run"), Path, "workdir", where)).resolve()

    # sections: the objects their consumers take
    reference = build(ReferenceSettings, table_of(data, "reference", where), "reference", where)
    sampling = build(SamplingSettings, table_of(data, "sampling", where), "sampling", where,
                     exclude=("seed",), seed=seed)
    stopping = build(StoppingRule, table_of(data, "stopping", where), "stopping", where)
    initial_data = build(InitialDataSettings, table_of(data, "initial_data", where), "initial_data", where)
    train = build(TrainConfig, table_of(data, "train", where), "train", where, exclude=("warm_start",))
    model = build(ModelConfig, train.model, "train.model", where)
    pretrained = None
    if train.pretrained is not None:
        train, pretrained = _pretrained(train, model, base_dir, where)
    execution = build_execution(table_of(data, "execution", where), where)

    _check_reference(reference, where)
    members = train.committee + train.dipole_members
    if sampling.mpi_ranks > members:
        where.fail("sampling.mpi_ranks", f"{sampling.mpi_ranks} ranks for {members} committee members "
                                         f"([train] committee + dipole_members): ranks split the members, "
                                         f"so at most {members}")
    if pretrained is None:
        structures = _structures(data.get("structures"), base_dir, model.species, where)
    else:  # the pretrained committee's species are the model's: checked under train.pretrained
        structures = _structures(data.get("structures"), base_dir, None, where)
        _check_pretrained_species(pretrained, train.pretrained, structures, where)
    return ALConfig(structures=structures, workdir=workdir, temperatures=temps,
                    seed=seed, reference=reference, sampling=sampling, stopping=stopping,
                    initial_data=initial_data, train=train, execution=execution, source=source)


def _check_reference(ref: ReferenceSettings, where: Where) -> None:
    from al_manager.reference.base import _BACKENDS, get_backend

    if ref.backend not in _BACKENDS:
        where.fail("reference.backend", f"unknown backend {ref.backend!r}; choose from {', '.join(_BACKENDS)}"
                                        f"{suggest(ref.backend, _BACKENDS)}")
    try:
        get_backend(ref.backend, **ref.options)  # checks the option names and values, runs nothing
    except (ValueError, TypeError) as exc:
        where.fail("reference.options", " ".join(str(exc).split()))
    except ImportError:
        pass  # a backend whose library is missing is reported when it is used, not when planning


def _pretrained(train: "TrainConfig", model, base_dir: Path, where: Where):
    """``[train] pretrained``: the folder resolved against the file's, loaded, and its sizes and model
    checked against ``[train]``. Returns (train with the absolute path, the committee)."""
    from driver.models.committee import load_committee

    key = "train.pretrained"
    path = (base_dir / Path(train.pretrained).expanduser()).resolve()
    if not path.exists():
        where.fail(key, f"committee folder {path} does not exist")
    if not path.is_dir():
        where.fail(key, f"{path} is a file, not a committee folder")
    try:
        committee = load_committee(path)
    except (OSError, ValueError) as exc:  # no committee.json, damaged files (ModelFileError)
        where.fail(key, " ".join(str(exc).split())[:300])
    for field_name, have, what in (("committee", committee.n_energy_members, "energy/force"),
                                   ("dipole_members", committee.n_dipole_members, "dipole")):
        want = getattr(train, field_name)
        if want != have:
            where.fail(f"train.{field_name}", f"{want}, but the pretrained committee {path} has {have} {what} "
                                              f"member(s): a fine-tune starts every member from one of its "
                                              f"own; set {field_name} = {have}")
    given = model
    for name in train.model:  # [train] model may repeat the pretrained model's values, not change them
        mine, theirs = getattr(given, name), getattr(committee.config, name)
        if mine != theirs:
            fmt = lambda v: json.dumps(list(v) if isinstance(v, tuple) else v)
            where.fail(f"train.model.{name}", f"{fmt(mine)} differs from the pretrained committee's {fmt(theirs)} "
                                              f"({path}): a fine-tune keeps its model; drop the key or match it")
    return dataclasses.replace(train, pretrained=str(path)), committee


def _check_pretrained_species(committee, path: str, structures: list[StructureEntry], where: Where) -> None:
    from ipi_inputs.files import read_cluster

    for entry in structures:
        foreign = sorted(set(read_cluster(entry.path).get_chemical_symbols()) - set(committee.species))
        if foreign:
            where.fail("train.pretrained", f"the committee {path} knows {', '.join(committee.species)}, not "
                                           f"{', '.join(foreign)} of structure {entry.name} ({entry.path})")


def _structures(value, base_dir: Path, species, where: Where) -> list[StructureEntry]:
    if value is None:
        where.fail("structures", "missing: give [structures] name = \"file.xyz\" entries or "
                                 "structures = [\"file.xyz\", ...]")
    if isinstance(value, list):
        items = []
        for k, v in enumerate(value):
            if not isinstance(v, str):
                where.fail(f"structures[{k}]", f"must be a file name (string), got {type_name(v)}")
            items.append((Path(v).stem, v, f"structures[{k}]"))
    elif isinstance(value, dict):
        items = []
        for name, v in value.items():
            if not isinstance(v, str):
                where.fail(f"structures.{name}", f"must be a file name (string), got {type_name(v)}")
            items.append((name, v, f"structures.{name}"))
    else:
        where.fail("structures", f"must be a table of name = file or a list of files, got {type_name(value)}")
    if not items:
        where.fail("structures", "no structure given")
    out, seen = [], set()
    for name, file, key in items:
        if not _NAME.match(name):
            where.fail(key, f"name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names files and runs)")
        if name in seen:
            where.fail(key, f"structure name {name!r} used twice")
        seen.add(name)
        path = (base_dir / Path(file).expanduser()).resolve()
        if not path.is_file():
            where.fail(key, f"structure file {path} does not exist")
        from ipi_inputs.files import read_cluster

        try:
            atoms = read_cluster(path)   # our own words for a malformed xyz (file, line, frame)
        except (ValueError, OSError) as exc:
            where.fail(key, " ".join(str(exc).split())[:300])
        if len(atoms) < 2:
            where.fail(key, f"{path} holds {len(atoms)} atom(s): a cluster needs at least 2")
        foreign = sorted(set(atoms.get_chemical_symbols()) - set(species)) if species is not None else []
        if foreign:
            where.fail(key, f"element{'s' if len(foreign) > 1 else ''} {', '.join(foreign)} "
                            f"{'are' if len(foreign) > 1 else 'is'} not in the model's species "
                            f"({', '.join(sorted(species))})")
        out.append(StructureEntry(name=name, path=path))
    return out
