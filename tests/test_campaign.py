"""`nanosil ir-campaign`: configuration checks, i-PI file surgery for resuming, and a real campaign (real
i-PI, the batched driver, a small committee of 3 energy + 2 dipole members trained on GFN2-xTB labels:
conftest's xtb_model) that is SIGKILLed, resumed, and then extended with more seeds; its dipoles come every
2 fs (the default md.dipole_stride_fs), and its spectra carry both error bands (runs and dipole committee).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from al_manager.campaign.config import composition_of, config_from_dict, load_config
from al_manager.processes import start_time
from ipi_inputs.files import cut_dipoles, cut_rows, dipole_labels
from conftest import CHILD_ENV, cluster as structure

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------- configuration
def _minimal(tmp_path: Path, **extra) -> dict:
    models = tmp_path / "m"
    models.mkdir(exist_ok=True)
    (models / "committee.json").write_text("{}")
    data = {"models": str(models), "clusters": {"P1": str(structure("pyroxene_N01_GM.xyz"))}}
    data.update(extra)
    return data


@pytest.mark.parametrize("change, message", [
    ({"md": {"production_ps": -1}}, "md.production_ps: must be positive"),
    ({"md": {"prodution_ps": 10}}, "md.prodution_ps: unknown key (did you mean 'production_ps'?)"),
    ({"md": {"dipole_stride_fs": 1.25}}, "md.dipole_stride_fs: (1.25 fs) must be a multiple of timestep_fs (0.5 fs)"),
    ({"md": {"dipole_stride_fs": 0}}, "md.dipole_stride_fs: must be positive"),
    ({"md": {"committee_every_fs": 0.7}}, "md.committee_every_fs: (0.7 fs) must be a multiple of timestep_fs"),
    ({"ensemble": "npt"}, "ensemble: must be one of 'nvt', 'nve'"),
    ({"seeds": [1, 1]}, "seeds: repeated values"),
    ({"temperatures": [300, -5]}, "temperatures[1]: -5 K: temperatures must be > 0 K"),
    ({"spectra": {"correlation_depth_fs": 50000}}, "spectra.correlation_depth_fs"),
    ({"ensemble": "nve", "md": {"equilibration_ps": 0}}, "md.equilibration_ps: must be positive"),
    ({"run": {"drivers": 64, "workers": 64}}, "oversubscribe"),
    ({"trust": {"trust_cap": "high"}}, "trust.trust_cap: must be a number"),
    ({"trust": {"cap": 1.0}}, "trust.cap: is now called trust.trust_cap"),
    ({"clusters": {"P9": "missing.xyz"}}, "clusters.P9: structure file"),
    ({"clusters": {"P1": {"structure": "x.xyz", "colour": 1}}}, "clusters.P1.colour: unknown key"),
    ({"clusters": {"P1": {"size": 2}}}, "clusters.P1.structure: missing"),
])
def test_bad_config_names_the_key(tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(_minimal(tmp_path, **change), tmp_path)


def test_config_defaults_and_plan(tmp_path):
    data = _minimal(tmp_path, seeds=2, temperatures=[100, 800])
    data["clusters"]["O2"] = {"structure": str(structure("olivine_N02_GM.xyz"))}
    cfg = config_from_dict(data, tmp_path)
    assert (cfg.md.production_ps, cfg.md.timestep_fs, cfg.md.discard_ps, cfg.ensemble) == (40.0, 0.5, 5.0, "nvt")
    assert cfg.md.production_steps == 80000 and cfg.trust.measure == "force"
    assert (cfg.md.dipole_stride_fs, cfg.md.dipole_stride, cfg.spectra.correct_central_difference) == (2.0, 4, True)
    assert config_from_dict(_minimal(tmp_path, md={"timestep_fs": 0.25, "dipole_stride_fs": 1.75}),
                            tmp_path).md.dipole_stride == 7
    assert cfg.md.committee_every == 1   # the committee mean propagates unless asked otherwise
    assert config_from_dict(_minimal(tmp_path, md={"committee_every_fs": 2.0}), tmp_path).md.committee_every == 4
    assert config_from_dict(_minimal(tmp_path, md={"committee_every_fs": "none"}), tmp_path).md.committee_every == 1
    plan = cfg.trajectories()
    assert len(plan) == 8 and len({t.id for t in plan}) == 8
    assert [t.cluster.name for t in plan[:4]] == ["O2"] * 4        # by size, largest first: O2 (14 atoms), P1 (5)
    from ase.io import read

    assert composition_of(cfg.clusters[1], read(cfg.clusters[1].structure)) == ("olivine", 2)
    assert composition_of(cfg.clusters[0]) == ("pyroxene", 1)


def test_example_config_is_valid():
    path = ROOT / "examples" / "campaign.toml"
    cfg = load_config(path, check_files=False)
    assert cfg.clusters and cfg.temperatures and cfg.seeds


# ---------------------------------------------------------------------- file surgery
def test_template_knobs_and_cutting_back_outputs(tmp_path):
    import xml.etree.ElementTree as ET

    from ipi_inputs import render_input

    xml = render_input("production_nvt", tmp_path, socket="unix:x", structure=structure("pyroxene_N01_GM.xyz"),
                       temperature=300, seed=1, steps=100, prefix="md", timestep_fs=0.25, checkpoint_steps=50,
                       dipole_flush=1, latency_s=1e-3, dipole_stride=8)
    root = ET.parse(xml).getroot()   # every knob is a placeholder of the template, read back by i-PI's rules
    assert root.find("output/checkpoint").get("stride") == "50"
    assert root.find("output/trajectory[@filename='dipole']").get("flush") == "1"
    for name in ("dipole", "dipole_members"):  # both dipole files at the dipole stride
        node = root.find(f"output/trajectory[@filename='{name}']")
        assert (node.get("stride"), node.get("extra_type"), node.text.strip()) == ("8", name, "extras")
    with pytest.raises(ValueError, match="dipole_stride must be a positive integer"):
        render_input("production_nvt", tmp_path, socket="unix:x", structure=structure("pyroxene_N01_GM.xyz"),
                     temperature=300, seed=1, steps=100, dipole_stride=0)
    assert float(root.find("system/motion/dynamics/timestep").text) == 0.25
    assert float(root.find("ffsocket/latency").text) == 1e-3
    with pytest.raises(ValueError, match="checkpoint_steps"):
        render_input("production_nvt", tmp_path, socket="unix:x", structure=structure("pyroxene_N01_GM.xyz"),
                     temperature=300, seed=1, steps=100, checkpoint_steps=0)
    dip = tmp_path / "md.dipole_0"
    dip.write_text("".join(f" #EXTRAS(dipole)# Step:  {k} \n 0.1 0.2 {k}\n" for k in range(8)))
    assert cut_dipoles(dip, 5) and dipole_labels(dip) == list(range(6))
    assert not cut_dipoles(dip, 7)       # frames 6 and 7 are gone: restarting at 7 would leave a gap
    # a dipole every 4 steps (i-PI labels 0, 4, 8, ...: absolute MD steps), members file alike (2 rows a frame)
    strided, members = tmp_path / "s.dipole_0", tmp_path / "s.dipole_members_0"
    strided.write_text("".join(f" #EXTRAS(dipole)# Step:  {k} \n 0.1 0.2 {k}\n" for k in range(0, 41, 4)))
    members.write_text("".join(f" #EXTRAS(dipole_members)# Step:  {k} \n 0.1 0.2 {k}\n 0.3 0.4 {k}\n"
                               for k in range(0, 41, 4)))
    assert cut_dipoles(strided, 30, stride=4) and dipole_labels(strided) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert cut_dipoles(members, 30, stride=4) and dipole_labels(members) == [0, 4, 8, 12, 16, 20, 24, 28]
    assert members.read_text().count("\n") == 8 * 3
    assert not cut_dipoles(strided, 30)            # stride 1 would need labels 0..30
    assert not cut_dipoles(strided, 40, stride=4)  # 32..40 were cut: a gap
    torn = tmp_path / "t.dipole_members_0"
    torn.write_text(members.read_text() + " #EXTRAS(dipole_members)# Step:  32 \n 0.1 0.2 32\n")  # one row of 2
    assert not cut_dipoles(torn, 32, stride=4) and cut_dipoles(torn, 31, stride=4)
    log = tmp_path / "u.csv"
    log.write_text("step,a\n" + "".join(f"{k},0.1\n" for k in range(8)) + "8,0.")  # last line torn
    cut_rows(log, lambda s: s < 4)
    assert log.read_text() == "step,a\n0,0.1\n1,0.1\n2,0.1\n3,0.1\n"


# ---------------------------------------------------------------------- a real campaign
def _write_config(path: Path, model: Path, paths: dict, seeds: int, workers: int) -> None:
    path.write_text(f"""
