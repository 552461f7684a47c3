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
def p2_dft_frames():
    from driver.data import read_frames

    return read_frames(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"))


@pytest.fixture
def small_config():
    from driver.models.committee import ModelConfig

    return ModelConfig(hidden=(32, 32), dipole_features=16, dipole_interactions=2, dipole_gaussians=10)
