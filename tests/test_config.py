"""The active-learning configuration: a valid TOML file becomes one typed object with absolute paths;
every bad input is a one-line error naming the key (and the file)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ase import Atoms
from ase.io import write

from al_manager.learning.config import ALConfig, ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def _structure(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(str(path), Atoms("MgSiO3", positions=[[0, 0, 0], [2.8, 0, 0], [1.4, 1.2, 0], [4.4, 0, 0], [1.4, -1.2, 0]]),
          format="extxyz")
    return path


@pytest.fixture
def folder(tmp_path):
    _structure(tmp_path / "structures" / "p1.xyz")
    _structure(tmp_path / "o1.xyz")
    return tmp_path


def _write(folder: Path, text: str) -> Path:
    path = folder / "al.toml"
    path.write_text(text)
    return path


VALID = """
workdir = "run"
temperatures = [400, 800.0]
seed = 7

[structures]
P1 = "structures/p1.xyz"
O1 = "o1.xyz"

[reference]
backend = "xtb"
label_workers = 2
options = { threads = 1 }

[committee]
size = 4
dipole_size = 2

[thresholds]
energy_per_atom = 0.003
upper_cap = 0.1

[sampling]
max_md_ps = 2.5
timestep_fs = 0.5
parallel_runs = 2
mpi_ranks = 2
frames_per_run = 1

[stopping]
patience = 2
max_iterations = 5

[initial_data]
relax = false
temperatures = [200, 800]
n_random = 4
n_select = 12

