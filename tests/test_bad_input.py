"""Bad input through the real command lines (issue 13, "Bad input"): every case ends in one line on stderr
naming the file and the problem, exit code 2, no traceback, nothing lost. Small real data: an untrained
committee (conftest), real xTB labels, a reference cluster, and a minimal i-PI server for the socket cases.
Also: a SIGKILL while `nanosil label` writes leaves no lock behind (the rerun resumes, every frame labelled
once), and a SIGTERM leaves no worker or resource tracker behind."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import read, write

from conftest import BIN, CHILD_ENV, cluster, stop, untrained_committee

P1 = "pyroxene_N01_GM.xyz"   # MgSiO3, 5 atoms: xTB labels in ~0.1 s
XTB = "xtb:GFN2-xTB"
TAG = "NANOSIL_TEST_BAD_INPUT"


# ---------------------------------------------------------------------- helpers
def run(tool: str, *args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True,
                          env=env or CHILD_ENV, timeout=timeout)


def nanosil(*args, **kw) -> subprocess.CompletedProcess:
    return run("nanosil", *args, **kw)


def one_line_error(proc: subprocess.CompletedProcess, *words: str, code: int = 2) -> str:
    """The exit code is ``code``, stderr is one line without a traceback, and it holds ``words``."""
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-1000:], err[-2000:])
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    return err


def error_lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if "error" in line]


def displaced(atoms: Atoms, n: int, seed: int = 0, scale: float = 0.05) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        a = atoms.copy()
        a.positions += rng.normal(0.0, scale, a.positions.shape)
        frames.append(a)
    return frames


def tagged(token: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``TAG=token``: the command and its children."""
    pids, needle = [], f"{TAG}={token}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            pids.append(int(proc.name))
    return pids


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def row_count(db: Path) -> int:
    try:
        con = sqlite3.connect(str(db), timeout=0.2)
        try:
            return con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def end_tagged(token: str) -> None:
    """Safety net: SIGKILL whatever a failed test left behind (only processes this test started)."""
    for pid in tagged(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# ---------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def p1_path() -> Path:
    return cluster(P1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return untrained_committee(tmp_path_factory.mktemp("bad_input") / "models")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, p1_path) -> Path:
    """Four P1 structures with real xTB labels."""
    from al_manager.reference.labelling import label_structures

    db = tmp_path_factory.mktemp("labelled") / "test.db"
    frames = [read(str(p1_path))] + displaced(read(str(p1_path)), 3, seed=1)
    report = label_structures(frames, "xtb", db, executor="serial", progress=False, metadata={"origin": "test"})
    assert report.n_labelled == 4
    return db


def damaged(models: Path, folder: Path, kind: str) -> Path:
    import shutil

    shutil.copytree(models, folder)
    meta = folder / "committee.json"
    if kind == "truncated energy.pt":
        data = (folder / "energy.pt").read_bytes()
        (folder / "energy.pt").write_bytes(data[: len(data) // 2])
    elif kind == "truncated dipole.pt":
        data = (folder / "dipole.pt").read_bytes()
        (folder / "dipole.pt").write_bytes(data[:100])
    elif kind == "foreign energy.pt":
        (folder / "energy.pt").write_bytes(b"not a checkpoint\n")
    elif kind == "truncated committee.json":
        meta.write_text(meta.read_text()[:300])
    elif kind == "committee.json missing keys":
        data = json.loads(meta.read_text())
        del data["n_energy_members"], data["energy_shift_eV"]
        meta.write_text(json.dumps(data))
    else:
        raise AssertionError(kind)
    return folder


DAMAGE = {  # kind -> (file named in the message, words of the message)
    "truncated energy.pt": ("energy.pt", "truncated"),
    "truncated dipole.pt": ("dipole.pt", "truncated"),
    "foreign energy.pt": ("energy.pt", "not a nanosil checkpoint"),
    "truncated committee.json": ("committee.json", "truncated"),
    "committee.json missing keys": ("committee.json", "missing key(s) n_energy_members, energy_shift_eV"),
}


# ---------------------------------------------------------------------- 1. damaged committee folders
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_committee_in_evaluate(models, labelled, tmp_path, kind):
    folder = damaged(models, tmp_path / "m", kind)
    name, words = DAMAGE[kind]
    proc = nanosil("evaluate", "--db", labelled, "--models", folder)
    one_line_error(proc, f"{folder / name}", words)
    assert proc.stdout == ""


def test_damaged_committee_in_train_warm_start_driver_and_batch_driver(models, labelled, tmp_path, p1_path):
    folder = damaged(models, tmp_path / "m", "truncated energy.pt")
    out = tmp_path / "out"
    proc = nanosil("train", "--db", labelled, "--out", out, "--warm-start", folder, "--epochs", "1")
    one_line_error(proc, f"{folder / 'energy.pt'}", "truncated")
    assert not out.exists()
    proc = run("nanosil-driver", "--models", folder, "--structure", p1_path, "--unix", "nanosil_never")
    one_line_error(proc, "nanosil-driver: error:", f"{folder / 'energy.pt'}", "truncated")
    proc = run("nanosil-batch-driver", "--models", folder, "--target", f"never={p1_path}")
    one_line_error(proc, "nanosil-batch-driver: error:", f"{folder / 'energy.pt'}", "truncated")
    bad_json = damaged(models, tmp_path / "j", "truncated committee.json")
    proc = run("nanosil-driver", "--models", bad_json, "--structure", p1_path, "--unix", "nanosil_never")
    one_line_error(proc, f"{bad_json / 'committee.json'}", "truncated")


# ---------------------------------------------------------------------- 2. --db that is not a database
def test_db_that_is_not_sqlite(models, tmp_path, p1_path):
    text = tmp_path / "notes.db"
    text.write_text("these are my notes, not a database\n")
    proc = nanosil("evaluate", "--db", text, "--models", models)
    one_line_error(proc, str(text), "not an SQLite database")
    proc = nanosil("train", "--db", text, "--out", tmp_path / "out", "--epochs", "1")
    one_line_error(proc, str(text), "not an SQLite database")
    proc = nanosil("label", p1_path, "--db", text, "--executor", "serial", "--no-progress")
    one_line_error(proc, str(text), "not an SQLite database")
    assert text.read_text() == "these are my notes, not a database\n"  # untouched
    folder = tmp_path / "folder.db"
    folder.mkdir()
    proc = nanosil("train", "--db", folder, "--out", tmp_path / "out", "--epochs", "1")
    one_line_error(proc, str(folder), "is a folder")
    proc = nanosil("label", p1_path, "--db", folder, "--executor", "serial", "--no-progress")
    one_line_error(proc, str(folder), "is a folder")
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = nanosil("evaluate", "--db", empty, "--models", models)
    one_line_error(proc, str(empty), "empty")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 3. numbers out of range
@pytest.mark.parametrize("option,value,words", [
    ("--epochs", "-5", "must be >= 1, got -5"),
    ("--epochs", "0", "must be >= 1, got 0"),
    ("--batch-size", "0", "must be >= 1, got 0"),
    ("--lr", "-0.001", "must be > 0, got -0.001"),
    ("--lr", "nan", "must be > 0, got nan"),
    ("--committee", "0", "must be between 1 and 8, got 0"),
    ("--committee", "12", "must be between 1 and 8, got 12"),
])
def test_train_refuses_bad_numbers_before_any_work(labelled, tmp_path, option, value, words):
    out = tmp_path / "out"
    proc = nanosil("train", "--db", labelled, "--out", out, option, value, timeout=60)
    one_line_error(proc, "nanosil train: error:", f"argument {option}", words)
    assert not out.exists()


# ---------------------------------------------------------------------- 4. nothing to evaluate
def test_evaluate_on_empty_or_foreign_database(models, tmp_path):
    from al_manager.reference.labelling import label_structures
    from driver.data import connect

    empty = tmp_path / "empty.db"
    db = connect(empty)
    db.write(Atoms("H"))
    db.delete([1])
    proc = nanosil("evaluate", "--db", empty, "--models", models)
    err = one_line_error(proc, str(empty), "no labelled structures")
    assert proc.stdout == "" and not re.search(r"\bnan\b", err.lower())
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    foreign = tmp_path / "water.db"
    assert label_structures([water], "xtb", foreign, executor="serial", progress=False).n_labelled == 1
    proc = nanosil("evaluate", "--db", foreign, "--models", models)
    one_line_error(proc, str(foreign), "element H", "not supported by this model")


# ---------------------------------------------------------------------- 5. test data seen in training
def test_evaluate_warns_when_test_structures_were_trained_on(labelled, tmp_path, models):
    from driver.data import read_frames, structure_hash
    from driver.models.committee import load_committee, save_committee

    committee = load_committee(models)
    frames = read_frames(labelled)
    committee.metadata = {"structure_hashes": [structure_hash(f.numbers, f.positions) for f in frames[:2]]}
    seen = save_committee(committee, tmp_path / "seen")
    proc = nanosil("evaluate", "--db", labelled, "--models", seen)
    assert proc.returncode == 0, proc.stderr
    err = one_line_error(proc, "warning", "2 of 4 structures", str(labelled), "training data", code=0)
    assert "error:" not in err
    assert "test MAE" in proc.stdout
    proc = nanosil("evaluate", "--db", labelled, "--models", models)  # records no hashes: no warning
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# ---------------------------------------------------------------------- 6. NaN positions from i-PI
class FakeIPI:
    """The server side of the i-PI socket protocol, enough to send chosen positions (Bohr)."""

    def __init__(self):
        self.name = f"nbi_{uuid.uuid4().hex[:10]}"
        self.path = f"/tmp/ipi_{self.name}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(1)
        self.sock.settimeout(90)
        self.answered = 0

    @staticmethod
    def _header(text: str) -> bytes:
        return text.upper().ljust(12).encode()

    @staticmethod
    def _recv(conn, n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            try:
                chunk = conn.recv(n - len(buf))
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            buf += chunk
        return buf

    def serve(self, frames: list[np.ndarray]) -> str:
        """Send each frame; returns "exit" after all were answered, or "closed at request k"."""
        conn, _ = self.sock.accept()
        conn.settimeout(90)
        try:
            h = self._header
            conn.sendall(h("status"))
            assert self._recv(conn, 12) == h("needinit")
            init = b"nanosil test"
            conn.sendall(h("init") + struct.pack("ii", 0, len(init)) + init)
            for k, pos in enumerate(frames):
                try:
                    conn.sendall(h("status"))
                    if self._recv(conn, 12) != h("ready"):
                        return f"closed at request {k}"
                    cell = np.eye(3) * 100.0
                    conn.sendall(h("posdata") + cell.tobytes() + np.linalg.inv(cell).tobytes()
                                 + struct.pack("i", len(pos)) + np.ascontiguousarray(pos, np.float64).tobytes())
                    conn.sendall(h("status"))
                    if self._recv(conn, 12) != h("havedata"):
                        return f"closed at request {k}"
                    conn.sendall(h("getforce"))
                except (BrokenPipeError, ConnectionResetError):
                    return f"closed at request {k}"
                head = self._recv(conn, 12 + 8 + 4)
                if head is None:
                    return f"closed at request {k}"
                natoms = struct.unpack("i", head[20:24])[0]
                rest = self._recv(conn, 24 * natoms + 72 + 4)
                extras = self._recv(conn, struct.unpack("i", rest[-4:])[0]) if rest else None
                if extras is None:
                    return f"closed at request {k}"
                self.answered += 1
            conn.sendall(h("exit"))
            return "exit"
        finally:
            conn.close()

    def close(self):
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


@pytest.fixture
def fake_ipi():
    server = FakeIPI()
    yield server
    server.close()


def _nan_frames(p1_path) -> list[np.ndarray]:
    good = read(str(p1_path)).positions / units.Bohr
    bad = good.copy()
    bad[2, 1] = np.nan
    return [good, bad]


def test_nan_positions_from_ipi_stop_the_driver(models, p1_path, fake_ipi):
    proc = subprocess.Popen([str(BIN / "nanosil-driver"), "--models", str(models), "--structure", str(p1_path),
                             "--unix", fake_ipi.name, "--connect-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        outcome = fake_ipi.serve(_nan_frames(p1_path))
        _, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert outcome == "closed at request 1" and fake_ipi.answered == 1, (outcome, err)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "replicas" not in err, err
    errors = error_lines(err)
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert "i-PI sent non-finite positions (NaN/inf) at step 1" in errors[0] and str(p1_path) in errors[0]


def test_nan_positions_from_ipi_end_that_trajectory_in_the_batch_driver(models, p1_path, fake_ipi):
    proc = subprocess.Popen([str(BIN / "nanosil-batch-driver"), "--models", str(models),
                             "--target", f"{fake_ipi.name}={p1_path}", "--connect-timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        outcome = fake_ipi.serve(_nan_frames(p1_path))
        out, err = proc.communicate(timeout=60)
    finally:
        stop(proc)
    assert outcome == "closed at request 1", (outcome, err)
    assert "Traceback" not in err and "replicas" not in err, err
    errors = error_lines(err)
    assert len(errors) == 1 and "non-finite positions (NaN/inf) at step 1" in errors[0], err
    assert str(p1_path) in errors[0]
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    failed = [e for e in events if e["event"] == "error"]
    assert len(failed) == 1 and failed[0]["id"] == fake_ipi.name and "non-finite" in failed[0]["message"]


# ---------------------------------------------------------------------- 7. malformed xyz files
def _bad_xyz(p1_path: Path, folder: Path) -> dict[str, tuple[Path, list[str]]]:
    lines = p1_path.read_text().splitlines()
    truncated = folder / "truncated_line.xyz"          # the last atom line lost its z coordinate
    truncated.write_text("\n".join(lines[:-1] + [" ".join(lines[-1].split()[:3])]) + "\n")
    short = folder / "short_count.xyz"                 # says 4 atoms, lists 5
    short.write_text("\n".join(["4"] + lines[1:]) + "\n")
    missing = folder / "missing_atoms.xyz"             # two frames, the second cut after 2 atoms
    missing.write_text("\n".join(lines + lines[:4]) + "\n")
    ipi = folder / "ipi_truncated.xyz"                 # an i-PI xyz (i-PI's reader would accept it)
    ipi.write_text("\n".join(["5", "# CELL(abcABC): 20 20 20 90 90 90 Step: 0 positions{angstrom} "
                              "cell{angstrom}"] + lines[2:5]) + "\n")
    return {
        "truncated": (truncated, ["line 7", "frame 0", "atom 5 of 5", "truncated"]),
        "short": (short, ["line 7", "atom count of frame 1", "does the atom count of frame 0"]),
        "missing": (missing, ["frame 1 declares 5 atoms on line 8", "after 2 atom line(s)"]),
        "ipi": (ipi, ["frame 0 declares 5 atoms on line 1", "after 3 atom line(s)"]),
    }


def test_malformed_xyz_is_named_with_its_line(p1_path, models, tmp_path):
    cases = _bad_xyz(p1_path, tmp_path)
    db = tmp_path / "data.db"
    for key in ("truncated", "short", "missing"):
        path, words = cases[key]
        err = one_line_error(nanosil("label", path, "--db", db, "--no-progress"), str(path), *words)
        assert "could not assign" not in err and "Expected xyz header" not in err
    assert not db.exists()  # refused before the dataset was opened
    path, words = cases["truncated"]
    one_line_error(nanosil("harmonic", path, "--out", tmp_path / "harm"), str(path), *words)
    assert not (tmp_path / "harm").exists()
    for key in ("short", "ipi"):  # read_cluster: the driver's --structure
        path, words = cases[key]
        proc = run("nanosil-driver", "--models", models, "--structure", path, "--unix", "nanosil_never")
        one_line_error(proc, "nanosil-driver: error:", str(path), *words)


# ---------------------------------------------------------------------- 8. SIGKILL during a write
def test_sigkill_during_a_database_write_then_resume(p1_path, tmp_path):
    """The labeller is killed while it waits inside a database write (this test holds SQLite's write lock,
    as a concurrent writer would): no lock file is left, no worker survives, and the rerun resumes at once
    with every frame labelled exactly once."""
    from driver.data import structure_hash

    frames = displaced(read(str(p1_path)), 40, seed=2)
    xyz = tmp_path / "in.xyz"
    write(str(xyz), frames, format="extxyz")
    db = tmp_path / "data.db"
    token = uuid.uuid4().hex
    env = dict(CHILD_ENV, **{TAG: token})
    cmd = [str(BIN / "nanosil"), "label", str(xyz), "--db", str(db), "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_until(lambda: row_count(db) >= 2, 90), proc.communicate(timeout=5)
        con = sqlite3.connect(str(db), timeout=30, isolation_level=None)
        con.execute("BEGIN IMMEDIATE")            # the labeller's next write now waits inside ase.db
        written = con.execute("SELECT COUNT(*) FROM systems").fetchone()[0]
        time.sleep(2.0)                            # ~20 xTB frames' time: it is blocked in that write
        assert proc.poll() is None
        proc.kill()
        proc.wait(timeout=30)
        con.execute("ROLLBACK")
        con.close()
        assert not Path(f"{db}.lock").exists()
        assert wait_until(lambda: not tagged(token), 10), "a worker or resource tracker outlived the SIGKILL"
        start = time.monotonic()
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    finally:
        stop(proc)
        end_tagged(token)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{40 - written} labelled, {written} skipped" in again.stdout, again.stdout
    assert time.monotonic() - start < 100
    con = sqlite3.connect(str(db))
    rows = con.execute("SELECT key_value_pairs FROM systems").fetchall()
    con.close()
    hashes = [json.loads(kv)["hash"] for (kv,) in rows]
    assert len(hashes) == 40 and len(set(hashes)) == 40  # none lost, none twice
    assert set(hashes) == {structure_hash(a.numbers, a.positions, XTB) for a in frames}


# ---------------------------------------------------------------------- 9. SIGTERM leaves no processes
def test_sigterm_ends_the_pool_worker_and_the_resource_tracker(p1_path, tmp_path):
    frames = displaced(read(str(p1_path)), 60, seed=3)
    xyz = tmp_path / "in.xyz"
    write(str(xyz), frames, format="extxyz")
    db = tmp_path / "data.db"
    token = uuid.uuid4().hex
    env = dict(CHILD_ENV, **{TAG: token})
    proc = subprocess.Popen([str(BIN / "nanosil"), "label", str(xyz), "--db", str(db), "--workers", "1",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert wait_until(lambda: row_count(db) >= 1, 90), proc.communicate(timeout=5)
        family = tagged(token)
        assert len(family) >= 3, family  # the labeller, its pool worker and multiprocessing's resource tracker
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        gone = wait_until(lambda: not tagged(token), 10)
    finally:
        stop(proc)
        end_tagged(token)
    assert gone, "a worker or the resource tracker outlived the labeller"
    one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), "stopped by SIGTERM",
                   str(db), "run the same command to resume", code=128 + signal.SIGTERM)
    n = row_count(db)
    assert 1 <= n < 60  # what was written is kept
    con = sqlite3.connect(str(db))
    hashes = [json.loads(kv)["hash"] for (kv,) in con.execute("SELECT key_value_pairs FROM systems")]
    con.close()
    assert len(set(hashes)) == n
