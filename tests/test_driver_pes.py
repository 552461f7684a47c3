"""driver.ipi.pes (the i-PI PES class and the reply) and driver.ipi.mpi_committee (members over real MPI ranks)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.io import read

from driver.models.committee import load_committee
from driver.ipi.mpi_committee import split_members
from driver.ipi.pes import AtomCountMismatch, NanosilDriver

from conftest import cluster, untrained_committee

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return untrained_committee(tmp_path_factory.mktemp("pes") / "models")


def test_reply_is_the_committee_in_atomic_units(models, tmp_path):
    src = cluster("pyroxene_N02_GM.xyz")
    atoms = read(src)
    pes = NanosilDriver(models=str(models), structure=str(src), flag_file=str(tmp_path / "f.extxyz"))
    committee = load_committee(models)
    rng = np.random.default_rng(1)
    pos = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
    energy, forces, virial, extras = pes.compute_structure(np.eye(3) * 50 / units.Bohr, pos / units.Bohr)
    ref = committee.predict(atoms.numbers, pos)
    assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-12)
    assert np.allclose(forces, ref.forces * units.Bohr / units.Hartree, rtol=1e-12, atol=0)
    assert np.array_equal(virial, np.zeros((3, 3)))
    x = json.loads(extras)
    assert set(x) == {"dipole", "dipole_members", "energy_std_per_atom", "max_force_std", "dipole_std", "uncertain",
                      "exploded"}
    assert "uncertainty" not in x  # reserved by i-PI's committee force field
    assert np.allclose(x["dipole"], ref.dipole / units.Bohr)                       # e·Bohr
    assert np.allclose(x["dipole_members"], ref.member_dipoles / units.Bohr)       # n_members x 3, e·Bohr
    assert np.array(x["dipole_members"]).shape == (2, 3)
    assert x["energy_std_per_atom"] == pytest.approx(ref.energy_std_per_atom / units.Hartree)
    assert x["max_force_std"] == pytest.approx(ref.max_force_std * units.Bohr / units.Hartree)
    assert x["dipole_std"] == pytest.approx(ref.dipole_std / units.Bohr)
    assert x["uncertain"] is False and x["exploded"] is False   # no threshold: nothing flagged
    assert not (tmp_path / "f.extxyz").exists()


def test_forces_are_minus_the_energy_gradient_in_atomic_units(models):
    src = cluster("pyroxene_N01_GM.xyz")
    atoms = read(src)
    pes = NanosilDriver(models=str(models), structure=str(src), dtype="float64")
    cell = np.eye(3) * 100
    q = atoms.positions / units.Bohr
    _, forces, _, _ = pes.compute_structure(cell, q)
    h = 1e-4  # Bohr
    for i, a in [(0, 0), (1, 2), (4, 1)]:
        qp, qm = q.copy(), q.copy()
        qp[i, a] += h
        qm[i, a] -= h
        fd = -(pes.compute_structure(cell, qp)[0] - pes.compute_structure(cell, qm)[0]) / (2 * h)
        assert forces[i, a] == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("offset", [0, 150])
def test_dipole_every_k_steps_computes_only_those_and_carries_the_last(models, offset):
    """dipole_every=4: the dipole model runs on MD steps 0, 4, 8 ... only (plus the first request of a run
    restarted between two of them); the other replies carry the last computed dipole and members, while
    energies and forces are computed every step. step_offset: the MD step of the first request."""
    src = cluster("pyroxene_N02_GM.xyz")
    atoms = read(src)
    committee = load_committee(models)
    asked = []

    def predict(positions, dipoles=True):
        asked.append(dipoles)
        return committee.predict(atoms.numbers, positions, dipoles=dipoles)

    from driver.flagging import FlagConfig, Flagger

    pes = NanosilDriver.from_predictor(predict, atoms.numbers, Flagger(FlagConfig(), atoms.numbers, "t"), str(src),
                                       dipole_every=4, step_offset=offset)
    rng = np.random.default_rng(3)
    replies, frames = [], []
    for _ in range(10):
        pos = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
        frames.append(pos)
        energy, forces, _, extras = pes.compute_structure(np.eye(3) * 50 / units.Bohr, pos / units.Bohr)
        replies.append((energy, forces, json.loads(extras)))
    steps = list(range(offset, offset + 10))
    due = [s % 4 == 0 or s == offset for s in steps]   # offset 150: the first request has no dipole to carry
    assert asked == due and pes.step == offset + 10 and pes.requests == 10
    last = None
    for step, pos, is_due, (energy, forces, x) in zip(steps, frames, due, replies):
        ref = committee.predict(atoms.numbers, pos)
        assert energy == pytest.approx(ref.energy / units.Hartree, rel=1e-12)      # forces: every step
        assert np.allclose(forces, ref.forces * units.Bohr / units.Hartree, rtol=1e-12, atol=0)
        if is_due:
            last = ref
        assert np.allclose(x["dipole"], last.dipole / units.Bohr, rtol=1e-12, atol=0), step
        assert np.allclose(x["dipole_members"], last.member_dipoles / units.Bohr, rtol=1e-12, atol=0), step
        assert x["dipole_std"] == pytest.approx(last.dipole_std / units.Bohr, rel=1e-12)
        if not is_due:  # a carried dipole is not this step's: the geometries differ
            assert not np.allclose(x["dipole"], ref.dipole / units.Bohr, rtol=1e-3, atol=0)


def test_atom_count_is_checked_on_every_request(models):
    src = cluster("pyroxene_N02_GM.xyz")
    pes = NanosilDriver(models=str(models), structure=str(src))
    with pytest.raises(AtomCountMismatch, match="i-PI sent 5 atoms but .*pyroxene_N02_GM.xyz has 10"):
        pes.compute_structure(np.eye(3), np.zeros((5, 3)))


def test_uncertain_frames_flagged_in_extras_and_written_without_endpoint(models, tmp_path):
    src = cluster("pyroxene_N01_GM.xyz")
    atoms = read(src)
    flags = tmp_path / "flags.extxyz"
    pes = NanosilDriver(models=str(models), structure=str(src), energy_threshold=1e-9, flag_file=str(flags),
                        run_id="pes-test")
    for step in range(3):
        extras = json.loads(pes.compute_structure(np.eye(3), atoms.positions / units.Bohr * (1 + 0.01 * step))[3])
        assert extras["uncertain"] is True
    frames = read(flags, ":")
    assert [f.info["step"] for f in frames] == [0, 1, 2]
    assert np.allclose(frames[2].positions, atoms.positions * 1.02)
    assert frames[0].info["model_version"] == load_committee(models).version
    assert frames[0].info["run_id"] == "pes-test"


def test_pes_refuses_species_the_model_does_not_know(models, tmp_path):
    atoms = read(cluster("pyroxene_N01_GM.xyz"))
    atoms[0].symbol = "Fe"
    atoms.write(tmp_path / "fe.xyz")
    with pytest.raises(ValueError, match="element Fe in .*fe.xyz is not supported"):
        NanosilDriver(models=str(models), structure=str(tmp_path / "fe.xyz"))


@pytest.mark.parametrize("k,j,ranks", [(3, 1, 2), (3, 2, 2), (3, 1, 3), (2, 0, 4), (8, 3, 5), (1, 1, 1)])
def test_split_members_covers_every_member_once_in_order(k, j, ranks):
    shares = split_members(k, j, ranks)
    assert len(shares) == ranks
    assert [i for e, _ in shares for i in e] == list(range(k))
    assert [i for _, d in shares for i in d] == list(range(j))
    sizes = [len(e) + len(d) for e, d in shares]
    assert max(sizes) - min(sizes) <= 1


MPI_SCRIPT = r"""
import json, sys
import numpy as np
from ase.io import read
from driver.models.committee import load_committee
from driver.ipi.mpi_committee import MPICommittee
models, structure = sys.argv[1:3]
committee = load_committee(models)
atoms = read(structure)
mpi = MPICommittee(committee, atoms.numbers)
if not mpi.is_leader:
    mpi.serve()
    sys.exit(0)
