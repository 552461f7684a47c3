"""`nanosil md`: a real i-PI + nanosil-driver run of P1 with an untrained committee (plumbing and units, not
physics), ending in a spectrum; one-line errors before anything starts; Ctrl-C/SIGTERM/SIGKILL leave no child."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from al_manager.processes import is_running
from conftest import BIN, CHILD_ENV, cluster, untrained_committee
from spectra.spectrum import read_spectrum

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENV = dict(CHILD_ENV, MPLBACKEND="Agg")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return untrained_committee(tmp_path_factory.mktemp("md") / "models")


def nanosil_md(*args, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nanosil"), "md", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=timeout)


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("nanosil md: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.timeout(180)
def test_md_nvt_on_p1_ends_in_a_spectrum(models, tmp_path):
    p1 = cluster("pyroxene_N01_GM.xyz")
    proc = nanosil_md(p1, "--models", models, "-T", 400, "--ps", 0.2, "--equilibration-ps", 0, "--seed", 3,
                      "--out", "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "run"
    for line in ("[1/2] md: NVT 400 steps", "[2/2] spectrum from", f"wrote {Path('run') / 'spectrum.csv'}",
                 f"wrote {Path('run') / 'spectrum.png'}", f"wrote {Path('run') / 'md.json'}"):
        assert line in proc.stdout, proc.stdout
    spectrum = read_spectrum(out / "spectrum.csv")
    assert spectrum.wavenumber[0] == 0 and spectrum.wavenumber[-1] <= 4000
    assert np.all(spectrum.intensity >= 0) and spectrum.intensity.max() > 0  # the default (parzen) window
    assert (out / "spectrum.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "md.json").read_text())
    assert record["settings"]["ensemble"] == "nvt" and record["settings"]["production_steps"] == 400
    assert record["settings"]["n_dipole_members"] == 2 and record["settings"]["seed"] == 3
    assert record["spectrum"]["discard_ps"] == pytest.approx(0.05)        # min(0.5, ps / 4)
    assert record["spectrum"]["frames"] == 401
    assert record["spectrum"]["band_area_km_mol"] == pytest.approx(spectrum.integral(), rel=1e-6)
    [phase] = record["phases"]
    assert phase["steps"] == 400 and phase["steps_per_s"] > 0 and record["timings"]["steps_per_s"] > 0
    assert (out / "md" / "md.dipole_0").is_file() and (out / "md" / "driver.log").is_file()
    # the same folder again: refused unless --overwrite
    again = nanosil_md(p1, "--models", models, "-T", 400, "--ps", 0.2, "--out", "run", cwd=tmp_path)
    assert_one_line_error(again, "already holds a run", "--overwrite")


@pytest.mark.timeout(180)
def test_md_nve_after_nvt_equilibration(models, tmp_path):
    p1 = cluster("pyroxene_N01_GM.xyz")
    proc = nanosil_md(p1, "--models", models, "-T", 300, "--ps", 0.1, "--equilibration-ps", 0.05,
                      "--ensemble", "nve", "--out", tmp_path / "nve", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[1/3] equilibration: NVT 100 steps" in proc.stdout and "[2/3] production: NVE 200 steps" in proc.stdout
    record = json.loads((tmp_path / "nve" / "md.json").read_text())
    assert [(p["name"], p["ensemble"], p["steps"]) for p in record["phases"]] == [
        ("equilibration", "nvt", 100), ("production", "nve", 200)]
    assert record["spectrum"]["frames"] == 201  # the NVE production only
    assert record["outputs"]["dipoles"] == str(tmp_path / "nve" / "production" / "md.dipole_0")
    assert np.all(read_spectrum(tmp_path / "nve" / "spectrum.csv").intensity >= 0)
    assert (tmp_path / "nve" / "spectrum.png").read_bytes()[:8] == PNG_MAGIC


def test_md_bad_input_is_refused_before_anything_starts(models, tmp_path):
    from driver.models.committee import ModelConfig, build_committee, save_committee

    p1 = cluster("pyroxene_N01_GM.xyz")
    no_dipole = save_committee(build_committee(ModelConfig(hidden=(8,)), n_members=2, n_dipole=0, seed=0),
                               tmp_path / "no_dipole")
    proc = nanosil_md(p1, "--models", no_dipole, "-T", 400, "--ps", 0.2, "--out", "x", cwd=tmp_path)
    assert_one_line_error(proc, f"the committee in {no_dipole} has no dipole model: train with", "--dipole-members 1")
    iron = tmp_path / "FeO.xyz"
    iron.write_text("2\n\nFe 0 0 0\nO 1.6 0 0\n")
    assert_one_line_error(nanosil_md(iron, "--models", models, "-T", 400, "--ps", 0.2, "--out", "x", cwd=tmp_path),
                          "element Fe", str(iron), "(its species: Mg, Si, O)")
    assert_one_line_error(nanosil_md(p1, "--models", tmp_path / "none", "-T", 400, "--ps", 0.2, cwd=tmp_path),
                          "none does not exist")
    assert_one_line_error(nanosil_md(p1, "--models", models, "-T", 400, "--ps", 0.2, "--ensemble", "nve",
                                     "--equilibration-ps", 0, cwd=tmp_path), "--equilibration-ps > 0")
    assert_one_line_error(nanosil_md(p1, "--models", models, "-T", 400, "--ps", 0.2, "--depth-fs", 500, cwd=tmp_path),
                          "correlation depth 500 fs", "longer --ps")
    assert_one_line_error(nanosil_md(p1, "--models", models, "-T", -4, "--ps", 0.2, cwd=tmp_path), "-T", "> 0")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("md_*"))


def _pids(log: Path, proc: subprocess.Popen, timeout: float = 60) -> tuple[int, int]:
    """i-PI's and the driver's pids from the command's phase line, once i-PI is stepping."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"i-PI pid (\d+), nanosil-driver pid (\d+)", log.read_text())
        if m and list(log.parent.glob("run/md/md.out")) and (log.parent / "run/md/md.out").stat().st_size > 2000:
            return int(m.group(1)), int(m.group(2))
        time.sleep(0.2)
    pytest.fail(f"nanosil md did not start its MD: {log.read_text()}")


def _gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(is_running(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_md_stopped_by_a_signal_leaves_no_child(models, tmp_path, sig):
    p1 = cluster("pyroxene_N01_GM.xyz")
    log = tmp_path / "md.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "nanosil"), "md", str(p1), "--models", str(models), "-T", "400",
                                 "--ps", "100", "--out", "run"], cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT,
                                env=ENV)
    children = ()
    try:
        children = _pids(log, proc)
        os.kill(proc.pid, sig)
        rc = proc.wait(timeout=30)
        assert _gone(children, 20), f"children {children} outlived nanosil md"
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
        else:
            assert rc == 128 + sig, log.read_text()
            assert f"interrupted ({signal.Signals(sig).name})" in log.read_text()
            assert not (tmp_path / "run" / "spectrum.csv").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
