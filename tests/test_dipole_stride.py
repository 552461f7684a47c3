"""The dipole at the rate the spectrum needs (issue 15) and the dipole-committee band (issue 14), end to end.

- The drivers compute the dipole only on every K-th MD step (``--dipole-every K``) and i-PI writes the dipole
  files with stride K: on real i-PI runs (``nanosil-driver``; the batched driver, fresh and restarted from a
  checkpoint between two dipole steps) every written dipole and member dipole is the committee's own at the
  positions i-PI wrote for that step, and the steps in between carry the last computed dipole.
- A spectrum from dipoles every 2 fs equals the one from every 0.5 fs step of the same real trajectory (xTB-
  trained committee, P1 at 300 K): band areas below 2000 cm^-1 within 1% and the same peaks, once the
  central difference's (sin x / x)^2 damping is divided out (without it 2 fs loses several per cent).
- A real short campaign with an untrained committee of 2 dipole members writes both bands (runs and
  committee) in its CSVs and plot, the committee band positive.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.io import read

from driver.models.committee import load_committee
from ipi_inputs import render_input
from ipi_inputs.files import dipole_labels, latest_checkpoint
from spectra.autocorrelation import SpectrumOptions, md_committee_spectrum, run_spectrum
from spectra.io import read_dipole_members, read_dipoles
from conftest import BIN, CHILD_ENV, cluster, untrained_committee

ROOT = Path(__file__).resolve().parents[1]
C = units._c * 1e2 * 1e-15  # cm/fs
STRIDE = 4                  # 2 fs at 0.5 fs


@pytest.fixture
def procs(ipi_children):
    return ipi_children


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """3 energy + 2 dipole members, untrained: plumbing and step numbering, not physics."""
    return untrained_committee(tmp_path_factory.mktemp("stride") / "models")


def _render(folder: Path, structure: Path, steps: int, stride: int, sockets: list, temperature=300.0, **kw):
    """production_nvt with the dipole files every ``stride`` steps, plus two outputs for checking: the
    positions every step in i-PI's 'ase' format (Å, 8 decimals) and the extras' dipole every step."""
    name = f"nds_{uuid.uuid4().hex[:10]}"
    sockets.append(name)
    xml = render_input("production_nvt", folder, socket=f"unix:{name}", structure=structure, temperature=temperature,
                       seed=4, steps=steps, prefix="md", dipole_stride=stride, dipole_flush=1, **kw)
    xml.write_text(xml.read_text().replace("</output>", (
        "<trajectory filename='x' stride='1' format='ase' flush='1'> positions </trajectory>\n"
        "<trajectory filename='every' stride='1' extra_type='dipole' flush='1'> extras </trajectory>\n</output>")))
    return xml, name


def _ipi(started: list, xml: Path) -> subprocess.Popen:
    with open(xml.parent / "ipi.log", "a") as log:
        started.append(subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=xml.parent, stdout=log,
                                        stderr=subprocess.STDOUT, env=CHILD_ENV))
    return started[-1]


def _check_written_dipoles(folder: Path, committee, numbers, last: int, stride: int, restarts=()) -> None:
    """Every frame of md.dipole_0 / md.dipole_members_0 is the committee's dipole at the positions i-PI wrote
    for that step, and the extras of every step carry the dipole of the last step the driver computed (a
    multiple of ``stride``, or the first request of a run restarted at a step in ``restarts``)."""
    labels = list(range(0, last + 1, stride))
    dip = read_dipoles(folder / "md.dipole_0", 0.5)
    members = read_dipole_members(folder / "md.dipole_members_0", 0.5)
    assert list(dip.steps) == labels and list(members.steps) == labels
    assert dip.frame_interval_fs == members.frame_interval_fs == 0.5 * stride
    frames = read(folder / "md.x_0.extxyz", ":")
    assert len(frames) == last + 1
    every = read_dipoles(folder / "md.every_0", 0.5)           # the extras' dipole at every step
    assert list(every.steps) == list(range(last + 1))
    dipole_at = {}

    def ref(step):
        if step not in dipole_at:
            dipole_at[step] = committee.predict(numbers, frames[step].positions)
        return dipole_at[step]

    worst, nearest_other = 0.0, np.inf
    for k, step in enumerate(labels):
        worst = max(worst, float(np.abs(dip.dipoles[k] - ref(step).dipole).max()),
                    float(np.abs(members.dipoles[:, k] - ref(step).member_dipoles).max()))
        for other in (step - 1, step + 1):  # what an off-by-one step count would have written
            if 0 <= other <= last:
                nearest_other = min(nearest_other, float(np.abs(ref(other).dipole - dip.dipoles[k]).max()))
    for step in range(last + 1):
        source = max([s for s in range(0, step + 1, stride)] + [r for r in restarts if r < step])
        worst = max(worst, float(np.abs(every.dipoles[step] - ref(source).dipole).max()))
    # float32 members and 8-decimal positions: ~1e-7 e·Å; a dipole one step off differs by > 1e-5
    assert worst < 2e-6, worst
    assert nearest_other > 10 * worst, (nearest_other, worst)


@pytest.mark.timeout(300)
def test_nanosil_driver_computes_exactly_the_written_dipoles(models, procs, tmp_path):
    """i-PI + nanosil-driver --dipole-every 4, 200 steps of P2: i-PI labels the configuration after s steps
    'Step: s' and writes it when s % 4 == 0; the driver's request r is that configuration (one force call a
    step, the initial one first), so the computed dipoles are exactly the written ones."""
    started, sockets = procs
    src = cluster("pyroxene_N02_GM.xyz")
    xml, name = _render(tmp_path, src, 200, STRIDE, sockets)
    ipi = _ipi(started, xml)
    drv = subprocess.run([str(BIN / "nanosil-driver"), "--models", str(models), "--structure", str(src), "--unix",
                          name, "--dipole-every", str(STRIDE)], cwd=tmp_path, env=CHILD_ENV, capture_output=True,
                         text=True, timeout=240)
    assert drv.returncode == 0, drv.stderr[-3000:]
    assert ipi.wait(timeout=60) == 0, (tmp_path / "ipi.log").read_text()[-3000:]
    assert "dipole every 4 steps" in drv.stderr and "i-PI sent EXIT after 201 force evaluations" in drv.stderr
    _check_written_dipoles(tmp_path, load_committee(models), read(src).numbers, 200, STRIDE)


def _events_until(proc, kind: str, target: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"batch driver ended before '{kind}' of {target}: {proc.stderr.read()[-3000:]}")
        event = json.loads(line)
        if event.get("event") == "error":
            pytest.fail(f"batch driver error: {event}")
        if event.get("event") == kind and event.get("id") == target:
            return event
    pytest.fail(f"no '{kind}' of {target} within {timeout} s")


@pytest.mark.timeout(400)
def test_batch_driver_dipole_stride_fresh_and_restarted_between_dipole_steps(models, procs, tmp_path):
    """The batched driver (--dipole-every 4, as a campaign runs it) serves 150 steps, then the run restarts from
    its checkpoint at step 150 (not a multiple of 4) with step_offset 150 up to step 230: i-PI appends the
    labels 152, 156, ... and the driver computes exactly those (its first request, step 150, computes one to
    have a dipole to carry). The files then hold 0, 4, ..., 228 with no gap or repeat, each the committee's."""
    from ipi_inputs.render import restart_input

    started, sockets = procs
    src = cluster("pyroxene_N01_GM.xyz")
    xml, name = _render(tmp_path, src, 150, STRIDE, sockets, checkpoint_steps=50)
    server = subprocess.Popen([sys.executable, "-m", "driver.ipi.batch_server", "--models", str(models), "--control",
                               "-", "--dipole-every", str(STRIDE), "--progress-every", "1000"], cwd=ROOT,
                              env=CHILD_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, bufsize=1)
    started.append(server)

    def add(target_id: str, socket: str, offset: int) -> None:
        server.stdin.write(json.dumps({"add": {"id": target_id, "socket": f"unix:{socket}", "structure": str(src),
                                               "log": str(tmp_path / "uncertainty.csv"), "step_offset": offset}}) + "\n")
        server.stdin.flush()

    ipi = _ipi(started, xml)
    add("first", name, 0)
    assert _events_until(server, "finished", "first", 200)["requests"] == 151
    assert ipi.wait(timeout=60) == 0
    chk, step = latest_checkpoint(tmp_path, "md")
    assert step == 150 and step % STRIDE
    restart_name = f"nds_{uuid.uuid4().hex[:10]}"
    sockets.append(restart_name)
    restart = restart_input(chk, tmp_path / "restart.xml", restart_name)
    restart.write_text(restart.read_text().replace("<total_steps>150</total_steps>", "<total_steps>230</total_steps>"))
    ipi = _ipi(started, restart)
    add("second", restart_name, 150)
    assert _events_until(server, "finished", "second", 200)["requests"] == 81
    assert ipi.wait(timeout=60) == 0
    server.stdin.write(json.dumps({"shutdown": True}) + "\n")
    server.stdin.flush()
    assert server.wait(timeout=60) == 0
    log = np.genfromtxt(tmp_path / "uncertainty.csv", delimiter=",", names=True)
    assert list(log["step"]) == list(range(151)) + list(range(150, 231))   # MD steps, the offset applied
    computed = ~np.isnan(log["dipole_std_eA"])                             # dipole_std only where computed
    assert list(log["step"][computed]) == list(range(0, 151, 4)) + [150] + list(range(152, 231, 4))
    _check_written_dipoles(tmp_path, load_committee(models), read(src).numbers, 230, STRIDE, restarts=[150])


