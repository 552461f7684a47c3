"""The active-learning loop end to end: real i-PI, real mpirun + nanosil-driver, real ZMQ, real xTB.

Tiny committees (2 members, no dipole model, 10 epochs) and short MD keep this to minutes; a low
energy threshold makes every run flag a frame within its first steps, so each iteration adds exactly one
frame per (structure, temperature) and label counts are predictable.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_file

BIN = Path(sys.executable).parent
TEMPERATURES = (400, 800)

pytestmark = pytest.mark.timeout(900)


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def write_config(folder: Path, workdir: Path, *, max_iterations: int = 2, extra: str = "",
                 structure: Path | None = None, backend: str = "xtb", temperatures=TEMPERATURES,
                 final_epochs: int = 0, final_from: str = "scratch") -> Path:
    structure = structure or shared_file("structures", "pyroxene_N01_GM.xyz")
    text = f"""
workdir = "{workdir}"
temperatures = [{", ".join(str(t) for t in temperatures)}]
seed = 3

[structures]
P1 = "{structure}"

[reference]
backend = "{backend}"
workers = 2

[sampling]
energy_threshold = 0.0001   # eV/atom: far below a tiny committee's disagreement, so frames come at once
max_md_ps = 0.25
parallel_runs = 2
mpi_ranks = 2

[stopping]
patience = 5
max_iterations = {max_iterations}
final_epochs = {final_epochs}
final_from = "{final_from}"

[initial_data]
n_random = 2
n_select = 6
# one FPS over all temperatures: the tiny committees of these tests, trained on the balanced picks, send the
# 800 K runs where xTB's SCF fails, and the tests count every flagged frame labelled
balance_temperatures = false

