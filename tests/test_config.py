"""The active-learning configuration: a valid TOML file becomes one typed object with absolute paths;
every bad input is a one-line error naming the key (and the file)."""
from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
from ase import Atoms
from ase.io import write

from al_manager.learning.config import ALConfig, ConfigError, load_config, parse_config
from al_manager.learning.sampling import SamplingSettings

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
workers = 2
options = { threads = 1 }

[sampling]
energy_threshold = 0.003
trust_cap = 0.1
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
committee = 4
dipole_members = 2
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
    assert (cfg.reference.backend, cfg.reference.workers, cfg.reference.options) == ("xtb", 2, {"threads": 1})
    assert (cfg.train.committee, cfg.train.dipole_members) == (4, 2)
    s = cfg.sampling
    assert isinstance(s, SamplingSettings)  # the section is the sampler's own settings object
    assert (s.energy_threshold, s.force_threshold, s.trust_cap) == (0.003, None, 0.1)
    assert (s.max_md_ps, s.timestep_fs, s.parallel_runs, s.mpi_ranks, s.frames_per_run) == (2.5, 0.5, 2, 2, 1)
    assert s.seed == 7  # the top-level seed
    assert (cfg.stopping.patience, cfg.stopping.max_iterations) == (2, 5)
    assert cfg.initial_data.relax is False and cfg.initial_data.temperatures == [200.0, 800.0]
    assert (cfg.initial_data.n_random, cfg.initial_data.n_select) == (4, 12)
    assert cfg.backend().method == "xtb:GFN2-xTB"


def test_defaults_and_list_form_of_structures(folder):
    cfg = load_config(_write(folder, 'structures = ["structures/p1.xyz", "o1.xyz"]\n'))
    assert list(cfg.structure_files) == ["p1", "o1"]          # named by file stem, in order
    assert cfg.workdir == (folder / "al_run").resolve()
    assert cfg.temperatures == [100.0, 400.0, 800.0, 1200.0]  # the paper's low and high
    assert cfg.reference.backend == "xtb" and cfg.reference.workers == 1
    assert cfg.train.committee == 3 and cfg.train.dipole_members == 1 and cfg.train.epochs == 400
    assert cfg.sampling.max_md_ps == 5.0 and cfg.sampling.timestep_fs == 0.5 and cfg.sampling.frames_per_run == 1
    assert cfg.sampling.energy_threshold == 0.002 and cfg.sampling.force_threshold is None
    assert cfg.sampling.trust_cap is None and cfg.sampling.seed == 0
    assert cfg.initial_data.relax is True and cfg.initial_data.n_select is None
    assert (cfg.stopping.patience, cfg.stopping.max_iterations) == (3, 20)


def test_train_section_is_the_trainconfig(folder):
    from driver.training import TrainConfig

    cfg = load_config(_write(folder, VALID))
    assert isinstance(cfg.train, TrainConfig)
    assert (cfg.train.committee, cfg.train.dipole_members, cfg.train.epochs, cfg.train.batch_size) == (4, 2, 30, 4)
    assert cfg.train.log_every == TrainConfig().log_every  # TrainConfig's own default, not forced by the loop
    tc = cfg.train_config(warm_start=Path("models/iter_000"))
    assert tc.warm_start == "models/iter_000" and tc.epochs == 30
    assert cfg.train.warm_start is None  # the configuration itself is not modified


def test_the_loop_takes_the_configuration_itself():
    from al_manager.learning import loop

    assert not hasattr(loop, "LoopPlan") and not hasattr(loop, "plan_from_config")
    assert list(inspect.signature(loop.run_loop).parameters)[0] == "config"
    assert list(inspect.signature(loop.Manager).parameters)[0] == "config"


def test_sampling_settings_become_the_driver_flags_of_the_same_names():
    s = SamplingSettings(energy_threshold=0.003, force_threshold=0.2, trust_cap=0.5)
    assert s.driver_flags() == ["--energy-threshold", "0.003", "--force-threshold", "0.2", "--trust-cap", "0.5"]
    assert SamplingSettings().driver_flags() == ["--energy-threshold", "0.002"]
    # the driver knows every one of them by that name
    from driver.main import build_parser

    args = build_parser().parse_args(["--models", "m", "--structure", "s.xyz", "--unix", "x", *s.driver_flags()])
    assert (args.energy_threshold, args.force_threshold, args.trust_cap) == (0.003, 0.2, 0.5)