rng = np.random.default_rng(0)
worst = {"energy": 0.0, "forces": 0.0, "dipole": 0.0, "e_std": 0.0, "f_std": 0.0, "mu_std": 0.0}
for k in range(4):
    pos = atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape)
    if k % 2:  # a step without the dipole members (--dipole-every): same energies and forces, no dipole
        a, b = mpi.predict(pos, dipoles=False), committee.predict(atoms.numbers, pos)
        assert a.dipole is None and a.dipole_std is None and a.member_dipoles.shape == (0, 3)
        worst["energy"] = max(worst["energy"], abs(a.energy - b.energy))
        worst["forces"] = max(worst["forces"], float(np.abs(a.forces - b.forces).max()))
        continue
    a, b = mpi.predict(pos), committee.predict(atoms.numbers, pos)
    worst["energy"] = max(worst["energy"], abs(a.energy - b.energy))
    worst["forces"] = max(worst["forces"], float(np.abs(a.forces - b.forces).max()))
    worst["dipole"] = max(worst["dipole"], float(np.abs(a.dipole - b.dipole).max()))
    worst["e_std"] = max(worst["e_std"], abs(a.energy_std_per_atom - b.energy_std_per_atom))
    worst["f_std"] = max(worst["f_std"], abs(a.max_force_std - b.max_force_std))
    worst["mu_std"] = max(worst["mu_std"], abs(a.dipole_std - b.dipole_std))
mpi.stop()
print("RESULT " + json.dumps({"size": mpi.size, "shares": mpi.shares, **worst}))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi_committee_equals_the_single_process_committee(models, tmp_path, ranks):
    """Members spread over real MPI ranks (3 ranks: one holds only dipole members) give the same
    prediction as one process."""
    script = tmp_path / "mpi_check.py"
    script.write_text(MPI_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    run = subprocess.run([str(BIN / "mpirun"), "-n", str(ranks), str(BIN / "python"), str(script), str(models),
                          str(cluster("pyroxene_N02_GM.xyz"))], capture_output=True, text=True, timeout=150, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert result["size"] == ranks
    if ranks == 3:
        assert result["shares"][2] == [[], [0, 1]]  # the last rank holds only dipole members
    assert result["energy"] < 1e-4          # eV, float32 members batched differently
    assert result["forces"] < 1e-4          # eV/Å
    assert result["dipole"] < 1e-5          # e·Å
    assert max(result["e_std"], result["f_std"], result["mu_std"]) < 1e-4
