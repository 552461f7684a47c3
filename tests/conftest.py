"""Shared fixtures: the paper's reference data (../shared/data, skipped when absent) and small models."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# Reference backends and torch parallelise over processes here; threads would oversubscribe 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Child processes (i-PI, nanosil-driver, mpirun, python -m ...): one thread each, this venv's tools on PATH.
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                 PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} not available (../shared/data is absent)")
    return path


def cluster(name: str) -> Path:
    """A reference structure of ../shared/data/structures (absolute path), or a skip."""
    return shared_file("structures", name).resolve()


def bench_module(name: str):
    """A script of bench/ as a module (its functions under test)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def untrained_committee(folder: Path) -> Path:
    """A small untrained 3 + 2 member committee saved in ``folder``: for plumbing and units, not physics."""
    from driver.models.committee import ModelConfig, build_committee, save_committee

    config = ModelConfig(hidden=(16, 16), dipole_features=16, dipole_interactions=1, dipole_gaussians=8)
    save_committee(build_committee(config, n_members=3, n_dipole=2, seed=0), folder)
    return folder


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: the end of a child a test started, if it still runs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def xtb_model(tmp_path_factory):
    """A small committee (3 energy + 2 dipole members) trained on GFN2-xTB labels of P1 and O1 sampled along
    their xTB normal modes at 50-600 K, and the xTB-relaxed structures it starts from ({"P1": path, "O1": path}):
    stable MD with real vibrational bands (a real campaign in test_campaign, the dipole stride in
    test_dipole_stride). Needs tblite."""
    import numpy as np
    from ase import units
    from ase.io import read, write

    pytest.importorskip("tblite")
    from al_manager.reference.base import get_backend
    from driver.data import Frame
    from driver.training import TrainConfig, train_committee

    folder = tmp_path_factory.mktemp("xtb_model")
    xtb = get_backend("xtb")
    rng = np.random.default_rng(0)
    hbar = units._hbar * units.J * units.s
    frames, paths = [], {}
    for name, tag in (("pyroxene_N01_GM.xyz", "P1"), ("olivine_N01_GM.xyz", "O1")):
        base = xtb.relax(read(cluster(name)))
        paths[tag] = folder / f"{tag}.xyz"
        write(paths[tag], base)
        h = xtb.harmonic(base)
        keep = h.frequencies > 50
        sqm = np.sqrt(base.get_masses())[:, None]
        modes = np.array([v / np.linalg.norm(v * sqm) for v in h.modes[keep]])  # unit mass-weighted norm
        omega = h.frequencies[keep] * units.invcm / hbar
        for k in range(40):
            amplitude = rng.normal(size=len(omega)) * np.sqrt(units.kB * (50, 150, 300, 600)[k % 4]) / omega
            atoms = base.copy()
            atoms.positions += np.tensordot(amplitude, modes, axes=1)
            label = xtb.label(atoms)
            frames.append(Frame(atoms.numbers.copy(), atoms.positions.copy(), label.energy, label.forces,
                                label.dipole))
    train_committee(frames, folder / "model", TrainConfig(
        committee=3, dipole_members=2, epochs=60, patience=60, log_every=1000,
        model=dict(hidden=(32, 32), dipole_features=16, dipole_interactions=1)))
    return folder / "model", paths


@pytest.fixture(scope="session")
def p2_dft_frames():
    from driver.data import read_frames

    return read_frames(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"))


@pytest.fixture
def small_config():
    from driver.models.committee import ModelConfig

    return ModelConfig(hidden=(32, 32), dipole_features=16, dipole_interactions=2, dipole_gaussians=10)


@pytest.fixture
def ipi_children():
    """(processes, socket names) a test starts: stopped and removed after it, also when it fails."""
    from ipi_inputs.files import SOCKETS_PREFIX

    started, sockets = [], []
    yield started, sockets
    for proc in started:
        stop(proc)
    for name in sockets:
        if os.path.exists(SOCKETS_PREFIX + name):
            os.unlink(SOCKETS_PREFIX + name)


# ---------------------------------------------------------------------- a real SLURM, when installed
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A private single-node SLURM (munged, slurmctld, slurmd in the foreground, own ports, own state folder),
    stopped at the end; skipped where Debian's slurm-wlm / munge are not installed or we are not root."""
    tools = [shutil.which(t) for t in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")]
    if not all(tools) or os.geteuid() != 0:
        pytest.skip("a real SLURM needs root and Debian's slurm-wlm + munge (apt-get install slurm-wlm munge)")
    root = tmp_path / "slurm"
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=nanosiltest
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    env = dict(os.environ)
    logs = [open(root / "log" / f"{n}.out", "w") for n in ("munged", "slurmctld", "slurmd")]
    procs = [subprocess.Popen(["munged", "-F", "-f", f"--socket={root}/munge/sock", f"--key-file={key}",
                               f"--pid-file={root}/munge/pid", f"--log-file={root}/log/munged.log",
                               f"--seed-file={root}/munge/seed"], stdout=logs[0], stderr=subprocess.STDOUT,
                              env=env, start_new_session=True)]
    try:
        deadline = time.monotonic() + 20
        while not (root / "munge" / "sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(subprocess.Popen(["slurmctld", "-D", "-i"], stdout=logs[1], stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        procs.append(subprocess.Popen(["slurmd", "-D"], stdout=logs[2], stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True))
        deadline, state = time.monotonic() + 60, ""
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout.strip()
            if state == "idle":
                break
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.5)
        if state != "idle":
            tail = "\n".join((root / "log" / f).read_text()[-1500:] for f in ("slurmctld.log", "slurmd.log")
                             if (root / "log" / f).exists())
            pytest.fail(f"the private SLURM did not come up (sinfo: {state!r}):\n{tail}")
        yield root
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True, timeout=30)
        time.sleep(0.5)
        for p in reversed(procs):
            stop(p)
        for f in logs:
            f.close()