def test_timestep_reaches_the_ipi_input(folder, tmp_path):
    """timestep_fs is really used: the step count follows it and the rendered i-PI input carries it."""
    import xml.etree.ElementTree as ET

    from ase.io import read

    from ipi_inputs import render_input

    cfg = load_config(_write(folder, "structures = ['o1.xyz']\n[sampling]\ntimestep_fs = 1.0\nmax_md_ps = 0.5\n"))
    s = cfg.sampling
    assert s.timestep_fs == 1.0 and s.steps == 500
    out = render_input("al_sampling", tmp_path / "run", socket="unix:nsal-test", steps=s.steps, seed=1,
                       temperature=400.0, structure=read(str(folder / "o1.xyz")), prefix="simulation",
                       velocities="thermal", timestep_fs=s.timestep_fs)
    root = ET.parse(out).getroot()
    timestep = root.find(".//dynamics/timestep")
    assert timestep is not None and timestep.get("units") == "femtosecond"
    assert float(timestep.text) == 1.0
    assert int(root.find(".//total_steps").text) == 500
    # and the md_ps accounting of a run uses the time step it ran with
    from al_manager.learning.sampling import summarize

    assert summarize({"runs": {"r": {"status": "done", "steps": 500, "timestep_fs": 1.0}}})["md_ps"] == 0.5


