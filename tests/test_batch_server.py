"""driver.ipi.batch_server: one process serving several real i-PI servers with batched committee passes.

Every i-PI uses its own UNIX socket name; processes are ended (by pid) and socket files removed at the end.
"""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.io import read

from driver.geometry_checks import fragments
from driver.ipi.batch_server import Target, partition_by_size
from driver.models.committee import load_committee
from ipi_inputs import render_input
from conftest import BIN, CHILD_ENV, cluster, untrained_committee

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def procs(ipi_children):
    return ipi_children


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """An untrained committee: the server's plumbing and units, not physics."""
    return untrained_committee(tmp_path_factory.mktemp("batch") / "models")


def start_ipi(procs, folder: Path, structure: Path, steps: int, seed: int):
    started, sockets = procs
    name = f"nbs_{uuid.uuid4().hex[:10]}"
    sockets.append(name)
    xml = render_input("production_nvt", folder, socket=f"unix:{name}", structure=structure, temperature=300.0,
                       seed=seed, steps=steps, prefix="md")
    with open(folder / "ipi.log", "w") as log:
        started.append(subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=folder, stdout=log,
                                        stderr=subprocess.STDOUT, env=CHILD_ENV))
    return name, started[-1]


def run_server(procs, models: Path, targets: list[tuple[str, Path]], log_dir: Path, *extra, timeout=300):
    started, _ = procs
    cmd = [sys.executable, "-m", "driver.ipi.batch_server", "--models", str(models), "--log-dir", str(log_dir),
           "--dtype", "float64", "--progress-every", "1000", *extra]
    for name, structure in targets:
        cmd += ["--target", f"{name}={structure}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV, cwd=ROOT)
    started.append(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"batch server did not finish within {timeout} s:\n{err[-3000:]}")
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return proc.returncode, events, err


def test_partition_groups_similar_sizes():
    # one padded call for similar sizes; a 70-atom cluster is not worth padding 5-atom ones to
    assert partition_by_size([10] * 8) == [list(range(8))]
    groups = partition_by_size([5, 70, 7, 10, 65])
    sizes = [[[5, 70, 7, 10, 65][i] for i in g] for g in groups]
    assert sizes == [[5, 7, 10], [65, 70]]
    assert sorted(i for g in groups for i in g) == list(range(5))
    assert partition_by_size([]) == []


def test_fragments_detects_a_cluster_falling_apart():
    pos = np.array([[0, 0, 0], [1.6, 0, 0], [3.2, 0, 0], [20, 0, 0], [21.5, 0, 0]], dtype=float)
    assert fragments(pos, 4.0) == [3, 2]
    assert fragments(pos[:3], 4.0) == [3]


def test_batched_replies_equal_single_predictions(models, procs, tmp_path):
    """Three i-PI servers (5, 7 and 10 atoms) served by one process: every trajectory completes, passes
    hold several structures, and what i-PI recorded (dipole in e·Bohr every step, potential in eV) equals the
    committee's own single-structure prediction at the positions i-PI wrote."""
    names = ["pyroxene_N01_GM.xyz", "olivine_N01_GM.xyz", "pyroxene_N02_GM.xyz"]
    steps, targets, ipis = 40, [], []
    for k, name in enumerate(names):
        folder = tmp_path / f"run{k}"
        sock, proc = start_ipi(procs, folder, cluster(name), steps, seed=k + 1)
        targets.append((sock, cluster(name)))
        ipis.append((folder, proc))
    rc, events, err = run_server(procs, models, targets, tmp_path / "logs")
    assert rc == 0, err
    finished = {e["id"]: e for e in events if e["event"] == "finished"}
    assert set(finished) == {s for s, _ in targets}, events
    assert all(e["requests"] == steps + 1 for e in finished.values())
    served = [line for line in err.splitlines() if "served" in line]
    mean_per_pass = float(served[-1].split("mean ")[1].split(" per pass")[0])
    assert mean_per_pass > 1.5, served  # the trajectories really shared passes

    committee = load_committee(models, dtype=__import__("torch").float64)
    for (folder, proc), (sock, structure) in zip(ipis, targets):
        assert proc.wait(timeout=60) == 0
        numbers = read(structure).numbers
        frames = read(folder / "md.pos_0.xyz", index=":")           # every 20 steps, Å
        dip = [line for line in (folder / "md.dipole_0").read_text().splitlines() if not line.startswith(" #")]
        assert len(dip) == steps + 1
        out = np.loadtxt(folder / "md.out")                          # step, time, conserved, T, kinetic, potential (eV)
        log = np.genfromtxt(tmp_path / "logs" / f"{sock}.uncertainty.csv", delimiter=",", names=True)
        assert list(log["step"]) == list(range(steps + 1))
        for k, atoms in enumerate(frames):
            step = 20 * k
            p = committee.predict(numbers, atoms.positions)
            np.testing.assert_allclose(np.array(dip[step].split(), float), p.dipole / units.Bohr, atol=2e-3)
            assert log["energy_std_per_atom_eV"][step] == pytest.approx(p.energy_std_per_atom, rel=1e-2, abs=1e-5)
            assert log["max_force_std_eV_per_A"][step] == pytest.approx(p.max_force_std, rel=1e-2, abs=1e-4)
            row = out[out[:, 0] == step]
            if len(row):
                assert row[0, 5] == pytest.approx(p.energy, abs=2e-3)


def test_committee_every_k_steps_propagates_on_member_0(models, procs, tmp_path):
    """--committee-every 4: i-PI's potential is member 0's energy at every written step (the propagation
    never switches surfaces), the whole committee runs (and is logged) on steps 0, 4, 8, ... only, and the
    dipole is still the committee's; a trust cap below the disagreement still stops the first step."""
    structure = cluster("olivine_N01_GM.xyz")
    steps, k = 40, 4
    sock, ipi = start_ipi(procs, tmp_path / "run", structure, steps, seed=5)
    rc, events, err = run_server(procs, models, [(sock, structure)], tmp_path / "logs", "--committee-every", str(k))
    assert rc == 0, err
    assert "member 0 with the committee every 4 steps" in err
    assert ipi.wait(timeout=60) == 0
    log = np.genfromtxt(tmp_path / "logs" / f"{sock}.uncertainty.csv", delimiter=",", names=True)
    assert list(log["step"]) == list(range(0, steps + 1, k))

    committee = load_committee(models, dtype=__import__("torch").float64)
    numbers = read(structure).numbers
    frames = read(tmp_path / "run" / "md.pos_0.xyz", index=":")     # every 20 steps
    out = np.loadtxt(tmp_path / "run" / "md.out")
    dip = [line for line in (tmp_path / "run" / "md.dipole_0").read_text().splitlines() if not line.startswith(" #")]
    for j, atoms in enumerate(frames):
        step = 20 * j
        p = committee.predict(numbers, atoms.positions)
        assert abs(p.member_energies[0] - p.energy) > 1e-2   # the members differ: the test can tell them apart
        row = out[out[:, 0] == step]
        if len(row):
            assert row[0, 5] == pytest.approx(p.member_energies[0], abs=2e-3)
        np.testing.assert_allclose(np.array(dip[step].split(), float), p.dipole / units.Bohr, atol=2e-3)
        assert log["max_force_std_eV_per_A"][list(log["step"]).index(step)] == pytest.approx(
            p.max_force_std, rel=1e-2, abs=1e-4)

    sock, ipi = start_ipi(procs, tmp_path / "capped", structure, steps=200, seed=6)
    rc, events, err = run_server(procs, models, [(sock, structure)], tmp_path / "logs2", "--committee-every", str(k),
                                 "--trust-cap", "1e-9")
    assert rc == 0, err
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == 0 and "max force std" in stopped[0]["reason"]
    ipi.wait(timeout=120)


def test_trajectory_leaving_the_trusted_region_is_stopped(models, procs, tmp_path):
    """A cap below the committee's disagreement stops the run at its first step: the server reports it, writes
    the reason next to the log, closes the connection, and i-PI (exit_on_disconnect) ends by itself."""
    structure = cluster("pyroxene_N01_GM.xyz")
    sock, ipi = start_ipi(procs, tmp_path / "run", structure, steps=200, seed=3)
    rc, events, err = run_server(procs, models, [(sock, structure)], tmp_path / "logs", "--trust-cap", "1e-9")
    assert rc == 0, err
    stopped = [e for e in events if e["event"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] == 0 and "max force std" in stopped[0]["reason"]
    record = json.loads((tmp_path / "logs" / f"{sock}.uncertainty.csv.stop.json").read_text())
    assert record["reason"] == stopped[0]["reason"]
    ipi.wait(timeout=120)  # i-PI ends on its own once the driver is gone (raises if it hangs)
    assert "Client shutdown" in (tmp_path / "run" / "ipi.log").read_text()


def test_bad_input_is_one_line(models, tmp_path):
    cmd = [sys.executable, "-m", "driver.ipi.batch_server", "--models", str(models), "--target", "x=/nonexistent.xyz"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "/nonexistent.xyz" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "driver.ipi.batch_server", "--models", str(tmp_path / "none")],
                          capture_output=True, text=True, env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = subprocess.run(cmd[:-2] + ["--control", "-", "--dipole-every", "0"], capture_output=True, text=True,
                          env=CHILD_ENV, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--dipole-every must be at least 1" in proc.stderr
    for bad in ({"dipole_every": 0}, {"dipole_every": "4"}, {"step_offset": -1}):
        with pytest.raises(ValueError, match=f"target {next(iter(bad))} must be an integer"):
            Target.from_dict({"id": "a", "socket": "unix:a", "structure": "x.xyz", **bad})
    assert Target.from_dict({"id": "a", "socket": "unix:a", "structure": "x.xyz", "dipole_every": 4}).dipole_every == 4


def test_predict_batch_runs_the_dipole_model_only_where_asked(models):
    """Per-structure dipole flags (the batched driver's --dipole-every): asked-for dipoles equal the
    single-structure ones, the others are absent; energies and forces do not depend on the flags."""
    committee = load_committee(models, dtype=__import__("torch").float64)
    frames = [read(cluster(n)) for n in ("pyroxene_N01_GM.xyz", "pyroxene_N02_GM.xyz", "olivine_N01_GM.xyz")]
    numbers, positions = [a.numbers for a in frames], [a.positions + 0.03 for a in frames]
    flags = [False, True, False]
    batched = committee.predict_batch(numbers, positions, dipoles=flags)
    for a, z, r, flag in zip(batched, numbers, positions, flags):
        ref = committee.predict(z, r)
        assert a.energy == pytest.approx(ref.energy, abs=1e-9)
        np.testing.assert_allclose(a.forces, ref.forces, atol=1e-9)
        if flag:
            np.testing.assert_allclose(a.member_dipoles, ref.member_dipoles, atol=1e-12)
            assert a.dipole_std == pytest.approx(ref.dipole_std, rel=1e-9)
        else:
            assert a.dipole is None and a.dipole_std is None and a.member_dipoles.shape == (0, 3)
    assert all(p.dipole is None for p in committee.predict_batch(numbers, positions, dipoles=False))
    with pytest.raises(ValueError, match="2 flags for 3 structures"):
        committee.predict_batch(numbers, positions, dipoles=[True, False])
