"""The execution layer (al_manager/execution.py): the [execution] section, real Parsl configurations, and
labelling through a real Parsl HighThroughputExecutor (local provider, 2 workers) with xTB: the same labels as
the local pool, a worker killed mid-task retried with no label lost or repeated, and, where Debian's
slurm-wlm and munge are installed, the same labelling through a real single-node SLURM (slurmctld + slurmd
started and stopped here)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest

from al_manager.settings import ConfigError, Where, read_toml, table_of

pytest.importorskip("parsl")

from al_manager import execution as ex  # noqa: E402
from al_manager.execution import (ExecutionSettings, LabellingResources, TrainingResources,  # noqa: E402
                                  build_execution, labelling_arguments, parsl_config, session)
from al_manager.processes import OWNER_ENV, _proc_state, tagged_processes  # noqa: E402
from al_manager.reference.labelling import label_structures  # noqa: E402

from conftest import CHILD_ENV, REPO, cluster  # noqa: E402

BIN = Path(sys.executable).parent


def _frames(name: str, n: int, seed: int = 0):
    """``n`` distinct, slightly displaced copies of a reference cluster (real xTB inputs)."""
    from ase.io import read

    base = read(str(cluster(name)))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = base.copy()
        a.positions += rng.normal(0.0, 0.03, a.positions.shape)
        out.append(a)
    return out


def _rows(db_path):
    from driver.data import connect

    rows = list(connect(db_path).select())
    return {row.get("hash"): row for row in rows}, len(rows)


def _settings(**kw) -> ExecutionSettings:
    base = dict(mode="parsl", provider="local", max_workers_per_node=2, retries=2, heartbeat_period=1,
                heartbeat_threshold=10)
    base.update(kw)
    return ExecutionSettings(**base)


# ---------------------------------------------------------------------- the [execution] section
def test_local_mode_never_imports_parsl():
    code = ("import sys\n"
            "from al_manager.settings import Where\n"
            "from al_manager.execution import build_execution, labelling_arguments, session\n"
            "import al_manager.reference.labelling\n"
            "s = build_execution({}, Where('al.toml'))\n"
            "assert s.mode == 'local'\n"
            "assert labelling_arguments(s, 'xtb', 2) == {'executor': 'process', 'workers': 2, 'backend_options': None}\n"
            "with session(s) as x:\n"
            "    assert x is None\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'parsl'], 'parsl imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=CHILD_ENV, timeout=120)


def test_execution_section_is_checked_with_one_line_per_problem(monkeypatch):
    where = Where("al.toml")

    def fails(table, match):
        with pytest.raises(ConfigError, match=match) as info:
            build_execution(table, where)
        assert "\n" not in str(info.value)

    fails({"mode": "cluster"}, r"al.toml: execution.mode: must be one of 'local', 'parsl'")
    fails({"mode": "parsl", "nodse": 2}, r"execution.nodse: unknown key \(did you mean 'nodes'\?\)")
    fails({"mode": "parsl", "provider": "slurm", "walltime": "2h"}, r"execution.walltime: must be HH:MM:SS")
    fails({"mode": "parsl", "nodes": 0, "provider": "slurm"}, r"execution.nodes: must be >= 1, got 0")
    fails({"mode": "parsl", "retries": "2"}, r"execution.retries: must be an integer")
    fails({"provider": "slurm"}, r'execution.provider: is set, but mode = "local" does not use it')
    fails({"labelling": {"cores_per_task": 4}}, r'execution.labelling: is set, but mode = "local"')
    fails({"mode": "parsl", "account": "p1"}, r'execution.account: has no meaning with provider = "local"')
    fails({"mode": "parsl", "labelling": {"cores": 2}}, r"execution.labelling.cores: unknown key")
    fails({"mode": "parsl", "labelling": {"cores_per_task": 0}}, r"execution.labelling.cores_per_task: must be >= 1")
    fails({"mode": "parsl", "labelling": 4}, r"execution.labelling: must be a table")
    fails({"mode": "parsl", "provider": "slurm", "training": {"gpus_per_node": 2, "members_per_node": 3}},
          r"execution.training.members_per_node: \(3\) must not exceed gpus_per_node")
    fails({"mode": "parsl", "heartbeat_period": 30, "heartbeat_threshold": 10}, r"execution.heartbeat_threshold")

    s = build_execution({"mode": "parsl", "provider": "slurm", "nodes": 2, "account": "p1", "partition": "cpu",
                         "walltime": "12:00:00", "labelling": {"cores_per_task": 4},
                         "training": {"partition": "gpu", "gpus_per_node": 4}}, where)
    assert s.labelling == LabellingResources(cores_per_task=4) and s.training.workers_per_node == 4
    assert s.sampling.pairs_per_node == 1
    with pytest.raises(Exception):
        s.nodes = 3  # frozen

    monkeypatch.setattr(ex, "parsl_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        build_execution({"mode": "parsl"}, where)
    assert str(info.value) == 'al.toml: [execution] mode = "parsl" needs Parsl: pip install nanosil[hpc]'
    with pytest.raises(ValueError, match=r'^mode = "parsl" needs Parsl: pip install nanosil\[hpc\]$'):
        ExecutionSettings(mode="parsl")
    with pytest.raises(ImportError, match=r"pip install nanosil\[hpc\]"):
        ex.require_parsl()


def test_parsl_configs_for_slurm_and_pbs_are_real_parsl_objects(tmp_path):
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.launchers import MpiExecLauncher, SingleNodeLauncher, SrunLauncher
    from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

    s = ExecutionSettings(mode="parsl", provider="slurm", nodes=4, walltime="06:00:00", account="p1",
                          partition="cpu", worker_init="module load tblite\nsource /x/.venv/bin/activate",
                          max_workers_per_node=32, retries=3, scheduler_options="#SBATCH --qos=normal",
                          labelling=LabellingResources(cores_per_task=4, orca_command="/opt/orca/orca"),
                          training=TrainingResources(partition="gpu", gpus_per_node=4, walltime="02:00:00"))
    config = parsl_config(s, tmp_path / "runinfo")
    assert isinstance(config, Config) and config.retries == 3 and config.run_dir == str(tmp_path / "runinfo")
    execs = {e.label: e for e in config.executors}
    assert list(execs) == ["labelling", "sampling", "training"]
    assert all(isinstance(e, HighThroughputExecutor) and e.encrypted for e in execs.values())
    lab = execs["labelling"]
    assert isinstance(lab.provider, SlurmProvider) and isinstance(lab.provider.launcher, SrunLauncher)
    assert (lab.provider.nodes_per_block, lab.provider.walltime, lab.provider.account) == (4, "06:00:00", "p1")
    assert lab.provider.partition == "cpu" and lab.max_workers_per_node == 32 and lab.cores_per_worker == 4
    assert "module load tblite" in lab.provider.worker_init and "OMP_NUM_THREADS=4" in lab.provider.worker_init
    assert "ORCA_COMMAND=/opt/orca/orca" in lab.provider.worker_init
    assert lab.provider.init_blocks == 1 and execs["sampling"].provider.init_blocks == 0
    tr = execs["training"]
    assert tr.provider.partition == "gpu" and tr.provider.walltime == "02:00:00"
    assert tr.provider.gpus_per_node == 4 and tr.max_workers_per_node == 4
    assert isinstance(tr.provider.launcher, SingleNodeLauncher)   # training jobs: one node each
    args = labelling_arguments(s, "orca")
    assert args == {"executor": "parsl", "workers": 4 * 32,
                    "backend_options": {"nprocs": 4, "command": "/opt/orca/orca"}}

    pbs = parsl_config(ExecutionSettings(mode="parsl", provider="pbs", nodes=2, partition="workq",
                                         cores_per_node=64), tmp_path / "pbs", stages=("labelling",))
    (p,) = [e.provider for e in pbs.executors]
    assert isinstance(p, PBSProProvider) and isinstance(p.launcher, MpiExecLauncher) and p.queue == "workq"
    local = parsl_config(_settings(), tmp_path / "local", stages=("labelling",))
    assert isinstance(local.executors[0].provider, LocalProvider)
    assert sys.executable in local.executors[0].launch_cmd   # this very Python runs the worker pools
    with pytest.raises(ValueError, match="stages"):
        parsl_config(_settings(), tmp_path, stages=("md",))


def test_example_slurm_config(tmp_path):
    """examples/hpc_slurm.toml: its [execution] section builds a SLURM configuration, and the rest of the file
    is a valid active-learning configuration (with the paper's clusters in place)."""
    from al_manager.learning.config import _TOP_KEYS, parse_config

    example = REPO / "examples" / "hpc_slurm.toml"
    data = read_toml(example)
    where = Where(example)
    s = build_execution(table_of(data, "execution", where), where)
    assert (s.mode, s.provider) == ("parsl", "slurm") and s.training.partition
    config = parsl_config(s, tmp_path / "runinfo")
    assert [e.label for e in config.executors] == ["labelling", "sampling", "training"]
    rest = data if "execution" in _TOP_KEYS else {k: v for k, v in data.items() if k != "execution"}
    for name, path in data["structures"].items():
        family = {"P": "pyroxene", "O": "olivine"}[name[0]]
        target = tmp_path / "examples" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cluster(f"{family}_N{int(name[1:]):02d}_GM.xyz"), target)
    cfg = parse_config(rest, base_dir=tmp_path / "examples", source=example)
    assert len(cfg.structures) == 20 and cfg.reference.backend == "pyscf"


