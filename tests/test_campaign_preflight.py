"""`nanosil ir-campaign --dry-run` finds, before anything runs, what would fail later: a committee without a
dipole model, an element the committee does not know, broken positions, a damaged checkpoint."""
from __future__ import annotations

import subprocess

import numpy as np
from ase import Atoms
from ase.io import write

from conftest import BIN, CHILD_ENV, cluster, untrained_committee


def _campaign(tmp_path, models, structure) -> str:
    toml = tmp_path / "c.toml"
    toml.write_text(f'models = "{models}"\nseeds = 1\ntemperatures = [300]\n[md]\nproduction_ps = 1.0\n'
                    f'discard_ps = 0.1\nequilibration_ps = 0.1\n[spectra]\ncorrelation_depth_fs = 200\n'
                    f'[clusters]\nX = "{structure}"\n')
    return str(toml)


def _dry(config) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nanosil"), "ir-campaign", config, "--dry-run"], capture_output=True,
                          text=True, env=CHILD_ENV, timeout=120)


def _one_line_error(run, *words):
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_dry_run_accepts_a_good_campaign_and_lists_the_plan(tmp_path):
    models = untrained_committee(tmp_path / "m")
    run = _dry(_campaign(tmp_path, models, cluster("pyroxene_N01_GM.xyz")))
    assert run.returncode == 0, run.stderr
    assert "X_300K_s1" in run.stdout


def test_dry_run_refuses_what_would_fail_later(tmp_path):
    from driver.models.committee import ModelConfig, build_committee, save_committee

    p1 = cluster("pyroxene_N01_GM.xyz")
    no_dipole = tmp_path / "nodip"
    save_committee(build_committee(ModelConfig(hidden=(8, 8)), n_members=2, n_dipole=0), no_dipole)
    _one_line_error(_dry(_campaign(tmp_path, no_dipole, p1)), "no dipole model", "--dipole-members")

    models = untrained_committee(tmp_path / "m")
    fe = tmp_path / "fe.xyz"
    write(fe, Atoms("FeSiO3", positions=np.random.default_rng(0).normal(scale=2.0, size=(5, 3))))
    _one_line_error(_dry(_campaign(tmp_path, models, fe)), "fe.xyz", "Fe", "committee's species")

    close = tmp_path / "close.xyz"
    write(close, Atoms("MgSiO3", positions=[[0, 0, 0], [0.1, 0, 0], [3, 0, 0], [0, 3, 0], [0, 0, 3]]))
    _one_line_error(_dry(_campaign(tmp_path, models, close)), "close.xyz", "apart")

    (models / "energy.pt").write_bytes((models / "energy.pt").read_bytes()[:100])   # truncated
    _one_line_error(_dry(_campaign(tmp_path, models, p1)), "energy.pt")
