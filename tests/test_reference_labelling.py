"""Parallel labelling into the dataset: failures recorded while the batch goes on, no structure computed
twice, bad input refused before any calculation, metadata passed through; and ``nanosil label`` /
``nanosil harmonic`` end to end with xTB."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write

from al_manager.reference.labelling import LabelReport, failed_atoms, label_structures, read_failures
from driver.data import connect, read_frames, structure_hash

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STRUCTURES = SHARED / "structures"


@pytest.fixture(scope="module")
def clusters():
    if not STRUCTURES.exists():
        pytest.skip(f"shared structures not found: {STRUCTURES}")
    p1 = read(str(STRUCTURES / "pyroxene_N01_GM.xyz"))
    o1 = read(str(STRUCTURES / "olivine_N01_GM.xyz"))
    broken = p1.copy()  # Mg pulled 10 Å away: tblite's SCF does not converge (a real backend failure)
    away = broken.positions[0] - broken.positions.mean(axis=0)
    broken.positions[0] += 10.0 * away / np.linalg.norm(away)
    return p1, o1, broken


def test_failing_worker_is_recorded_and_the_others_are_kept(clusters, tmp_path):
    p1, o1, broken = clusters
    db_path = tmp_path / "data.db"
    report = label_structures([p1, broken, o1], "xtb", db_path, workers=2, executor="process", progress=False,
                              metadata={"origin": "test_batch"})
    assert isinstance(report, LabelReport)
    assert (report.n_labelled, report.n_skipped, report.n_failed) == (2, 0, 1)
    assert report.failures[0].index == 1 and report.failures[0].frame == "frame 1"
    assert "SCF not converged" in report.failures[0].reason
    frames = read_frames(db_path)
    assert sorted(len(f.numbers) for f in frames) == [5, 7]
    failures = read_failures(db_path)
    assert len(failures) == 1
    assert failures[0]["hash"] == structure_hash(broken.numbers, broken.positions, "xtb:GFN2-xTB")
    assert failures[0]["metadata"] == {"origin": "test_batch"}
    back = failed_atoms(db_path)[0]
    np.testing.assert_allclose(back.positions, broken.positions, atol=1e-7)
    # the labels in the database are what the backend computes
    from al_manager.reference import get_backend

    row = next(connect(db_path).select(natoms=5))
    direct = get_backend("xtb").label(p1)
    assert row.energy == pytest.approx(direct.energy, abs=1e-6)
    np.testing.assert_allclose(row.forces, direct.forces, atol=1e-6)
    np.testing.assert_allclose(row.dipole, direct.dipole, atol=1e-6)
    # a second pass computes nothing: labelled ones are known, the failed one is skipped unless asked
    again = label_structures([p1, broken, o1], "xtb", db_path, executor="serial", progress=False)
    assert (again.n_labelled, again.n_skipped, again.n_failed) == (0, 3, 0)
    retry = label_structures([broken], "xtb", db_path, executor="serial", progress=False, retry_failed=True)
    assert retry.n_failed == 1 and len(read_failures(db_path)) == 2


def test_duplicates_are_not_computed_twice(clusters, tmp_path):
    p1, o1, _ = clusters
    db_path = tmp_path / "dup.db"
    same = p1.copy()
    same.positions += 1e-8  # below the hash rounding (1e-6 Å): the same structure
    moved = p1.copy()
    moved.positions[0, 0] += 1e-3  # a different structure
    report = label_structures([p1, same, o1, p1, moved], "xtb", db_path, executor="serial", progress=False)
    assert (report.n_labelled, report.n_skipped, report.n_failed) == (3, 2, 0)
    assert sorted(report.rows) == [0, 2, 4]
    assert len(connect(db_path)) == 3
    hashes = [row.hash for row in connect(db_path).select()]
    assert len(set(hashes)) == 3
    report = label_structures([o1, moved], "xtb", db_path, executor="serial", progress=False)
    assert (report.n_labelled, report.n_skipped) == (0, 2)
    assert len(connect(db_path)) == 3


def test_bad_input_refused_before_any_calculation(clusters, tmp_path):
    p1, o1, _ = clusters
    db_path = tmp_path / "bad.db"
    close = o1.copy()
    close.positions[2] = close.positions[1] + [0.0, 0.2, 0.0]
    with pytest.raises(ValueError, match=r"in.xyz frame 1: atoms 1 \(\w+\) and 2 \(\w+\) are 0.200 Å apart.*"
                                         r"nothing was computed"):
        label_structures([p1, close], "xtb", db_path, executor="serial", source="in.xyz", progress=False)
    odd = p1 + Atoms("H", positions=[[0, 0, 5.0]])
    with pytest.raises(ValueError, match="frame 2: odd number of electrons"):
        label_structures([p1, o1, odd], "xtb", db_path, executor="serial", progress=False)
    ceria = Atoms("CeO2", positions=[[0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]])  # no def2-SVP for Ce in PySCF
    with pytest.raises(ValueError, match="frame 1: element Ce is not available for pyscf:PBE0/def2-SVP"):
        label_structures([p1, ceria], "pyscf", db_path, executor="serial")
    with pytest.raises(ValueError, match="metadata has 1 entries for 2 structures"):
        label_structures([p1, o1], "xtb", db_path, metadata=[{}], executor="serial")
    with pytest.raises(ValueError, match="backend 'xtb': .*'basis'.*its options are: charge"):
        label_structures([p1], "xtb", db_path, backend_options={"basis": "sto-3g"}, executor="serial")
    assert not db_path.exists()  # refused before the dataset was even opened


def test_metadata_passes_through(clusters, tmp_path):
    p1, o1, _ = clusters
    db_path = tmp_path / "meta.db"
    o1 = o1.copy()
    o1.info.update(cluster="O1", origin="from_info")
    meta = [{"cluster": "P1", "origin": "al_iter_001", "temperature": 400}, {"temperature": 800.0}]
    report = label_structures([p1, o1], "xtb", db_path, metadata=meta, executor="serial", progress=False)
    rows = {row.natoms: row for row in connect(db_path).select()}
    assert report.n_labelled == 2
    assert (rows[5].cluster, rows[5].origin, rows[5].temperature, rows[5].method) == \
        ("P1", "al_iter_001", 400.0, "xtb:GFN2-xTB")
    assert (rows[7].cluster, rows[7].origin, rows[7].temperature) == ("O1", "from_info", 800.0)


def _nanosil(*args, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "al_manager.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_nanosil_label_end_to_end(clusters, tmp_path):
    p1, o1, _ = clusters
    xyz = tmp_path / "small.xyz"
    write(str(xyz), [p1, o1, p1], format="extxyz")
    db_path = tmp_path / "out" / "data.db"
    proc = _nanosil("label", xyz, "--backend", "xtb", "--db", db_path, "--workers", "2", "--cluster", "mix",
                    "--origin", "demo", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "2 labelled, 1 skipped" in proc.stdout
    rows = list(connect(db_path).select())
    assert sorted(r.natoms for r in rows) == [5, 7]
    assert {(r.cluster, r.origin, r.method) for r in rows} == {("mix", "demo", "xtb:GFN2-xTB")}
    # bad input: one line naming the file and frame, exit code 2
    close = p1.copy()
    close.positions[1] = close.positions[0] + [0.4, 0, 0]
    bad = tmp_path / "bad.xyz"
    write(str(bad), [p1, close], format="extxyz")
    proc = _nanosil("label", bad, "--backend", "xtb", "--db", db_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"{bad} frame 1" in proc.stderr and "0.400 Å apart" in proc.stderr
    proc = _nanosil("label", tmp_path / "missing.xyz", "--db", db_path)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_nanosil_harmonic_writes_csv_and_png(clusters, tmp_path):
    p1, _, _ = clusters
    xyz = tmp_path / "p1.xyz"
    write(str(xyz), p1, format="extxyz")
    out = tmp_path / "harm"
    proc = _nanosil("harmonic", xyz, "--backend", "xtb", "--out", out, "--relax")
    assert proc.returncode == 0, proc.stderr
    table = np.loadtxt(out / "harmonic.csv", delimiter=",", skiprows=1)
    assert table.shape == (15, 4)
    assert np.all(table[6:, 1] > 100) and np.all(table[:, 2] >= 0)
    assert table[:, 3].tolist() == [0] * 6 + [1] * 9  # rigid-body modes flagged, left out of the spectrum
    spectrum = np.loadtxt(out / "spectrum.csv", delimiter=",", skiprows=1)
    # Gaussians with peak height = intensity: the strongest line shows up at its frequency
    k = int(np.argmax(table[:, 2]))
    j = int(np.argmax(spectrum[:, 1]))
    assert abs(spectrum[j, 0] - table[k, 1]) < 5.0
    assert spectrum[j, 1] == pytest.approx(table[k, 2], rel=0.1)
    assert (out / "spectrum.png").stat().st_size > 10_000
    assert len(read(str(out / "structure.xyz"))) == 5


def test_mpi_pool_executor_with_real_ranks(clusters, tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    if not mpirun.exists():
        pytest.skip("mpirun not found next to the Python interpreter")
    p1, o1, broken = clusters
    write(str(tmp_path / "in.xyz"), [p1, broken, o1], format="extxyz")
    script = tmp_path / "run_mpi.py"
    script.write_text(
        "from ase.io import read\n"
        "from al_manager.reference.labelling import label_structures\n"
        "if __name__ == '__main__':\n"
        f"    r = label_structures(read({str(tmp_path / 'in.xyz')!r}, ':'), 'xtb', {str(tmp_path / 'mpi.db')!r},\n"
        "                         executor='mpi', progress=False)\n"
        "    print('REPORT', r.n_labelled, r.n_skipped, r.n_failed)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{mpirun.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(mpirun), "-n", "3", sys.executable, "-m", "mpi4py.futures", str(script)],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REPORT 2 0 1" in proc.stdout
    assert len(connect(tmp_path / "mpi.db")) == 2 and len(read_failures(tmp_path / "mpi.db")) == 1


def _pool_workers() -> list[int]:
    """PIDs of this process's multiprocessing spawn children (not the resource tracker)."""
    me, pids = os.getpid(), []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat_path.read_text().rsplit(")", 1)[1].split()[1])
            cmd = (stat_path.parent / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == me and b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            pids.append(int(stat_path.parent.name))
    return pids


def test_a_dying_worker_process_is_survived(clusters, tmp_path):
    import signal
    import threading
    import time

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    p1, o1, _ = clusters
    killed = []

    def kill_first_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = _pool_workers()
            db = tmp_path / "kill.db"
            # labelling has begun (a first label is written): the pool is up and work is in flight
            if pids and db.exists() and len(connect(db)) >= 1:
                os.kill(pids[0], signal.SIGKILL)  # our own child, as the OOM killer would
                killed.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=kill_first_worker, daemon=True)
    thread.start()
    # enough work that the kill lands before the last label (xTB takes ~10 ms per frame here)
    frames = [p1, o1]
    for k in range(40):
        frame = o1.copy()
        frame.rattle(0.02, seed=k)
        frames.append(frame)
    report = label_structures(frames, "xtb", tmp_path / "kill.db", workers=1, progress=False)
    thread.join(timeout=5)
    assert killed, "no worker process was seen"
    assert report.pool_restarts == 1
    assert (report.n_labelled, report.n_failed) == (42, 0)  # in-flight work was redone, nothing lost
    assert len(connect(tmp_path / "kill.db")) == 42