[train]
committee = 2
dipole_members = 0
epochs = 10
patience = 10
model = {{ hidden = [16, 16] }}
{extra}
"""
    path = folder / f"{workdir.name}.toml"
    path.write_text(text)
    return path


def nanosil(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nanosil"), *map(str, args)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def state_of(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def db_rows(workdir: Path) -> list:
    import ase.db

    return list(ase.db.connect(str(workdir / "data.db")).select())


def leftover_processes(workdir: Path, token: str) -> list[str]:
    """Live processes that belong to this work directory: the owner tag in their environment, or a
    working directory inside it (i-PI, the driver's ranks)."""
    from al_manager.processes import tagged_processes

    found = [f"{pid} (tagged)" for pid in tagged_processes(token)]
    root = str(workdir.resolve())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
            with open(f"/proc/{entry}/stat") as f:
                st = f.read().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if cwd.startswith(root) and st not in ("Z", "X"):
            found.append(f"{entry} (cwd {cwd})")
    return found


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# ---------------------------------------------------------------------- shared runs
@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> Path:
    """``nanosil al init``: initial data, labels, committee iter_000 and its measurement."""
    folder = tmp_path_factory.mktemp("al_init")
    workdir = folder / "wd"
    config = write_config(folder, workdir)
    proc = nanosil("al", "init", config, cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(initialised, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Two iterations after init, never interrupted (the baseline of the kill test)."""
    folder = tmp_path_factory.mktemp("al_two")
    workdir = copy_workdir(initialised, folder / "wd")
    config = write_config(folder, workdir, max_iterations=2)
    proc = nanosil("al", "run", config, cwd=folder)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    return workdir, proc


# ---------------------------------------------------------------------- tests
@pytest.mark.slow
def test_init_labels_normal_mode_data_and_measures_the_first_committee(initialised):
    from al_manager.learning.report import read_report_csv

    state = state_of(initialised)
    assert state["phase"] == "sampling" and state["iteration"] == 1  # init stops before sampling
    rows = db_rows(initialised)
    # the minimum plus n_select = 6 normal-mode displacements, every one labelled once
    assert len(rows) == 7
    assert sorted(r.origin for r in rows).count("minimum") == 1
    assert len({r.hash for r in rows}) == len(rows)
    assert (initialised / "models" / "iter_000" / "committee.json").is_file()
    report = read_report_csv(initialised / "report.csv")
    assert [r["iteration"] for r in report] == ["0"] and report[0]["labels"] == "7"
    ref = json.loads((initialised / "reference" / "harmonic.json").read_text())["P1"]
    assert ref["method"] == "xtb:GFN2-xTB" and len(ref["frequencies_cm-1"]) == 15


@pytest.mark.slow
def test_two_iterations_grow_the_database_by_the_flagged_frames(uninterrupted):
    from al_manager.learning.report import read_report_csv
    from driver.models.committee import load_committee

    workdir, proc = uninterrupted
    state = state_of(workdir)
    assert state["phase"] == "done" and "max_iterations (2)" in state["stop_reason"]
    rows = db_rows(workdir)
    by_origin = {}
    for r in rows:
        by_origin.setdefault(r.origin, []).append(r)
    # one flagged frame per (structure, temperature) and iteration, each labelled exactly once
    for k in (1, 2):
        record = state["iterations"][str(k)]
        frames = record["frames"]
        assert len(frames) == len(TEMPERATURES)
        assert {f["run"] for f in frames} == {f"P1_{t}K" for t in TEMPERATURES}
        assert all(f["step"] >= 1 for f in frames)
        labelled = by_origin[f"al_iter_{k:03d}"]
        assert len(labelled) == len(frames)
        assert sorted(r.temperature for r in labelled) == sorted(float(t) for t in TEMPERATURES)
        # the database holds the very structures the driver flagged
        for f in frames:
            assert any(np.allclose(r.positions, f["positions"], atol=1e-9) for r in labelled)
        assert all(r["status"] == "done" for r in record["runs"].values())
    assert len(rows) == 7 + 2 * len(TEMPERATURES)
    assert len({r.hash for r in rows}) == len(rows)

    # the report: iteration 0 (the initial committee) and one row per iteration, i.e. 3 rows
    report = read_report_csv(workdir / "report.csv")
    assert [int(r["iteration"]) for r in report] == [0, 1, 2]
    assert [int(r["labels"]) for r in report] == [7, 9, 11]
    assert [int(r["new_labels"]) for r in report] == [7, 2, 2]
    assert all(r["harmonic_mae_cm-1"] not in ("", None) for r in report)
    assert (workdir / "learning_curve.png").stat().st_size > 10_000

    # models of iteration 2 exist, load, and were warm-started from iteration 1
    committee = load_committee(workdir / "models" / "iter_002")
    assert committee.version.startswith("iter_002") and committee.n_energy_members == 2
    assert committee.metadata["train_config"]["warm_start"].endswith("iter_001")

    # one line per step on stdout and in al.log
    log = (workdir / "al.log").read_text().splitlines()
    assert any("iteration 2: sampling done: 2 uncertain frame(s)" in line for line in log)
    assert any("finished: max_iterations (2) reached" in line for line in log)
    assert "finished: max_iterations (2) reached" in proc.stdout
    assert leftover_processes(workdir, state["token"]) == []

    status = nanosil("al", "status", workdir, cwd=workdir)
    assert status.returncode == 0 and "phase done, iteration 2" in status.stdout
    assert "no manager running" in status.stdout


@pytest.mark.slow
def test_a_final_training_from_scratch_becomes_the_result(uninterrupted, tmp_path):
    """``[stopping] final_epochs`` added to a finished run: one from-scratch training on every label into
    models/final, measured into the row ``final``; a rerun trains nothing; a longer one keeps the old."""
    from al_manager.learning.report import read_report_csv
    from driver.models.committee import load_committee

    workdir = copy_workdir(uninterrupted[0], tmp_path / "wd")
    config = write_config(tmp_path, workdir, max_iterations=2, final_epochs=12)
    proc = nanosil("al", "run", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    state = state_of(workdir)
    assert state["phase"] == "done" and state["final"]["epochs"] == 12 and state["final"]["after_iteration"] == 2
    committee = load_committee(workdir / "models" / "final")
    cfg = committee.metadata["train_config"]
    assert cfg["warm_start"] is None and cfg["epochs"] == 12 and cfg["patience"] == 12  # from scratch, no early stop
    report = read_report_csv(workdir / "report.csv")
    assert [r["iteration"] for r in report] == ["0", "1", "2", "final"]
    assert report[-1]["labels"] == report[-2]["labels"] == "11" and report[-1]["model"] == "models/final"
    final_mae = state["final"]["measured"]["harmonic"]["mae_cm-1"]
    assert final_mae > 0 and float(report[-1]["harmonic_mae_cm-1"]) == pytest.approx(final_mae, rel=1e-5)
    assert "final: harmonic MAE" in proc.stdout and "models " + str(workdir / "models" / "final") in proc.stdout

    again = nanosil("al", "run", config, cwd=tmp_path)
    assert again.returncode == 0 and ": training " not in again.stdout and "finished" in again.stdout

    longer = write_config(tmp_path, workdir, max_iterations=2, final_epochs=14)
    proc = nanosil("al", "run", longer, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert (workdir / "models" / "final_after_iter_002_12_epochs" / "committee.json").is_file()
    assert load_committee(workdir / "models" / "final").metadata["train_config"]["epochs"] == 14
    assert [r["iteration"] for r in read_report_csv(workdir / "report.csv")] == ["0", "1", "2", "final"]

    # final_from = "last": a polish of iteration 2's committee, at final_lr, is a new recipe: trained anew
    polish = write_config(tmp_path, workdir, max_iterations=2, final_epochs=14, final_from="last")
    polish.write_text(polish.read_text().replace('final_from = "last"', 'final_from = "last"\nfinal_lr = 1e-4'))
    proc = nanosil("al", "run", polish, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "training the committee from iter_002" in proc.stdout and "at lr 0.0001" in proc.stdout
    cfg = load_committee(workdir / "models" / "final").metadata["train_config"]
    assert cfg["warm_start"] == str(workdir / "models" / "iter_002") and cfg["lr"] == pytest.approx(1e-4)
    assert state_of(workdir)["final"]["from"] == "last"
    assert [r["iteration"] for r in read_report_csv(workdir / "report.csv")] == ["0", "1", "2", "final"]

    # final_hold_out = false: every label trains (a new recipe again); the validation tenth is seen, so the
    # calibration factors are those of iteration 2's committee, which held it out
    every = polish.read_text().replace('final_lr = 1e-4', 'final_lr = 1e-4\nfinal_hold_out = false')
    polish.write_text(every)
    proc = nanosil("al", "run", polish, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert "on every label for every member (the validation tenth too)" in proc.stdout
    final, last = load_committee(workdir / "models" / "final"), load_committee(workdir / "models" / "iter_002")
    assert final.metadata["n_train"] == 11 and final.metadata["validation_seen"] is True
    assert final.metadata["train_config"]["hold_out"] is False and state_of(workdir)["final"]["hold_out"] is False
    assert final.metadata["train_config"]["subsample"] == 1.0
    assert final.calibration == last.calibration
    assert last.metadata["n_train"] + last.metadata["n_validation"] == 11 and last.metadata["validation_seen"] is False


@pytest.mark.slow
def test_iteration_two_continues_each_run_from_its_checkpoint(uninterrupted):
    """Positions and velocities of iteration 1's final i-PI checkpoint start iteration 2, with the
    centre-of-mass translation and the rotation removed, at the same temperature."""
    from ase import units
    from ase.io import read

    from ipi_inputs.files import read_checkpoint
    from ipi_inputs import read_cluster
    from ipi_inputs.render import _ipi_masses

    workdir, _ = uninterrupted
    state = state_of(workdir)
    for t in TEMPERATURES:
        name = f"P1_{t}K"
        assert state["iterations"]["2"]["runs"][name]["start"].startswith("checkpoint iter_001/")
        chk = read_checkpoint(workdir / "iterations" / "iter_001" / "runs" / name / "RESTART")
        run2 = workdir / "iterations" / "iter_002" / "runs" / name
        start = read_cluster(run2 / "simulation.init.xyz")
        m = _ipi_masses(start)[:, None]
        # positions: the checkpoint's, translated only
        shift = start.positions - chk.positions
        assert np.allclose(shift, shift[0], atol=1e-6)
        # velocities (i-PI file in atomic units): the checkpoint's minus translation and rotation
        au = units.Bohr / (units._aut * units.second)
        v2 = read(run2 / "simulation.init_vel.xyz").positions * au
        v1 = chk.get_velocities()
        r = start.positions - (m * start.positions).sum(0) / m.sum()
        assert np.linalg.norm((m * v2).sum(0)) < 1e-8 * np.linalg.norm(m * v1)
        assert np.linalg.norm(np.cross(r, m * v2).sum(0)) < 1e-8 * np.sum(m * np.linalg.norm(r, axis=1)[:, None] * np.abs(v1))
        delta = v2 - v1  # what was removed: a rigid translation plus a rotation, nothing else
        rigid = np.linalg.lstsq(_rigid_basis(r), delta.ravel(), rcond=None)
        assert np.linalg.norm(_rigid_basis(r) @ rigid[0] - delta.ravel()) < 1e-6 * np.linalg.norm(v1)
        assert np.linalg.norm(v2) > 0.5 * np.linalg.norm(v1)  # the thermal motion itself is kept
        # same temperature as before: the thermostat target in the XML is unchanged between iterations
        xml1 = (workdir / "iterations" / "iter_001" / "runs" / name / "simulation.xml").read_text()
        xml2 = (run2 / "simulation.xml").read_text()
        assert _thermostat(xml1) == _thermostat(xml2)


def _rigid_basis(r: np.ndarray) -> np.ndarray:
    """(3N, 6): velocity fields of the three translations and three rotations about the centre."""
    cols = []
    for a in np.eye(3):
        cols.append(np.tile(a, len(r)))
        cols.append(np.cross(a, r).ravel())
    return np.array(cols).T


def _thermostat(xml: str) -> str:
    import re

    return re.search(r"<temperature units='kelvin'>\s*([0-9.]+)", xml).group(1)


@pytest.mark.slow
def test_killed_during_sampling_and_labelling_resumes_without_loss_or_repeats(initialised, uninterrupted,
                                                                              tmp_path):
    from al_manager.learning.report import read_report_csv

    workdir = copy_workdir(initialised, tmp_path / "wd")
    config = write_config(tmp_path, workdir, max_iterations=1)
    base_workdir, _ = uninterrupted
    expected_labels = int(read_report_csv(base_workdir / "report.csv")[1]["labels"])

    def start():
        return subprocess.Popen([str(BIN / "nanosil"), "al", "run", str(config)], cwd=tmp_path, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill_when(proc, condition, what: str, timeout: float = 300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = state_of(workdir)
            if s and condition(s):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return s
            if proc.poll() is not None:
                pytest.fail(f"the manager ended (exit {proc.returncode}) before {what}")
            time.sleep(0.02)
        proc.kill()
        pytest.fail(f"never reached {what}")

    # 1. SIGKILL while the i-PI runs and their drivers are alive
    proc = start()
    s = kill_when(proc, lambda s: s["phase"] == "sampling" and s["iteration"] == 1 and len(s["children"]) >= 2,
                  "sampling with live children")
    assert any(c["role"] == "i-pi" for c in s["children"])
    # 2. SIGKILL again as soon as labelling starts
    proc = start()
    kill_when(proc, lambda s: s["phase"] == "labelling" and s["iteration"] == 1, "labelling")
    after_kill = state_of(workdir)
    assert len(after_kill["iterations"]["1"]["frames"]) == len(TEMPERATURES)  # the collected frames survived
    # 3. run to the end
    proc = subprocess.run([str(BIN / "nanosil"), "al", "run", str(config)], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]

    state = state_of(workdir)
    rows = db_rows(workdir)
    assert len(rows) == expected_labels  # the uninterrupted run's count after iteration 1
    assert len({r.hash for r in rows}) == len(rows)
    assert sum(1 for r in rows if r.origin == "al_iter_001") == len(TEMPERATURES)
    assert len(state["iterations"]["1"]["frames"]) == len(TEMPERATURES)
    report = read_report_csv(workdir / "report.csv")
    assert [int(r["iteration"]) for r in report] == [0, 1]
    assert int(report[-1]["labels"]) == expected_labels
    assert (workdir / "models" / "iter_001" / "committee.json").is_file()
    log = (workdir / "al.log").read_text()
    assert log.count("resume: phase") >= 2
    assert leftover_processes(workdir, state["token"]) == []
    assert not list(Path("/tmp").glob(f"ipi_nsal-{state['token'][:8]}-*"))


PARSL = """
[execution]
mode = "parsl"
provider = "local"
max_workers_per_node = 2
retries = 1
heartbeat_period = 1
heartbeat_threshold = 10

[execution.training]
members_per_node = 2
"""


@pytest.mark.slow
def test_an_iteration_on_parsl_survives_a_killed_manager(initialised, uninterrupted, tmp_path):
    """[execution] mode = "parsl" (a real HighThroughputExecutor, local provider, 2 workers): labels and the
    members' trainings are Parsl tasks. The manager SIGKILLed while its members train on Parsl workers:
    the rerun ends the orphaned pool, trains again and completes the iteration, with every label once."""
    pytest.importorskip("parsl")
    from al_manager.learning.report import read_report_csv

    workdir = copy_workdir(initialised, tmp_path / "wd")
    config = write_config(tmp_path, workdir, max_iterations=1, extra=PARSL)
    expected_labels = int(read_report_csv(uninterrupted[0] / "report.csv")[1]["labels"])
    out = open(tmp_path / "first.out", "w")
    proc = subprocess.Popen([str(BIN / "nanosil"), "al", "run", str(config)], cwd=tmp_path, env=env(),
                            stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if state_of(workdir).get("phase") == "training" and \
                "as tasks of ParslExecutor training" in (tmp_path / "first.out").read_text():
            time.sleep(0.5)   # the member tasks are out on the workers
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.out").read_text()[-3000:]
    token = state_of(workdir)["token"]
    from al_manager.processes import parsl_interchanges

    assert parsl_interchanges(workdir / "parsl"), "the killed manager's interchanges are not seen"

    again = nanosil("al", "run", config, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-3000:]
    assert "as tasks of ParslExecutor training" in again.stdout
    assert "as tasks of ParslExecutor sampling" in (tmp_path / "first.out").read_text()
    rows = db_rows(workdir)
    assert len(rows) == expected_labels and len({r.hash for r in rows}) == len(rows)
    assert (workdir / "models" / "iter_001" / "committee.json").is_file()
    assert not (workdir / "models" / ".iter_001.tasks").exists()
    assert [int(r["iteration"]) for r in read_report_csv(workdir / "report.csv")] == [0, 1]
    deadline = time.monotonic() + 30
    while (leftover_processes(workdir, token) or parsl_interchanges(workdir / "parsl")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover_processes(workdir, token) == []
    assert parsl_interchanges(workdir / "parsl") == []   # the orphaned ones were ended, the rerun's own are gone


@pytest.mark.slow
def test_an_iteration_through_a_real_single_node_slurm(slurm, initialised, uninterrupted, tmp_path):
    """The same iteration with provider = "slurm" (conftest.slurm: a private slurmctld + slurmd): labels,
    sampling runs (their frames over CurveZMQ) and members are tasks on worker pools that sbatch
    started; the iteration ends with the uninterrupted run's labels."""
    pytest.importorskip("parsl")
    from al_manager.learning.report import read_report_csv

    workdir = copy_workdir(initialised, tmp_path / "wd")
    extra = f"""
[execution]
mode = "parsl"
provider = "slurm"
partition = "debug"
walltime = "00:20:00"
worker_init = 'export PATH="{BIN}:$PATH"'
cores_per_node = 1          # not exclusive: the stages' jobs share the one node
max_idletime = 5
retries = 1
address = "127.0.0.1"
heartbeat_period = 2
heartbeat_threshold = 20

[execution.training]
members_per_node = 2
"""
    config = write_config(tmp_path, workdir, max_iterations=1, extra=extra)
    proc = nanosil("al", "run", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    for stage in ("sampling", "training"):
        assert f"as tasks of ParslExecutor {stage}" in proc.stdout
    expected = int(read_report_csv(uninterrupted[0] / "report.csv")[1]["labels"])
    rows = db_rows(workdir)
    assert len(rows) == expected and len({r.hash for r in rows}) == len(rows)
    assert (workdir / "zmq_keys" / "server.key_secret").is_file()
    for t in TEMPERATURES:
        assert "(CurveZMQ)" in (workdir / "iterations" / "iter_001" / "runs" / f"P1_{t}K" / "driver.log").read_text()
    scripts = {p.name.split(".block")[0] for p in (workdir / "parsl").rglob("submit_scripts/parsl.*.block-*")
               if p.suffix not in (".stdout", ".stderr")}
    assert scripts == {"parsl.labelling", "parsl.sampling", "parsl.training"}   # every stage went through sbatch
    assert [int(r["iteration"]) for r in read_report_csv(workdir / "report.csv")] == [0, 1]


@pytest.mark.slow
def test_an_iteration_whose_every_run_crashes_stops_with_the_reason(initialised, tmp_path):
    """mpirun cannot start a single driver (a host file that does not exist): the loop stops with one line
    naming a run and the reason, exit 1, instead of counting an empty iteration; the rerun, with the cause
    gone, samples every run again."""
    workdir = copy_workdir(initialised, tmp_path / "wd")
    config = write_config(tmp_path, workdir, max_iterations=1)
    broken = dict(env(), HYDRA_HOST_FILE=str(tmp_path / "no_such_hostfile"))
    proc = subprocess.run([str(BIN / "nanosil"), "al", "run", str(config)], cwd=tmp_path, env=broken,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("nanosil al: error: iteration 1: every sampling run crashed, e.g. P1_"), proc.stderr[-2000:]
    assert "driver exit" in line and "Traceback" not in proc.stderr
    state = state_of(workdir)
    assert state["phase"] == "sampling" and state["iterations"]["1"]["runs"] == {}
    again = nanosil("al", "run", config, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert all(r["status"] == "done" for r in state_of(workdir)["iterations"]["1"]["runs"].values())


@pytest.mark.slow
def test_crashed_and_exploded_runs_are_recorded_and_the_iteration_goes_on(tmp_path, small_config):
    """A driver that cannot start (an element the committee does not know) and a structure whose
    committee disagreement reaches the trust cap: both recorded, the healthy run still delivers."""
    from ase.io import read, write

    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from driver.models.committee import build_committee, save_committee

    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    p1 = shared_file("structures", "pyroxene_N01_GM.xyz")
    iron = read(p1)
    iron.symbols[0] = "Fe"
    write(tmp_path / "FeSiO3.xyz", iron)
    lines = []
    state = State.load(tmp_path / "wd", create=True)
    specs = plan_runs({"P1": str(p1), "FeSiO3": str(tmp_path / "FeSiO3.xyz")}, [500])
    settings = SamplingSettings(max_md_ps=0.1, timestep_fs=1.0, energy_threshold=1e-5, parallel_runs=2,
                                mpi_ranks=1, partner_grace_s=2)
    with _owner(state):
        record = Sampler(state, 1, specs, models, tmp_path / "wd" / "it1", settings, log=lines.append).run()
    runs = record["runs"]
    assert runs["P1_500K"]["status"] == "done" and runs["P1_500K"]["frames"] == 1
    # the run's i-PI input carries the configured time step, and the step count follows it
    import xml.etree.ElementTree as ET

    root = ET.parse(tmp_path / "wd" / "it1" / "runs" / "P1_500K" / "simulation.xml").getroot()
    assert float(root.find(".//dynamics/timestep").text) == 1.0
    assert int(root.find(".//total_steps").text) == 100
    assert runs["P1_500K"]["timestep_fs"] == 1.0
    assert runs["FeSiO3_500K"]["status"] == "crashed"
    assert "Fe" in runs["FeSiO3_500K"]["reason"]
    assert [f["run"] for f in record["frames"]] == ["P1_500K"]
    assert any("FeSiO3_500K crashed" in line for line in lines)

    # a trust cap below the committee's disagreement (nanosil-driver --trust-cap): the structure counts as
    # exploded, nothing is kept
    settings = SamplingSettings(max_md_ps=0.1, energy_threshold=1e-6, trust_cap=2e-6, parallel_runs=1,
                                mpi_ranks=1)
    with _owner(state):
        record = Sampler(state, 2, plan_runs({"P1": str(p1)}, [500]), models, tmp_path / "wd" / "it2",
                         settings, log=lines.append).run()
    run = record["runs"]["P1_500K"]
    assert run["status"] == "exploded" and run["frames"] == 0 and "exploded" in run["reason"]
    assert run["steps"] < 200  # stopped through EXIT, long before the 200-step maximum
    assert leftover_processes(tmp_path / "wd", state.token) == []
    assert state.data["children"] == []


@pytest.mark.slow
def test_frames_of_a_run_keep_min_flag_gap_from_each_other_and_from_the_start(tmp_path, small_config):
    """A committee uncertain everywhere (threshold 1e-6) flags every step of a real i-PI run: the frames kept
    are min_flag_gap_fs apart, and the first is that far from the start too, which is a labelled structure
    (the minimum, or where the previous iteration's run stopped, a step after its last kept frame)."""
    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from driver.models.committee import build_committee, save_committee

    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    state = State.load(tmp_path / "wd", create=True)
    settings = SamplingSettings(max_md_ps=0.2, timestep_fs=1.0, energy_threshold=1e-6, frames_per_run=3,
                                min_flag_gap_fs=20.0, mpi_ranks=1)
    with _owner(state):
        record = Sampler(state, 1, plan_runs({"P1": str(shared_file("structures", "pyroxene_N01_GM.xyz"))}, [500]),
                         models, tmp_path / "wd" / "it1", settings, log=[].append).run()
    assert [f["step"] for f in record["frames"]] == [20, 40, 60]
    assert record["runs"]["P1_500K"]["frames"] == 3


@pytest.mark.slow
def test_sampling_drivers_on_other_hosts_send_frames_over_curve_zmq(tmp_path, small_config):
    """What a pool on other nodes gets (collector_keys, as sampling_arguments gives for slurm/pbs): the
    collector listens on every interface as a CurveZMQ server, the drivers connect with the workdir's
    client key, and their frames arrive; the keys are the user's alone."""
    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from driver.flagging import create_zmq_keys
    from driver.models.committee import build_committee, save_committee

    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    state = State.load(tmp_path / "wd", create=True)
    keys = create_zmq_keys(tmp_path / "wd")
    assert (keys.stat().st_mode & 0o777) == 0o700
    settings = SamplingSettings(max_md_ps=0.1, timestep_fs=1.0, energy_threshold=1e-6, mpi_ranks=1)
    lines = []
    with _owner(state):
        record = Sampler(state, 1, plan_runs({"P1": str(shared_file("structures", "pyroxene_N01_GM.xyz"))}, [500]),
                         models, tmp_path / "wd" / "it1", settings, log=lines.append, collector_keys=keys,
                         collector_host="127.0.0.1").run()
    run = record["runs"]["P1_500K"]
    assert run["status"] == "done" and run["frames"] == 1, (run, lines[-5:])
    driver_log = (tmp_path / "wd" / "it1" / "runs" / "P1_500K" / "driver.log").read_text()
    assert "CurveZMQ" in driver_log, driver_log[-2000:]


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


@pytest.mark.slow
def test_sampling_runs_as_parsl_tasks_and_a_killed_worker_is_retried(tmp_path, small_config):
    """Each run as a task on a real Parsl sampling pool (HighThroughputExecutor, local provider, 2 pairs at
    once): the frames reach the manager's collector from the workers' drivers. The worker process of one
    run is SIGKILLed while its i-PI runs: the task is retried from the run's inputs and the run still
    delivers its frames; no process of the work directory is left."""
    pytest.importorskip("parsl")
    from al_manager.execution import ExecutionSettings, SamplingResources, sampling_arguments, session
    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from al_manager.processes import cwd_is, tagged_processes
    from driver.models.committee import build_committee, save_committee

    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    p1, o1 = shared_file("structures", "pyroxene_N01_GM.xyz"), shared_file("structures", "olivine_N01_GM.xyz")
    state = State.load(tmp_path / "wd", create=True)
    specs = plan_runs({"P1": str(p1), "O1": str(o1)}, [500])
    # frames 100 fs apart: the runs last long enough to be caught at work
    settings = SamplingSettings(max_md_ps=1.0, timestep_fs=1.0, energy_threshold=1e-6, frames_per_run=3,
                                min_flag_gap_fs=100.0, mpi_ranks=1, partner_grace_s=5)
    execution = ExecutionSettings(mode="parsl", provider="local", retries=1, heartbeat_period=1,
                                  heartbeat_threshold=10, sampling=SamplingResources(pairs_per_node=2))
    lines, killed = [], []
    it_dir = tmp_path / "wd" / "it1"
    import threading

    def kill_a_worker():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in tagged_processes(state.token):
                if cwd_is(pid, it_dir / "runs" / "O1_500K") and "i-pi" in Path(f"/proc/{pid}/cmdline").read_text():
                    time.sleep(1.0)   # i-PI is stepping
                    worker = _parent(pid)
                    os.kill(worker, signal.SIGKILL)
                    killed.append(worker)
                    return
            time.sleep(0.05)

    with _owner(state), session(execution, tmp_path / "runinfo", stages=("sampling",)):
        placement = sampling_arguments(execution, tmp_path / "wd")
        assert placement["slots"] == 2 and "collector_keys" not in placement  # loopback on this machine
        killer = threading.Thread(target=kill_a_worker)
        killer.start()
        record = Sampler(state, 1, specs, models, it_dir, settings, log=lines.append, **placement).run()
        killer.join()
        retried = placement["executor"].retried
    assert killed, "no sampling worker was seen running i-PI"
    assert retried >= 1, "the killed worker's task was not retried"
    for name in ("P1_500K", "O1_500K"):
        run = record["runs"][name]
        assert run["status"] == "done" and run["frames"] == 3, (run.get("reason"), run, lines)
    assert sorted(f["run"] for f in record["frames"]) == ["O1_500K"] * 3 + ["P1_500K"] * 3
    assert any("O1_500K flagged" in line for line in lines)
    # the retried task's i-PI wrote the run's checkpoint for the next iteration
    assert (it_dir / "runs" / "O1_500K" / "RESTART").is_file()
    deadline = time.monotonic() + 30   # the session's worker pool exits a moment after its end
    while leftover_processes(tmp_path / "wd", state.token) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftover_processes(tmp_path / "wd", state.token) == []


_SQUATTER = """
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a dying i-PI that does not go at once
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(1)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_retried_sampling_task_ends_the_earlier_try_still_holding_the_socket(tmp_path, small_config):
    """A retried run_pair task on the node where the earlier try's i-PI lives on (its worker was SIGKILLed;
    that i-PI got SIGTERM but still holds the run's UNIX socket): the task ends it, removes the socket
    file i-PI would refuse to bind over, and the run delivers its frames."""
    from concurrent.futures import ThreadPoolExecutor

    from al_manager.learning.sampling import Sampler, SamplingSettings, plan_runs
    from al_manager.learning.state import State
    from al_manager.processes import OWNER_ENV
    from driver.models.committee import build_committee, save_committee
    from ipi_inputs.files import SOCKETS_PREFIX

    models = tmp_path / "models"
    save_committee(build_committee(small_config, n_members=2, n_dipole=0, seed=1), models)
    state = State.load(tmp_path / "wd", create=True)
    squatters = []

    class EarlierTryStillThere(ThreadPoolExecutor):
        def submit(self, fn, run_dir, ipi_argv, driver_argv, env, attempt, exit_grace_s, partner_grace_s,
                   socket_name):
            path = SOCKETS_PREFIX + socket_name
            squatters.append(subprocess.Popen([sys.executable, "-c", _SQUATTER, path], cwd=run_dir,
                                              env={**os.environ, OWNER_ENV: state.token}))
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert os.path.exists(path)
            return super().submit(fn, run_dir, ipi_argv, driver_argv, env, attempt, exit_grace_s,
                                  partner_grace_s, socket_name)

    settings = SamplingSettings(max_md_ps=0.2, timestep_fs=1.0, energy_threshold=1e-6, frames_per_run=2,
                                mpi_ranks=1, exit_grace_s=3.0)
    lines = []
    try:
        with _owner(state), EarlierTryStillThere(max_workers=1) as pool:
            record = Sampler(state, 1, plan_runs({"P1": str(shared_file("structures", "pyroxene_N01_GM.xyz"))},
                                                 [500]),
                             models, tmp_path / "wd" / "it1", settings, log=lines.append, executor=pool,
                             slots=1).run()
    finally:
        for squatter in squatters:   # never left behind, also when the run failed
            if squatter.poll() is None:
                squatter.kill()
    run = record["runs"]["P1_500K"]
    assert run["status"] == "done" and run["frames"] == 2, (run.get("reason"), lines)
    assert squatters[0].wait(timeout=10) == -signal.SIGKILL  # it ignored SIGTERM for the whole grace
    assert leftover_processes(tmp_path / "wd", state.token) == []


class _owner:
    """Tag child processes as the manager does (for leftover checks)."""

    def __init__(self, state):
        from al_manager.learning.loop import _owner_tag

        self.cm = _owner_tag(state.token)

    def __enter__(self):
        return self.cm.__enter__()

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


@pytest.mark.parametrize("case, key", [
    ("backend", "reference.backend"),
    ("structure", "structures.P1"),
    ("temperature", "temperatures[1]"),
    ("element", "structures.P1: element Fe is not in the model's species (Mg, O, Si)"),
    ("train type", "train.epochs: must be an integer"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, case, key):
    if case == "element":  # refused at load time, before any reference work (no work directory yet)
        from ase.io import read, write

        iron = read(shared_file("structures", "pyroxene_N01_GM.xyz"))
        iron.symbols[0] = "Fe"
        write(tmp_path / "FeSiO3.xyz", iron)
    kwargs = {"backend": dict(backend="dftb"), "structure": dict(structure=tmp_path / "missing.xyz"),
              "temperature": dict(temperatures=(400, -100)), "element": dict(structure=tmp_path / "FeSiO3.xyz"),
              "train type": {}}[case]
    config = write_config(tmp_path, tmp_path / "wd", **kwargs)
    if case == "train type":  # a string where TrainConfig takes an integer: refused before labelling
        config.write_text(config.read_text().replace("epochs = 10", 'epochs = "10"'))
    for command in ("init", "run"):
        proc = nanosil("al", command, config, cwd=tmp_path, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "wd").exists()  # nothing was started


def test_status_of_a_folder_that_is_no_work_directory(tmp_path):
    proc = nanosil("al", "status", tmp_path, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "not an active-learning work directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------- durability pieces (fast)
def test_orphans_of_a_killed_manager_are_ended_and_nothing_else(tmp_path):
    """Processes carrying the work directory's tag (i-PI, MPI ranks, workers of a killed manager) are
    ended on resume; an unrelated process is left alone. A second manager is refused by the lock."""
    from al_manager.learning.state import State, WorkdirBusy, WorkdirLock
    from al_manager.processes import OWNER_ENV, end_orphans, is_running

    state = State.load(tmp_path, create=True)
    tagged = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{OWNER_ENV: state.token}),
                              start_new_session=True)
    grandchild = subprocess.Popen(["sh", "-c", "sleep 60 & wait"], env=dict(os.environ, **{OWNER_ENV: state.token}),
                                  start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], env=dict(os.environ, **{OWNER_ENV: "someone-else"}))
    try:
        state.add_child(tagged.pid, "i-pi", "P1_400K")
        time.sleep(0.2)
        found = end_orphans(State.load(tmp_path), grace=2.0)
        assert tagged.pid in found and grandchild.pid in found
        tagged.wait(timeout=5)
        grandchild.wait(timeout=5)
        assert is_running(other.pid)
        assert State.load(tmp_path)["children"] == []
        with WorkdirLock(tmp_path):
            with pytest.raises(WorkdirBusy, match="another active-learning manager"):
                WorkdirLock(tmp_path).acquire()
        WorkdirLock(tmp_path).acquire().release()  # released with its holder
    finally:
        for p in (tagged, grandchild, other):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_state_file_is_replaced_atomically_and_damage_is_reported(tmp_path):
    from al_manager.learning.state import State

    state = State.load(tmp_path, create=True)
    state.iteration_record(1)["frames"].append({"id": "001-P1_400K-0"})
    state.save()
    assert State.load(tmp_path).iteration_record(1)["frames"][0]["id"] == "001-P1_400K-0"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
    (tmp_path / "state.json").write_text('{"schema": "nanosil.al-state/1", "phase": ')
    with pytest.raises(ValueError, match="state.json: not valid JSON"):
        State.load(tmp_path)


def test_a_signal_during_a_reference_calculation_interrupts_the_manager():
    """SIGTERM that lands inside a backend's calculation (whose ``except Exception`` turns library errors
    into failed labels) still reaches the manager as Interrupted, not as a failed label."""
    import threading

    from ase.io import read

    from al_manager.learning.loop import Interrupted, _signals_raise
    from al_manager.reference.base import get_backend

    be = get_backend("xtb")
    atoms = read(str(shared_file("structures", "pyroxene_N02_GM.xyz")))
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted):
        with _signals_raise():
            timer.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:   # almost all of the time is spent inside be.label
                be.label(atoms)
    timer.join()


def test_reference_harmonics_of_several_structures_in_parallel_equal_the_serial_ones(tmp_path):
    """workers = 2: the structures are analysed in two processes at once, with the same result as one
    after another; the cache then serves both without recomputing."""
    from al_manager.learning.measure import reference_harmonics

    files = {"P1": str(shared_file("structures", "pyroxene_N01_GM.xyz")),
             "O1": str(shared_file("structures", "olivine_N01_GM.xyz"))}
    serial = reference_harmonics(files, "xtb", tmp_path / "serial", log=lambda m: None)
    lines = []
    parallel = reference_harmonics(files, "xtb", tmp_path / "parallel", log=lines.append, workers=2)
    for name in files:
        np.testing.assert_allclose(parallel[name].frequencies, serial[name].frequencies, atol=1e-6)
        np.testing.assert_allclose(parallel[name].atoms.positions, serial[name].atoms.positions, atol=1e-8)
        assert (tmp_path / "parallel" / f"{name}_relaxed.extxyz").is_file()
    assert any("(in parallel with the others)" in line for line in lines)
    assert sum("modes" in line for line in lines) == 2
    again = []
    reference_harmonics(files, "xtb", tmp_path / "parallel", log=again.append, workers=2)
    assert again == []   # cached: nothing computed, nothing said


def test_the_yardstick_stencil_gives_the_exact_frequency_of_a_stiff_morse_bond(tmp_path):
    """A Si-O-like Morse bond, whose harmonic frequency is known in closed form: the yardstick's 4-point
    finite differences give it to 0.02 cm^-1, while the 2-point stencil at the same step is too stiff by
    more than 0.3 cm^-1 (its O(delta^2) term), the size of the errors the yardstick measures."""
    from ase import Atoms, units
    from ase.calculators.morse import MorsePotential
    from ase.vibrations import Vibrations

    from al_manager.learning.measure import STENCIL

    epsilon, r0, rho0 = 5.0, 1.6, 6.0          # eV, Å, dimensionless: k = 2 epsilon (rho0 / r0)^2
    atoms = Atoms("SiO", positions=[[0, 0, 0], [r0, 0, 0]])
    atoms.calc = MorsePotential(epsilon=epsilon, r0=r0, rho0=rho0, rcut1=10.0, rcut2=12.0)
    masses = atoms.get_masses()
    mu = masses[0] * masses[1] / masses.sum()
    k = 2 * epsilon * (rho0 / r0) ** 2
    exact = np.sqrt(k / (mu * units._amu) * units._e * 1e20) / (2 * np.pi * units._c * 100)   # cm^-1

    def stretch(nfree: int) -> float:
        vib = Vibrations(atoms, name=str(tmp_path / f"vib{nfree}"), delta=STENCIL["delta"], nfree=nfree)
        vib.run()
        return float(np.real(vib.get_frequencies()).max())

    assert abs(stretch(STENCIL["nfree"]) - exact) < 0.02
    assert stretch(2) - exact > 0.3


def test_a_resumed_run_measured_against_another_yardstick_is_measured_again(uninterrupted, tmp_path):
    """Rows measured against an older reference analysis are measured again on resume against today's (the
    report's rows, the state, the log line); a second resume finds nothing to do."""
    from al_manager.learning.measure import harmonic_errors, reference_harmonics
    from al_manager.learning.report import read_report_csv

    workdir = copy_workdir(uninterrupted[0], tmp_path / "wd")
    state = state_of(workdir)
    for holder in [state["initial"], *state["iterations"].values()]:
        holder["measured"]["harmonic"]["yardstick"] = "xtb:GFN2-xTB (2-point central differences, 0.01 Å)"
        holder["row"]["harmonic_mae_cm-1"] = 9999.0
    (workdir / "state.json").write_text(json.dumps(state))
    config = write_config(tmp_path, workdir, max_iterations=2)
    proc = nanosil("al", "run", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert proc.stdout.count("re-measured models/iter_00") == 3 and "harmonic MAE 9999.00 ->" in proc.stdout
    refs = reference_harmonics({"P1": str(shared_file("structures", "pyroxene_N01_GM.xyz"))}, "xtb",
                               workdir / "reference", log=lambda m: None)
    expected = harmonic_errors(workdir / "models" / "iter_002", refs)
    rows = read_report_csv(workdir / "report.csv")
    assert float(rows[-1]["harmonic_mae_cm-1"]) == pytest.approx(expected["mae_cm-1"], abs=1e-3, nan_ok=True)  # CSV: 3 decimals; a tiny committee may fail to relax (NaN)
    assert all(float(r["harmonic_mae_cm-1"]) != 9999.0 for r in rows)
    assert state_of(workdir)["iterations"]["2"]["measured"]["harmonic"]["yardstick"] == expected["yardstick"]
    again = nanosil("al", "run", config, cwd=tmp_path)
    assert again.returncode == 0 and "re-measured" not in again.stdout


def test_reference_harmonics_survive_a_kill_inside_the_displacement_cache(tmp_path):
    """A killed harmonic analysis leaves ASE's empty lock file for the displacement in flight; the
    resumed one recomputes that displacement and gives the uninterrupted frequencies."""
    from al_manager.learning.measure import reference_harmonics, vibrational

    p1 = str(shared_file("structures", "pyroxene_N01_GM.xyz"))
    first = reference_harmonics({"P1": p1}, "xtb", tmp_path / "a", log=lambda m: None)["P1"]
    cache = sorted((tmp_path / "a" / "P1_displacements").glob("**/cache.*.json"))
    assert len(cache) == 4 * 3 * 5 + 1  # +-1, +-2 steps along x, y, z of 5 atoms, and the undisplaced structure
    cache[3].write_text("")                          # the calculation in flight when the manager died
    (tmp_path / "a" / "harmonic.json").unlink()      # it died before the result was stored
    lines = []
    again = reference_harmonics({"P1": p1}, "xtb", tmp_path / "a", log=lines.append)["P1"]
    # the same 9 vibrational frequencies (to the SCF convergence of one recomputed displacement, which the
    # 4-point stencil's larger weights carry to a few hundredths of a cm^-1)
    assert np.allclose(vibrational(again.frequencies), vibrational(first.frequencies), atol=0.1)
    assert any("interrupted" in line for line in lines)