[train]
epochs = 30
batch_size = 4
"""


def test_valid_config_is_typed_and_paths_resolve_against_the_file(folder, tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))  # relative paths must not depend on the cwd
    cfg = load_config(_write(folder, VALID))
    assert isinstance(cfg, ALConfig)
    assert cfg.workdir == (folder / "run").resolve()
    assert cfg.structure_files == {"P1": (folder / "structures" / "p1.xyz").resolve(), "O1": (folder / "o1.xyz").resolve()}
    assert cfg.temperatures == [400.0, 800.0] and all(isinstance(t, float) for t in cfg.temperatures)
    assert cfg.seed == 7
    assert (cfg.reference.backend, cfg.reference.label_workers, cfg.reference.options) == ("xtb", 2, {"threads": 1})
    assert (cfg.committee.size, cfg.committee.dipole_size) == (4, 2)
    assert cfg.thresholds.energy_per_atom == 0.003 and cfg.thresholds.force is None and cfg.thresholds.upper_cap == 0.1
    assert (cfg.sampling.max_md_ps, cfg.sampling.parallel_runs, cfg.sampling.mpi_ranks) == (2.5, 2, 2)
    assert (cfg.stopping.patience, cfg.stopping.max_iterations) == (2, 5)
    assert cfg.initial_data.relax is False and cfg.initial_data.temperatures == [200.0, 800.0]
    assert (cfg.initial_data.n_random, cfg.initial_data.n_select) == (4, 12)
    assert cfg.backend().method == "xtb:GFN2-xTB"


def test_defaults_and_list_form_of_structures(folder):
    cfg = load_config(_write(folder, 'structures = ["structures/p1.xyz", "o1.xyz"]\n'))
    assert list(cfg.structure_files) == ["p1", "o1"]          # named by file stem, in order
    assert cfg.workdir == (folder / "al_run").resolve()
    assert cfg.temperatures == [100.0, 400.0, 800.0, 1200.0]  # the paper's low and high
    assert cfg.reference.backend == "xtb" and cfg.committee.size == 3 and cfg.committee.dipole_size == 1
    assert cfg.sampling.max_md_ps == 5.0 and cfg.sampling.timestep_fs == 0.5 and cfg.sampling.frames_per_run == 1
    assert cfg.thresholds.energy_per_atom > 0 and cfg.initial_data.relax is True and cfg.initial_data.n_select is None


def test_train_section_passes_through_to_trainconfig(folder):
    from driver.training import TrainConfig

    cfg = load_config(_write(folder, VALID))
    tc = TrainConfig(**cfg.train_config_kwargs(warm_start="models/iter_000"))
    assert (tc.committee, tc.dipole_members, tc.epochs, tc.batch_size) == (4, 2, 30, 4)
    assert tc.warm_start == "models/iter_000"
    assert cfg.train == {"epochs": 30, "batch_size": 4}  # the configuration itself is not modified


def test_loop_plan_carries_the_settings(folder):
    loop = pytest.importorskip("al_manager.learning.loop")
    from al_manager.learning.config import loop_plan

    cfg = load_config(_write(folder, VALID))
    plan = loop_plan(cfg)
    assert isinstance(plan, loop.LoopPlan)
    assert plan.workdir == cfg.workdir and plan.backend == "xtb" and plan.temperatures == [400.0, 800.0]
    assert plan.structures == {n: str(p) for n, p in cfg.structure_files.items()}
    assert plan.train["committee"] == 4 and plan.train["epochs"] == 30
    s = plan.sampling
    assert (s.max_md_ps, s.max_parallel, s.mpi_ranks, s.frames_per_run) == (2.5, 2, 2, 1)
    assert (s.energy_threshold, s.force_threshold, s.upper_cap) == (0.003, None, 0.1)
    assert (plan.patience, plan.max_iterations) == (2, 5)


BAD = [
    # (what to add or replace, key named in the message, words in the message)
    ("[reference]\nbackend = 'gaussian'\n", "reference.backend", "unknown backend 'gaussian'"),
    ("[reference]\noptions = { colour = 'red' }\n", "reference.options", "colour"),
    ("[reference]\nlabel_workers = 0\n", "reference.label_workers", ">= 1"),
    ("temperatures = [400, -50]\n", "temperatures[1]", "> 0 K"),
    ("temperatures = []\n", "temperatures", "at least one"),
    ("temperatures = 400\n", "temperatures", "must be a list"),
    ("temperatures = [400, 'hot']\n", "temperatures[1]", "must be a number"),
    ("tempratures = [400]\n", "tempratures", "did you mean 'temperatures'"),
    ("[sampling]\nmax_md_ps = -1\n", "sampling.max_md_ps", "> 0"),
    ("[sampling]\nparallel_run = 2\n", "sampling.parallel_run", "did you mean 'parallel_runs'"),
    ("[sampling]\nmpi_ranks = 9\n", "sampling.mpi_ranks", "at most 4"),
    ("[sampling]\nframes_per_run = 1.5\n", "sampling.frames_per_run", "must be an integer"),
    ("[committee]\nsize = 0\n", "committee.size", "1-8"),
    ("[committee]\nsize = true\n", "committee.size", "must be an integer"),
    ("[thresholds]\nenergy_per_atom = -0.001\n", "thresholds.energy_per_atom", "> 0"),
    ("[thresholds]\nforce = 0.2\nupper_cap = 0.1\n", "thresholds.upper_cap", "above the force threshold"),
    ("[stopping]\npatience = 0\n", "stopping.patience", ">= 1"),
    ("[initial_data]\ntemperatures = [300, -1]\n", "initial_data.temperatures[1]", "> 0 K"),
    ("[initial_data]\nrelax = 'yes'\n", "initial_data.relax", "true or false"),
    ("[initial_data]\nmax_displacement = 0\n", "initial_data.max_displacement", "> 0"),
    ("[initial_data]\namplitude = 1\n", "initial_data.amplitude", "unknown key"),
    ("[train]\nepoch = 3\n", "train.epoch", "did you mean 'epochs'"),
    ("[train]\ncommittee = 5\n", "train.committee", "committee.size"),
    ("workdir = 3\n", "workdir", "must be a string"),
    ("sampling = 3\n", "sampling", "must be a table"),
]


@pytest.mark.parametrize("snippet,key,words", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_values_name_the_key(folder, snippet, key, words):
    # top-level keys go before the first table; tables after the structures
    head, tail = (snippet, "") if not snippet.startswith("[") else ("", snippet)
    path = _write(folder, f"{head}structures = ['o1.xyz']\n{tail}")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and f" {key}: " in msg and words in msg, msg


def test_missing_structure_file_names_the_key_and_the_path(folder):
    path = _write(folder, "[structures]\nP1 = 'structures/p1.xyz'\nP2 = 'nowhere/p2.xyz'\n")
    with pytest.raises(ConfigError, match=r"structures\.P2: structure file .*nowhere/p2\.xyz does not exist"):
        load_config(path)


def test_structure_problems(folder):
    for text, pattern in [
        ("seed = 1\n", r"structures: missing"),
        ("[structures]\n", r"structures: no structure given"),
        ("structures = ['o1.xyz', 'o1.xyz']\n", r"structures\[1\]: structure name 'o1' used twice"),
        ("[structures]\n'bad name' = 'o1.xyz'\n", r"structures\.bad name: name 'bad name'"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(_write(folder, text))
    (folder / "junk.xyz").write_text("not a structure\n")
    with pytest.raises(ConfigError, match=r"structures\.J: cannot read"):
        load_config(_write(folder, "[structures]\nJ = 'junk.xyz'\n"))


def test_not_toml_and_missing_file(folder):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(_write(folder, "structures = [\n"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(folder / "absent.toml")
    with pytest.raises(ConfigError, match="configuration: structures: missing"):
        parse_config({}, folder)


def test_quickstart_example_parses(tmp_path):
    """examples/quickstart.toml: P1 and O1 as written by `nanosil structures` into the demo folder."""
    example = REPO / "examples" / "quickstart.toml"
    (tmp_path / "examples").mkdir()
    shutil.copy(example, tmp_path / "examples" / "quickstart.toml")
    with pytest.raises(ConfigError, match="does not exist"):  # before the demo made the structures
        load_config(tmp_path / "examples" / "quickstart.toml")
    for name in ("MgSiO3_1_isomer01.xyz", "Mg2SiO4_1_isomer01.xyz"):
        _structure(tmp_path / "demo_output" / "structures" / name)
    cfg = load_config(tmp_path / "examples" / "quickstart.toml")
    assert list(cfg.structure_files) == ["P1", "O1"]
    assert cfg.reference.backend == "xtb" and cfg.temperatures == [400.0, 800.0] and cfg.committee.size == 3
    assert cfg.workdir == (tmp_path / "demo_output" / "al").resolve()
    assert cfg.sampling.max_md_ps <= 2.0 and cfg.stopping.max_iterations <= 5