# ---------------------------------------------------------------------- the spectrum at 2 fs
def test_central_difference_correction_restores_the_harmonic_band_at_2_fs():
    """A classical harmonic mode at 1050 cm^-1 sampled every 2 fs: the central difference damps its band by
    (sin x / x)^2 = 0.953; with the correction the band integrates to its harmonic intensity again."""
    from test_spectra_autocorrelation import analytic_harmonic_dipoles

    from spectra.constants import KM_MOL_PER_E2_AMU

    dmu_dq, nu = np.array([0.31, -0.22, 0.12]), 1050.0
    intensity = float(dmu_dq @ dmu_dq) * KM_MOL_PER_E2_AMU
    t = np.arange(0.0, 30000.0, 2.0)
    mu = analytic_harmonic_dipoles(t, nu, dmu_dq, 300.0)
    x = 2 * np.pi * C * nu * 2.0
    plain = run_spectrum(mu, 2.0, 300.0, SpectrumOptions())
    fixed = run_spectrum(mu, 2.0, 300.0, SpectrumOptions(correct_central_difference=True))
    assert plain.integral(nu - 300, nu + 300) / intensity == pytest.approx((math.sin(x) / x) ** 2, abs=2e-3)
    assert fixed.integral(nu - 300, nu + 300) / intensity == pytest.approx(1.0, abs=2e-3)
    assert fixed.meta["central_difference_correction"] and not plain.meta["central_difference_correction"]
    assert fixed.intensity.min() >= 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_spectrum_from_dipoles_every_2_fs_equals_every_step(xtb_model, procs, tmp_path):
    """One real i-PI trajectory (xTB-trained committee, P1 at 300 K, 3 ps, dipole every 0.5 fs step): its
    spectrum from every 4th dipole (2 fs) has the band areas below 2000 cm^-1 of the every-step spectrum
    within 1% (also band by band) and the same peaks, with the central-difference correction the campaign
    uses; without it the 2 fs spectrum loses several per cent (why the campaign corrects)."""
    from spectra.compare import peak_positions

    model, paths = xtb_model
    started, sockets = procs
    xml, name = _render(tmp_path, paths["P1"], 6000, 1, sockets)
    ipi = _ipi(started, xml)
    drv = subprocess.run([str(BIN / "nanosil-driver"), "--models", str(model), "--structure", str(paths["P1"]),
                          "--unix", name], cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True, timeout=500)
    assert drv.returncode == 0, drv.stderr[-3000:]
    assert ipi.wait(timeout=60) == 0
    series = read_dipoles(tmp_path / "md.dipole_0", 0.5)
    assert series.n_frames == 6001
    options = dict(depth_fs=1000.0, discard_ps=0.5)
    edges = [0.0, 400.0, 800.0, 1200.0, 2000.0]
    ratios = {}
    for corrected in (True, False):
        o = SpectrumOptions(**options, correct_central_difference=corrected)
        fine = run_spectrum(series.dipoles, 0.5, 300.0, o)
        coarse = run_spectrum(series.dipoles[::STRIDE], 0.5 * STRIDE, 300.0, o)
        np.testing.assert_allclose(coarse.wavenumber, fine.wavenumber[:len(coarse.wavenumber)])  # same grid
        ratios[corrected] = coarse.integral(0, 2000) / fine.integral(0, 2000)
        print(f"correction {corrected}: 2 fs / 0.5 fs band areas", {f"{lo:g}-{hi:g}": round(
            coarse.integral(lo, hi) / fine.integral(lo, hi), 4) for lo, hi in zip(edges[:-1], edges[1:])},
            "below 2000:", round(ratios[corrected], 4), "peaks", peak_positions(coarse.cropped(100, 2000), n=4))
        if corrected:
            for lo, hi in zip(edges[:-1], edges[1:]):
                assert coarse.integral(lo, hi) == pytest.approx(fine.integral(lo, hi), rel=0.01), (lo, hi)
            peaks_fine = peak_positions(fine.cropped(100, 2000), n=4)
            peaks_coarse = peak_positions(coarse.cropped(100, 2000), n=4)
            assert len(peaks_fine) == 4, peaks_fine
            np.testing.assert_allclose(peaks_coarse, peaks_fine, atol=fine.wavenumber[1])
    assert ratios[True] == pytest.approx(1.0, abs=0.01)
    assert ratios[False] < 0.99, ratios   # the uncorrected 2 fs spectrum is damped


