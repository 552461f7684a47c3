"""nanosil-driver's promised messages for bad input: one line, exit status 2 (1 when i-PI is absent),
printed once even under `mpirun -n 2`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ase.io import read

from driver.models.committee import ModelConfig, build_committee, save_committee
from conftest import cluster

BIN = Path(sys.executable).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "models"
    save_committee(build_committee(ModelConfig(hidden=(8,), dipole_features=8, dipole_interactions=1,
                                               dipole_gaussians=4), n_members=2, n_dipole=1, seed=0), folder)
    return folder


def driver(*args, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "nanosil-driver"), *map(str, args)]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)


def test_missing_model_folder_one_line_exit_2_once_per_job(tmp_path):
    run = driver("--models", tmp_path / "nowhere", "--structure", cluster("pyroxene_N01_GM.xyz"), "--unix", "x",
                 ranks=2)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"nanosil-driver: error: model folder {tmp_path / 'nowhere'} does not exist"]


def test_folder_without_committee_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    run = driver("--models", tmp_path / "empty", "--structure", cluster("pyroxene_N01_GM.xyz"), "--unix", "x")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"nanosil-driver: error: {tmp_path / 'empty'} is not a nanosil model folder (no committee.json)"]


def test_unknown_species_names_element_file_and_model_species(models, tmp_path):
    atoms = read(cluster("pyroxene_N01_GM.xyz"))
    atoms[2].symbol = "Al"
    atoms.write(tmp_path / "al.xyz")
    run = driver("--models", models, "--structure", tmp_path / "al.xyz", "--unix", "x")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "element Al in" in lines[0] and "al.xyz" in lines[0] and "Mg, Si, O" in lines[0]


def test_missing_structure_and_remote_flag_endpoint(models, tmp_path):
    run = driver("--models", models, "--structure", tmp_path / "none.xyz", "--unix", "x")
    assert run.returncode == 2 and run.stderr.strip() == f"nanosil-driver: error: structure file {tmp_path / 'none.xyz'} does not exist"
    run = driver("--models", models, "--structure", cluster("pyroxene_N01_GM.xyz"), "--unix", "x",
                 "--energy-threshold", "0.01", "--flag-endpoint", "tcp://192.0.2.7:5555")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "not on the loopback interface" in run.stderr


def test_usage_errors_print_once_under_mpirun(models):
    run = driver("--models", models, "--structure", cluster("pyroxene_N01_GM.xyz"), ranks=2)
    assert run.returncode == 2
    assert run.stderr.count("one of the arguments --unix --inet is required") == 1


def test_no_ipi_server_is_exit_1_with_the_socket_named(models):
    run = driver("--models", models, "--structure", cluster("pyroxene_N01_GM.xyz"), "--unix", "nobody_listens_here",
                 "--connect-timeout", "0.5", ranks=2)
    assert run.returncode == 1
    assert "error: no i-PI server at UNIX socket /tmp/ipi_nobody_listens_here" in run.stderr