# ---------------------------------------------------------------------- labelling through real Parsl
def test_parsl_labels_equal_the_local_pool(tmp_path):
    frames = _frames("pyroxene_N02_GM.xyz", 6)
    frames.append(frames[0].copy())   # a repeat inside the batch: computed once
    local = label_structures(frames, "xtb", tmp_path / "local.db", workers=2, executor="process", progress=False)
    # no session open: a private local HighThroughputExecutor with 2 workers, ended by label_structures
    remote = label_structures(frames, "xtb", tmp_path / "parsl.db", workers=2, executor="parsl", progress=False)
    assert (remote.n_labelled, remote.n_skipped, remote.n_failed) == (local.n_labelled, 1, 0) == (6, 1, 0)
    a, n_a = _rows(tmp_path / "local.db")
    b, n_b = _rows(tmp_path / "parsl.db")
    assert n_a == n_b == len(a) == len(b) == 6 and set(a) == set(b)
    for h in a:
        assert abs(a[h].energy - b[h].energy) < 1e-8
        np.testing.assert_allclose(a[h].forces, b[h].forces, atol=1e-8)
        np.testing.assert_allclose(a[h].dipole, b[h].dipole, atol=1e-8)
    # a rerun skips everything: nothing is computed twice
    again = label_structures(frames, "xtb", tmp_path / "parsl.db", workers=2, executor="parsl", progress=False)
    assert (again.n_labelled, again.n_skipped) == (0, 7)