models = "{model}"
output = "out"
temperatures = [100]
seeds = {seeds}

[md]
equilibration_ps = 0.025
production_ps = 0.25
discard_ps = 0.05
checkpoint_ps = 0.025

[run]
workers = {workers}
drivers = 1

[trust]
trust_cap = 50.0

[spectra]
correlation_depth_fs = 150

[clusters]
P1 = "{paths['P1']}"
O1 = "{paths['O1']}"
""")


def _campaign(config: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "nanosil"), "ir-campaign", str(config)], cwd=config.parent, env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _states(out: Path) -> dict:
    states = {}
    for path in out.glob("runs/*/*/*/state.json"):
        try:
            states[path.parent] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return states


def _chk_step(run: Path) -> int:
    from ipi_inputs.files import latest_checkpoint

    chk = latest_checkpoint(run / "md", "md")
    return chk[1] if chk else 0


def _stderr_squares(out: Path) -> float:
    """Sum over clusters and wavenumbers of the squared standard error (the variance of the mean)."""
    from spectra.spectrum import read_spectrum

    return sum(float(np.sum(read_spectrum(out / "spectra" / c / "100K" / "spectrum.csv").stderr ** 2))
               for c in ("P1", "O1"))


@pytest.mark.slow
def test_campaign_killed_resumed_and_extended(xtb_model, tmp_path):
    model, paths = xtb_model
    config = tmp_path / "campaign.toml"
    out = tmp_path / "out"
    _write_config(config, model, paths, seeds=2, workers=2)

    # 1. start, and SIGKILL the campaign once a trajectory is done and another one is past a checkpoint
    proc = _campaign(config)
    deadline = time.monotonic() + 600
    try:
        while True:
            states = _states(out)
            done = [f for f, s in states.items() if s["status"] == "done"]
            # past a checkpoint and far from its end (550 steps): a run that completes on disk before the
            # campaign marks it done is, rightly, not resumed, and would leave nothing to test here
            running = [f for f, s in states.items() if s["status"] == "running" and 50 <= _chk_step(f) <= 350]
            if done and running:
                break
            assert proc.poll() is None, f"campaign ended before it could be killed:\n{proc.communicate()[1][-3000:]}"
            assert time.monotonic() < deadline, "campaign made no progress"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = {f: ((f / "md" / "md.dipole_0").stat().st_mtime_ns, (f / "md" / "md.dipole_0").read_bytes())
                for f, s in _states(out).items() if s["status"] == "done"}
    interrupted = [f for f, s in _states(out).items() if s["status"] == "running"]
    assert finished and interrupted

    # 2. the same command again: finished trajectories untouched, interrupted ones resumed from checkpoints
    proc = _campaign(config)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert f"{len(finished)} already finished" in err, err[-3000:]
    assert "resumed at step" in err, err[-3000:]
    assert "campaign: 4/4 done, 0 running, 0 failed" in err              # the progress line
    for folder, (mtime, content) in finished.items():
        assert (folder / "md" / "md.dipole_0").stat().st_mtime_ns == mtime
        assert (folder / "md" / "md.dipole_0").read_bytes() == content
    for folder in interrupted:  # a dipole every 2 fs = 4 steps, the members with it: no frame repeated or lost
        for name in ("md.dipole_0", "md.dipole_members_0"):
            assert dipole_labels(folder / "md" / name) == list(range(0, 550 + 1, 4)), name
    # nothing left running: every i-PI recorded in the state files is gone
    for s in _states(out).values():
        assert s["status"] == "done" and (s["ipi_pid"] is None or start_time(s["ipi_pid"]) != s["ipi_started"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 4, "untrusted": 0, "failed": 0, "pending": 0}
    assert sorted((t["cluster"], t["seed"]) for t in summary["trajectories"]) == [
        ("O1", 1), ("O1", 2), ("P1", 1), ("P1", 2)]
    for t in summary["trajectories"]:
        assert t["simulated_ps"] == pytest.approx(0.275) and t["in_mean"] and t["uncertainty"]
    for name in ("P1", "O1"):
        csv = out / "spectra" / name / "100K" / "spectrum.csv"
        assert csv.read_text().splitlines()[0] == "wavenumber_cm-1,wavelength_um,intensity,stderr,std_committee"
        assert (out / "spectra" / name / "100K" / "spectrum.png").stat().st_size > 10000
        assert (out / "spectra" / name / "harmonic.txt").is_file()
    for comp in ("pyroxene", "olivine"):
        table = (out / "sums" / f"{comp}_100K_kappa.txt").read_text()
        assert "kappa_cm2_g" in table and (out / "sums" / f"{comp}_100K_sum.png").is_file()
    spectrum = np.loadtxt(out / "spectra" / "P1" / "100K" / "spectrum.csv", delimiter=",", skiprows=1)
    assert np.all(np.isfinite(spectrum[:, [0, 2, 3, 4]])) and spectrum[:, 2].max() > 0 and spectrum[:, 3].max() > 0
    assert spectrum[:, 4].max() > 0 and spectrum[:, 4].min() >= 0      # the 2 dipole members differ
    for record in summary["spectra"]:
        assert record["committee"]["n_dipole_members"] == 2 and record["committee"]["relative_std"] > 0
    two_runs = _stderr_squares(out)

    # 3. more seeds: only the new trajectories run, and the standard error of the mean shrinks
    _write_config(config, model, paths, seeds=6, workers=4)
    proc = _campaign(config)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "4 already finished, 8 to run" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 12
    assert all(s["n_runs"] == 6 for s in summary["spectra"])
    six_runs = _stderr_squares(out)
    # variance of the mean: sigma^2/n, expected ratio 2/6; a factor 1.5 leaves room for the noise of 2 runs
    assert six_runs < two_runs / 1.5, (two_runs, six_runs)


@pytest.mark.slow
def test_a_campaign_on_parsl_runs_shards_on_workers_and_assembles_the_spectra(xtb_model, tmp_path):
    """[execution] mode = "parsl" (a real HighThroughputExecutor, local provider, 2 shards at once): the
    trajectories run as two shard tasks on the sampling pool, each a campaign with its own batched driver,
    and the manager writes the spectra; a rerun finds everything finished."""
    pytest.importorskip("parsl")
    model, paths = xtb_model
    config = tmp_path / "campaign.toml"
    _write_config(config, model, paths, seeds=1, workers=1)
    config.write_text(config.read_text() + """
[execution]
mode = "parsl"
provider = "local"
retries = 1
heartbeat_period = 1
heartbeat_threshold = 10

[execution.sampling]
pairs_per_node = 2
""")
    out = tmp_path / "out"
    proc = _campaign(config)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    assert "2 to run on Parsl (local provider)" in err, err[-3000:]
    assert err.count("as a task of ParslExecutor sampling") == 2
    assert "shard0 on " in err and "shard1 on " in err and "1 done" in err
    # the shards' drivers kept their files apart
    assert (out / "drivers-shard0.json").is_file() and (out / "drivers-shard1.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "untrusted": 0, "failed": 0, "pending": 0}
    for name in ("P1", "O1"):
        spectrum = np.loadtxt(out / "spectra" / name / "100K" / "spectrum.csv", delimiter=",", skiprows=1)
        assert np.all(np.isfinite(spectrum[:, [0, 2]])) and spectrum[:, 2].max() > 0
        folder = out / "runs" / name / "100K" / "seed1" / "md"
        assert dipole_labels(folder / "md.dipole_0") == list(range(0, 550 + 1, 4))
    again = _campaign(config)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    assert "2 already finished, 0 to run on Parsl" in err