# ---------------------------------------------------------------------- the committee band in a campaign
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_campaign_with_two_dipole_members_has_a_positive_committee_band(models, tmp_path):
    """A real campaign (P1, 2 seeds, dipole every 2 fs) with the untrained 3 + 2 committee: the dipole and
    member files at stride 4, the spectrum CSV with 'stderr' (runs) and 'std_committee' (2 dipole members,
    positive), equal to md_committee_spectrum over the runs' member files, and the per-run CSVs with their
    own committee band."""
    config = tmp_path / "campaign.toml"
    config.write_text(f"""
models = "{models}"
output = "out"
temperatures = [300]
seeds = 2

[md]
equilibration_ps = 0.01
production_ps = 0.3
discard_ps = 0.05
checkpoint_ps = 0.1

[run]
workers = 2
drivers = 1

[trust]
trust_cap = "none"
fragment_distance = "none"

[spectra]
correlation_depth_fs = 100
harmonic = false

[clusters]
P1 = "{cluster('pyroxene_N01_GM.xyz')}"
""")
    proc = subprocess.run([str(BIN / "nanosil"), "ir-campaign", str(config)], cwd=tmp_path, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == 2
    runs = sorted(out.glob("runs/P1/300K/seed*/md"))
    assert len(runs) == 2
    for folder in runs:
        for name in ("md.dipole_0", "md.dipole_members_0"):
            assert dipole_labels(folder / name) == list(range(0, 620 + 1, STRIDE)), name
        header = (folder.parent / "spectrum.csv").read_text().splitlines()[0]
        assert header.endswith(",stderr,std_committee")
    csv = out / "spectra" / "P1" / "300K" / "spectrum.csv"
    assert csv.read_text().splitlines()[0] == "wavenumber_cm-1,wavelength_um,intensity,stderr,std_committee"
    table = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert np.all(np.isfinite(table[:, [0, 2, 3, 4]]))
    assert table[:, 4].max() > 0 and table[:, 4].min() >= 0 and table[:, 3].max() > 0
    record = summary["spectra"][0]
    assert record["committee"]["n_dipole_members"] == 2 and record["committee"]["relative_std"] > 0
    assert (out / "spectra" / "P1" / "300K" / "spectrum.png").stat().st_size > 10000
    # the band is md_committee_spectrum over the runs' member files (production part, same options)
    members = []
    for folder in runs:
        m = read_dipole_members(folder / "md.dipole_members_0", 0.5)
        keep = m.steps >= 20   # production starts after 0.01 ps = 20 steps
        members.append(type(m)(m.dipoles[:, keep], m.frame_interval_fs, m.source, m.steps[keep]))
    options = SpectrumOptions(depth_fs=100.0, discard_ps=0.05, correct_central_difference=True)
    committee = md_committee_spectrum(members, 300.0, options)
    np.testing.assert_allclose(table[:, 4], committee.std, rtol=1e-6, atol=1e-9 * committee.std.max())
