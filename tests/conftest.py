"""Shared fixtures: the paper's reference data (../shared/data, skipped when absent) and small models."""
from __future__ import annotations

import os
import subprocess
import sys
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
