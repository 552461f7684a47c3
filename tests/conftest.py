"""Shared fixtures: the paper's reference data (../shared/data, skipped when absent) and small models."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Reference backends and torch parallelise over processes here; threads would oversubscribe 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def shared_file(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"reference data {path} not available (../shared/data is absent)")
    return path


def cluster(name: str) -> Path:
    """A reference structure of ../shared/data/structures (absolute path), or a skip."""
    return shared_file("structures", name).resolve()


@pytest.fixture(scope="session")
def p2_dft_frames():
    from driver.data import read_frames

    return read_frames(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"))


@pytest.fixture
def small_config():
    from driver.models.committee import ModelConfig

    return ModelConfig(hidden=(32, 32), dipole_features=16, dipole_interactions=2, dipole_gaussians=10)