BAD = [
    # (what to add or replace, key named in the message, words in the message)
    ("[reference]\nbackend = 'gaussian'\n", "reference.backend", "unknown backend 'gaussian'"),
    ("[reference]\noptions = { colour = 'red' }\n", "reference.options", "colour"),
    ("[reference]\nworkers = 0\n", "reference.workers", ">= 1"),
    ("temperatures = [400, -50]\n", "temperatures[1]", "> 0 K"),
    ("temperatures = []\n", "temperatures", "at least one"),
    ("temperatures = 400\n", "temperatures", "must be a list"),
    ("temperatures = [400, 'hot']\n", "temperatures[1]", "must be a number"),
    ("tempratures = [400]\n", "tempratures", "did you mean 'temperatures'"),
    ("seed = -1\n", "seed", "[0, 2^31)"),
    ("[sampling]\nmax_md_ps = -1\n", "sampling.max_md_ps", "> 0"),
    ("[sampling]\nmax_md_ps = 6\n", "sampling.max_md_ps", "at most 5 ps"),
    ("[sampling]\ntimestep_fs = 8\n", "sampling.timestep_fs", "too long"),
    ("[sampling]\nparallel_run = 2\n", "sampling.parallel_run", "did you mean 'parallel_runs'"),
    ("[sampling]\nenergy_treshold = 0.01\n", "sampling.energy_treshold", "did you mean 'energy_threshold'"),
    ("[sampling]\nmpi_ranks = 9\n", "sampling.mpi_ranks", "at most 4"),
    ("[sampling]\nframes_per_run = 1.5\n", "sampling.frames_per_run", "must be an integer"),
    ("[sampling]\nenergy_threshold = -0.001\n", "sampling.energy_threshold", "> 0"),
    ("[sampling]\nforce_threshold = 0.2\ntrust_cap = 0.1\n", "sampling.trust_cap", "above the force threshold"),
    ("[sampling]\ntrust_cap = 0.001\n", "sampling.trust_cap", "above the energy threshold 0.002 eV/atom"),
    ("[sampling]\ndtype = 'float16'\n", "sampling.dtype", "must be one of 'float32', 'float64'"),
    ("[sampling]\nseed = 3\n", "sampling.seed", "top-level seed"),
    ("[stopping]\npatience = 0\n", "stopping.patience", ">= 1"),
    ("[initial_data]\ntemperatures = [300, -1]\n", "initial_data.temperatures[1]", "> 0 K"),
    ("[initial_data]\nrelax = 'yes'\n", "initial_data.relax", "true or false"),
    ("[initial_data]\nmax_displacement = 0\n", "initial_data.max_displacement", "> 0"),
    ("[initial_data]\namplitude = 1\n", "initial_data.amplitude", "unknown key"),
    ("[train]\nepoch = 3\n", "train.epoch", "did you mean 'epochs'"),
    ("[train]\nepochs = '400'\n", "train.epochs", "must be an integer"),
    ("[train]\ncommittee = 0\n", "train.committee", "1-8"),
    ("[train]\ncommittee = true\n", "train.committee", "must be an integer"),
    ("[train]\nwarm_start = 'models'\n", "train.warm_start", "set by the active-learning loop"),
    ("[train]\nmodel = { hiden = [16] }\n", "train.model.hiden", "did you mean 'hidden'"),
    ("[train]\nmodel = { hidden = ['big'] }\n", "train.model.hidden[0]", "must be an integer"),
    ("workdir = 3\n", "workdir", "must be a string"),
    ("sampling = 3\n", "sampling", "must be a table"),
    ("train = 3\n", "train", "must be a table"),
    # old names: refused with the new one
    ("[committee]\nsize = 4\n", "committee.size", "train.committee"),
    ("[committee]\ndipole_size = 0\n", "committee.dipole_size", "train.dipole_members"),
    ("[committee]\n", "committee", "[train] committee, dipole_members"),
    ("[thresholds]\nenergy_per_atom = 0.003\n", "thresholds.energy_per_atom", "sampling.energy_threshold"),
    ("[thresholds]\nforce = 0.2\n", "thresholds.force", "sampling.force_threshold"),
    ("[thresholds]\nupper_cap = 0.1\n", "thresholds.upper_cap", "sampling.trust_cap"),
    ("[sampling]\nupper_cap = 0.1\n", "sampling.upper_cap", "sampling.trust_cap"),
    ("[sampling]\nmax_parallel = 2\n", "sampling.max_parallel", "sampling.parallel_runs"),
    ("[reference]\nlabel_workers = 2\n", "reference.label_workers", "reference.workers"),
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
    with pytest.raises(ConfigError, match=r"structures\.J: .*junk\.xyz line 1: expected the atom count"):
        load_config(_write(folder, "[structures]\nJ = 'junk.xyz'\n"))


def test_an_element_the_model_cannot_hold_is_refused_at_load_time(folder):
    """Fe in a structure: refused while loading (no reference work has started), naming the structure;
    `nanosil al` with such a file: tests/test_al_loop.py::test_bad_config_is_one_line_naming_the_key."""
    iron = Atoms("FeSiO3", positions=[[0, 0, 0], [2.8, 0, 0], [1.4, 1.2, 0], [4.4, 0, 0], [1.4, -1.2, 0]])
    write(str(folder / "fe.xyz"), iron, format="extxyz")
    path = _write(folder, "[structures]\nP1 = 'o1.xyz'\nFE = 'fe.xyz'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path.resolve()}: structures.FE: element Fe is not in the model's species (Mg, O, Si)"
    assert not (folder / "al_run").exists()
    with pytest.raises(ConfigError, match=r"structures\[0\]: element Fe is not in the model's species"):
        load_config(_write(folder, "structures = ['fe.xyz']\n"))
    # a model configured with the element holds it
    cfg = load_config(_write(folder, "structures = ['fe.xyz']\n[train]\nmodel = { species = ['Mg', 'Si', 'O', 'Fe'] }\n"))
    assert cfg.train.model == {"species": ["Mg", "Si", "O", "Fe"]}


def test_config_error_is_the_shared_loaders():
    from al_manager import settings

    assert ConfigError is settings.ConfigError


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
    assert cfg.reference.backend == "xtb" and cfg.temperatures == [400.0, 800.0] and cfg.train.committee == 3
    assert cfg.reference.workers == 2 and cfg.sampling.energy_threshold == 0.002
    assert cfg.workdir == (tmp_path / "demo_output" / "al").resolve()
    assert cfg.sampling.max_md_ps <= 2.0 and cfg.stopping.max_iterations <= 5


def test_label_budget(folder):
    cfg = load_config(_write(folder, "[structures]\nP1 = 'o1.xyz'\n[stopping]\nmax_labels = 400\n"))
    assert cfg.stopping.max_labels == 400
    with pytest.raises(ConfigError, match=r"stopping\.max_labels: must be >= 1, got 0"):
        load_config(_write(folder, "[structures]\nP1 = 'o1.xyz'\n[stopping]\nmax_labels = 0\n"))


# ------------------------------------------------------------------ [train] pretrained (transfer learning)
def _tiny_committee(path: Path, n_members: int = 2, n_dipole: int = 1, species=("Mg", "Si", "O")) -> Path:
    from driver.models.committee import ModelConfig, build_committee, save_committee

    config = ModelConfig(species=species, hidden=(8, 8), dipole_features=8, dipole_interactions=1, dipole_gaussians=4)
    save_committee(build_committee(config, n_members=n_members, n_dipole=n_dipole, seed=0), path)
    return path


PRETRAINED = "[structures]\nP1 = 'o1.xyz'\n[train]\ncommittee = 2\ndipole_members = 1\n"


def test_pretrained_committee_is_checked_and_resolved_against_the_file(folder):
    _tiny_committee(folder / "xtb_models")
    cfg = load_config(_write(folder, PRETRAINED + "pretrained = 'xtb_models'\n"))
    assert cfg.train.pretrained == str((folder / "xtb_models").resolve())
    assert cfg.train_config().pretrained == cfg.train.pretrained          # iteration 0 fine-tunes it
    later = cfg.train_config(warm_start=folder / "run" / "models" / "iter_000")
    assert later.pretrained is None and later.warm_start.endswith("iter_000")  # later iterations warm-start
    # [train] model may repeat the pretrained model's values
    cfg = load_config(_write(folder, PRETRAINED + "pretrained = 'xtb_models'\nmodel = { hidden = [8, 8] }\n"))
    assert cfg.train.model == {"hidden": [8, 8]}
    assert load_config(_write(folder, PRETRAINED + "pretrained = 'none'\n")).train.pretrained is None


def test_pretrained_problems_are_one_line_naming_the_key(folder):
    path = _write(folder, PRETRAINED + "pretrained = 'absent'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message == f"{path.resolve()}: train.pretrained: committee folder {(folder / 'absent').resolve()} does not exist"
    (folder / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"train\.pretrained: .*empty is not a nanosil model folder \(no committee\.json\)$"):
        load_config(_write(folder, PRETRAINED + "pretrained = 'empty'\n"))
    with pytest.raises(ConfigError, match=r"train\.pretrained: .* is a file, not a committee folder"):
        load_config(_write(folder, PRETRAINED + "pretrained = 'o1.xyz'\n"))
    # its species must cover the structures
    _tiny_committee(folder / "mg_o", species=("Mg", "O"))
    with pytest.raises(ConfigError) as err:
        load_config(_write(folder, PRETRAINED + "pretrained = 'mg_o'\n"))
    assert "train.pretrained: the committee" in str(err.value) and "knows Mg, O, not Si of structure P1" in str(err.value)
    # its member counts must be [train]'s
    _tiny_committee(folder / "three", n_members=3, n_dipole=1)
    with pytest.raises(ConfigError, match=r"train\.committee: 2, but the pretrained committee .*three has 3 "
                                          r"energy/force member\(s\).*set committee = 3$"):
        load_config(_write(folder, PRETRAINED + "pretrained = 'three'\n"))
    _tiny_committee(folder / "no_dipole", n_members=2, n_dipole=0)
    with pytest.raises(ConfigError, match=r"train\.dipole_members: 1, but .* has 0 dipole member\(s\).*"
                                          r"set dipole_members = 0$"):
        load_config(_write(folder, PRETRAINED + "pretrained = 'no_dipole'\n"))
    # and its model is kept: [train] model may not change it
    _tiny_committee(folder / "xtb_models")
    with pytest.raises(ConfigError, match=r"train\.model\.hidden: \[16, 16\] differs from the pretrained "
                                          r"committee's \[8, 8\]"):
        load_config(_write(folder, PRETRAINED + "pretrained = 'xtb_models'\nmodel = { hidden = [16, 16] }\n"))
    for e in (err,):
        assert "\n" not in str(e.value)


def test_pbe0_transfer_example_parses(tmp_path):
    """examples/pbe0_transfer.toml: the demo's structures and an xTB committee of the demo as the pretrained one."""
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / "examples" / "pbe0_transfer.toml", tmp_path / "examples" / "pbe0_transfer.toml")
    for name in ("MgSiO3_1_isomer01.xyz", "Mg2SiO4_1_isomer01.xyz"):
        _structure(tmp_path / "demo_output" / "structures" / name)
    with pytest.raises(ConfigError, match=r"train\.pretrained: committee folder .*iter_002 does not exist"):
        load_config(tmp_path / "examples" / "pbe0_transfer.toml")
    _tiny_committee(tmp_path / "demo_output" / "al" / "models" / "iter_002", n_members=3, n_dipole=1)
    cfg = load_config(tmp_path / "examples" / "pbe0_transfer.toml")
    assert cfg.reference.backend == "pyscf" and cfg.stopping.max_labels == 200
    assert cfg.train.pretrained == str((tmp_path / "demo_output" / "al" / "models" / "iter_002").resolve())