def _busy_worker(token: str) -> int | None:
    """A Parsl worker process of this session that is computing an xTB label right now: it carries the
    session's tag, has tblite loaded and is running."""
    for pid in tagged_processes(token):
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                maps = f.read()
        except OSError:
            continue
        if b"tblite" in maps and _proc_state(pid) == "R":
            return pid
    return None


def test_a_worker_killed_mid_task_is_retried_and_no_label_is_lost_or_repeated(tmp_path):
    token = uuid.uuid4().hex
    settings = _settings(worker_init=f"export {OWNER_ENV}={token}")
    frames = _frames("pyroxene_N04_GM.xyz", 14, seed=1)
    db = tmp_path / "data.db"
    outcome = {}
    with session(settings, tmp_path / "runinfo", stages=("labelling",)) as s:
        def work():
            try:
                outcome["report"] = label_structures(frames, "xtb", db, executor="parsl", progress=False,
                                                     **{k: v for k, v in labelling_arguments(settings, "xtb").items()
                                                        if k != "executor"})
            except BaseException as exc:  # pragma: no cover - reported below
                outcome["error"] = exc

        thread = threading.Thread(target=work)
        thread.start()
        victim, deadline = None, time.monotonic() + 90
        while victim is None and thread.is_alive() and time.monotonic() < deadline:
            victim = _busy_worker(token)
            if victim is None:
                time.sleep(0.01)
        assert victim is not None, "no worker was seen computing"
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=120)
        assert not thread.is_alive(), "labelling did not finish"
        assert "error" not in outcome, outcome.get("error")
        retried = s.executor("labelling").retried
        # the session's pool serves the next call too (label_structures' shutdown leaves it to the session)
        more = label_structures(frames[:3] + _frames("pyroxene_N02_GM.xyz", 2, seed=3), "xtb", db,
                                executor="parsl", workers=2, progress=False)
    report = outcome["report"]
    assert (report.n_labelled, report.n_failed) == (14, 0), report.failures
    assert retried >= 1, "the killed worker's task was not retried"
    assert (more.n_labelled, more.n_skipped, more.n_failed) == (2, 3, 0)
    rows, n = _rows(db)
    assert n == len(rows) == 16   # no label lost, none repeated
    # the session's end leaves no worker pool behind
    deadline = time.monotonic() + 30
    while tagged_processes(token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tagged_processes(token)


def test_sampling_and_training_pools_start_when_their_first_task_arrives(tmp_path):
    """The sampling and training stages hold no workers until a task comes (init_blocks = 0): then the
    strategy starts a pool, and plain functions run there."""
    with session(_settings(), tmp_path / "runinfo", stages=("sampling", "training")) as s:
        assert s.executor("training").submit(abs, -3).result(timeout=120) == 3
        assert s.executor("sampling").submit(os.path.basename, "/a/b.xyz").result(timeout=120) == "b.xyz"
        with pytest.raises(ValueError, match="not in this session"):
            s.executor("labelling")


def test_a_committee_trains_one_member_per_task_on_the_parsl_training_pool(tmp_path, p2_dft_frames):
    """train_committee(..., executor=the session's training pool): each member is a task on a Parsl worker
    (a process that is not ours), and the committee equals the one trained by local processes (same seeds,
    one thread each); the task files are gone afterwards."""
    import torch

    from driver.models.committee import load_committee
    from driver.training import TrainConfig, train_committee

    frames = p2_dft_frames[:24]
    cfg = TrainConfig(committee=2, dipole_members=1, epochs=4, patience=4, workers=3, progress="off",
                      model={"hidden": [16, 16], "dipole_features": 8, "dipole_interactions": 1,
                             "dipole_gaussians": 6})
    local = train_committee(frames, tmp_path / "local", cfg)
    settings = _settings(training=TrainingResources(members_per_node=3))
    with session(settings, tmp_path / "runinfo", stages=("training",)) as s:
        pool = s.executor("training")
        remote = train_committee(frames, tmp_path / "models" / "remote", cfg, executor=pool)
        assert pool.submitted == 3
    assert not (tmp_path / "models" / ".remote.tasks").exists()
    loaded = load_committee(tmp_path / "models" / "remote", dtype=torch.float64)
    assert loaded.n_energy_members == 2 and loaded.n_dipole_members == 1
    for member in ("energy", "dipole"):
        a = getattr(local, f"{member}_model").state_dict()
        b = getattr(remote, f"{member}_model").state_dict()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- a real SLURM (conftest.slurm)
def test_labelling_through_a_real_single_node_slurm(slurm, tmp_path):
    settings = ExecutionSettings(mode="parsl", provider="slurm", partition="debug", walltime="00:10:00",
                                 worker_init=f'export PATH="{BIN}:$PATH"', max_workers_per_node=2, retries=1,
                                 address="127.0.0.1", heartbeat_period=2, heartbeat_threshold=20)
    frames = _frames("pyroxene_N02_GM.xyz", 4, seed=2)
    with session(settings, tmp_path / "runinfo", stages=("labelling",)):
        report = label_structures(frames, "xtb", tmp_path / "slurm.db", progress=False,
                                  **labelling_arguments(settings, "xtb"))
    assert (report.n_labelled, report.n_failed) == (4, 0), report.failures
    scripts = [p for p in (tmp_path / "runinfo").rglob("submit_scripts/parsl.labelling.block-*")
               if p.suffix not in (".stdout", ".stderr")]
    assert scripts and "#SBATCH --partition=debug" in scripts[0].read_text()   # it went through sbatch
    local = label_structures(frames, "xtb", tmp_path / "local.db", workers=1, executor="serial", progress=False)
    a, _ = _rows(tmp_path / "local.db")
    b, n = _rows(tmp_path / "slurm.db")
    assert n == 4 and set(a) == set(b) and local.n_labelled == 4
    for h in a:
        assert abs(a[h].energy - b[h].energy) < 1e-8


def test_a_sampling_run_through_a_real_single_node_slurm_sends_frames_over_curve_zmq(slurm, tmp_path, small_config):
    """A sampling pool on SLURM is treated as other hosts: the work directory's CurveZMQ keys are made, the
    collector listens on every interface, the pair runs in an sbatch job and its driver's frame arrives
    through the keyed socket."""
    from al_manager.execution import SamplingResources, sampling_arguments
    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from driver.models.committee import build_committee, save_committee

    settings = ExecutionSettings(mode="parsl", provider="slurm", partition="debug", walltime="00:10:00",
                                 worker_init=f'export PATH="{BIN}:$PATH"', retries=1, address="127.0.0.1",
                                 heartbeat_period=2, heartbeat_threshold=20, sampling=SamplingResources(pairs_per_node=1))
    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    workdir = tmp_path / "wd"
    state = State.load(workdir, create=True)
    specs = plan_runs({"P1": str(cluster("pyroxene_N01_GM.xyz"))}, [500])
    sampling = SamplingSettings(max_md_ps=0.1, timestep_fs=1.0, energy_threshold=1e-6, mpi_ranks=1)
    lines = []
    with session(settings, tmp_path / "runinfo", stages=("sampling",)):
        placement = sampling_arguments(settings, workdir)
        assert placement["collector_host"] == "127.0.0.1" and placement["collector_keys"] == workdir / "zmq_keys"
        record = Sampler(state, 1, specs, models, workdir / "it1", sampling, log=lines.append, **placement).run()
    run = record["runs"]["P1_500K"]
    assert run["status"] == "done" and run["frames"] == 1, (run, lines[-5:])
    assert "(CurveZMQ)" in (workdir / "it1" / "runs" / "P1_500K" / "driver.log").read_text()
    scripts = [p for p in (tmp_path / "runinfo").rglob("submit_scripts/parsl.sampling.block-*")
               if p.suffix not in (".stdout", ".stderr")]
    assert scripts and "#SBATCH --partition=debug" in scripts[0].read_text()   # it went through sbatch
