"""Learning on real DFT labels (the paper's PBE0 P2 structures), through the CLI, plus the ASE calculator."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.io import read

from driver.data import add_labelled, connect, split_train_validation
from driver.models.committee import build_committee, load_committee
from driver.training import error_table, fit_energy_shift, _species_index

from conftest import shared_file

SMALL = ["--hidden", "64", "64"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, p2_dft_frames):
    """25 PBE0 P2 structures into a database, a committee trained on them with `nanosil train`."""
    tmp = tmp_path_factory.mktemp("train")
    db = connect(tmp / "p2.db")
    for f in p2_dft_frames[:25]:
        from ase import Atoms
        add_labelled(db, Atoms(numbers=f.numbers, positions=f.positions), f.energy, f.forces, f.dipole,
                     method="orca:PBE0/def2-SVP", cluster="P2", origin="normal_modes")
    cmd = [sys.executable, "-m", "al_manager.cli", "train", "--db", str(tmp / "p2.db"), "--out", str(tmp / "models"),
           "--committee", "2", "--dipole", "--epochs", "150", "--patience", "150", "--batch-size", "4",
           "--lr", "5e-3", *SMALL]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return tmp, run.stdout


def test_dataset_split_is_fixed_and_excludes_test(p2_dft_frames):
    frames = list(p2_dft_frames)
    frames[0].origin = "test"
    train, val = split_train_validation(frames)
    assert len(val) == 3 and len(train) == 27 and all(f.origin != "test" for f in train + val)
    # Adding data keeps earlier frames on their side of the split (active learning grows the set).
    train2, val2 = split_train_validation(frames[:20])
    assert {f.hash for f in val2} - {f.hash for f in val} == set() or len(val2) <= 2
    frames[0].origin = "normal_modes"


def test_training_beats_untrained_baseline_on_held_out_dft(trained, p2_dft_frames):
    tmp, stdout = trained
    assert "validation MAE" in stdout and "forces (eV/Å)" in stdout
    committee = load_committee(tmp / "models", dtype=torch.float64)
    assert committee.n_energy_members == 2 and committee.n_dipole_members == 1
    held_out = p2_dft_frames[25:]
    trained_err = error_table(committee, held_out)
    # Baseline: the same architecture untrained, with the same composition energy shift.
    baseline = build_committee(committee.config, 2, 1, seed=5).to(torch.float64)
    train_frames = p2_dft_frames[:25]
    baseline.energy_shift = fit_energy_shift(train_frames, 3, _species_index(train_frames, baseline.species))
    base_err = error_table(baseline, held_out)
    print("held-out trained", trained_err, "\nuntrained", base_err)
    # 22 training structures of large normal-mode displacements (forces up to 118 eV/Å): measured ratios
    # were 0.06 (energy), 0.53 (forces), 0.61 (dipole) for this short schedule.
    assert trained_err["energy_mae_meV_per_atom"] < 0.2 * base_err["energy_mae_meV_per_atom"]
    assert trained_err["force_mae_eV_per_A"] < 0.65 * base_err["force_mae_eV_per_A"]
    assert trained_err["dipole_mae_D"] < 0.75 * base_err["dipole_mae_D"]
    meta = json.loads((tmp / "models" / "committee.json").read_text())
    assert meta["calibration"]["energy"] > 0 and meta["metadata"]["n_train"] == 23


def test_evaluate_prints_table(trained):
    tmp, _ = trained
    traj = shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj")
    run = subprocess.run([sys.executable, "-m", "al_manager.cli", "evaluate", "--db", str(traj), "--models",
                          str(tmp / "models"), "--json", str(tmp / "eval.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = json.loads((tmp / "eval.json").read_text())
    assert table["test"]["n"] == 31 and {"train", "validation", "test"} <= set(table)
    assert "energy per atom (meV)" in run.stdout and "dipole (Debye)" in run.stdout
    # 25 of these 31 structures trained the committee: said, since the test errors are then optimistic
    assert "warning: 25 of 31 structures" in run.stderr and "optimistic" in run.stderr


def test_warm_start_continues_from_earlier_weights(trained, p2_dft_frames):
    from driver.training import TrainConfig, train_committee

    tmp, _ = trained
    cfg = TrainConfig(committee=2, dipole_members=1, epochs=1, patience=1, warm_start=str(tmp / "models"), lr=1e-9)
    c = train_committee(p2_dft_frames[:25], tmp / "warm", cfg)
    before = load_committee(tmp / "models")
    a = before.predict(p2_dft_frames[0].numbers, p2_dft_frames[0].positions)
    b = c.predict(p2_dft_frames[0].numbers, p2_dft_frames[0].positions)
    assert b.energy == pytest.approx(a.energy, abs=1e-3)


def test_calculator_hessian_matches_ase_vibrations(trained, tmp_path):
    from ase.optimize import BFGS
    from ase.vibrations import Vibrations, VibrationsData

    from driver.calculator import NanosilCalculator

    tmp, _ = trained
    atoms = read(shared_file("structures", "pyroxene_N01_GM.xyz"))
    calc = NanosilCalculator(tmp / "models")
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=300)
    assert {"energy_std_per_atom", "max_force_std", "dipole_std"} <= set(calc.results)
    exact = VibrationsData.from_2d(atoms, calc.hessian(atoms)).get_frequencies().real
    vib = Vibrations(atoms, name=str(tmp_path / "vib"), delta=0.005, nfree=4)
    vib.run()
    fd = vib.get_frequencies().real
    assert np.abs(exact[6:] - fd[6:]).max() < 0.5
    # Dipole derivatives against central differences of the calculator's dipole.
    d = calc.dipole_derivatives(atoms)
    i, a, h = 2, 1, 1e-4
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[i, a] += h
    minus.positions[i, a] -= h
    plus.calc = minus.calc = calc
    fd_mu = (plus.get_dipole_moment() - minus.get_dipole_moment()) / (2 * h)
    np.testing.assert_allclose(d[i, a], fd_mu, atol=1e-6)


def test_train_refuses_unknown_element(tmp_path):
    from ase import Atoms

    db = connect(tmp_path / "fe.db")
    for k in range(3):
        add_labelled(db, Atoms("FeO", positions=[[0, 0, 0], [0, 0, 1.6 + 0.1 * k]]), -1.0 * k, np.zeros((2, 3)),
                     method="test")
    run = subprocess.run([sys.executable, "-m", "al_manager.cli", "train", "--db", str(tmp_path / "fe.db"),
                          "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "element Fe" in run.stderr and "Mg, Si, O" in run.stderr and "Traceback" not in run.stderr


def test_killed_trainer_leaves_no_worker_behind(tmp_path, p2_dft_frames):
    """SIGKILL of the training process: its member processes notice and exit instead of running on."""
    import os
    import signal
    import time

    script = tmp_path / "train.py"
    script.write_text(
        "from driver.data import read_frames\n"
        "from driver.training import TrainConfig, train_committee\n"
        f"frames = read_frames({str(shared_file('pbe0_P2_normal_modes', 'farthest_selected_opt_pbe0.traj'))!r})[:10]\n"
        "train_committee(frames, 'm', TrainConfig(committee=2, dipole_members=0, epochs=100000, patience=100000,"
        " model=dict(hidden=(8,))))\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers = []
    while time.time() < deadline and not workers:
        time.sleep(0.5)
        out = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "driver.training"], capture_output=True, text=True)
        workers = [int(p) for p in out.stdout.split()]
    assert workers, "no training worker started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    alive = workers
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"training workers {alive} outlived their parent"


def test_sigterm_on_nanosil_train_ends_workers_and_removes_temporary_files(tmp_path, p2_dft_frames):
    """SIGTERM (what a batch system sends) on `nanosil train`: it exits with 128+15, its member processes
    end and no temporary folder is left behind."""
    import os
    import signal
    import time

    from ase.io import write

    frames = read(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"), ":10")
    db = tmp_path / "p2.xyz"
    write(db, frames, format="extxyz")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    proc = subprocess.Popen([sys.executable, "-m", "al_manager.cli", "train", "--db", str(db), "--out",
                             str(tmp_path / "m"), "--committee", "2", "--epochs", "100000", "--patience", "100000", "--hidden", "8"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and not workers:
        time.sleep(0.5)
        out = subprocess.run(["pgrep", "-f", "-P", str(proc.pid), "driver.training"], capture_output=True, text=True)
        workers = [int(p) for p in out.stdout.split()]
    assert workers, "no training worker started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    deadline, alive = time.time() + 30, workers
    while alive and time.time() < deadline:
        time.sleep(0.3)
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]]
    assert not alive, f"training workers {alive} outlived nanosil train"
    assert list(scratch.iterdir()) == [], "temporary training files left behind"


# ------------------------------------------------------------------ the training step against its definition
def _reference_loss(model, batch, energy, forces, cfg):
    """The definition (the implementation before the hand-written step): autograd through the model,
    forces by create_graph, the loss of Eq. 3."""
    from driver.models.geometry import Batch

    pos = batch.positions.clone().requires_grad_(True)
    e = model(Batch(batch.species, pos, batch.mask))[0]
    (g,) = torch.autograd.grad(e.sum(), pos, create_graph=True)
    f_err = ((-g - forces) ** 2).sum((-1, -2)) / (3 * batch.mask.sum(-1))
    return e, -g, (cfg.lambda_energy * (e - energy) ** 2 + cfg.lambda_forces * f_err).mean()


def _member(hidden, dtype, frames):
    from driver.models.committee import ModelConfig, _energy_model
    from driver.models.geometry import make_batch

    torch.manual_seed(3)
    model = _energy_model(ModelConfig(hidden=hidden), 1)
    model.fit_normalisation([make_batch(_species_index(frames, ("Mg", "Si", "O")), [f.positions for f in frames])])
    with torch.no_grad():  # biases and scales away from their initial 0 and 1, so that their gradients show
        for layer in model.layers:
            layer.bias.normal_(0, 0.3)
        model.atomic_scale.uniform_(0.5, 2.0)
    return model.to(dtype)


@pytest.mark.parametrize("dtype, hidden, tol", [(torch.float64, (24, 16, 8), 1e-10), (torch.float64, (), 1e-10),
                                                (torch.float32, (512, 512), 2e-5)])
def test_training_loss_and_its_gradients_equal_autograd_through_the_model(p2_dft_frames, dtype, hidden, tol):
    from driver.training import TrainConfig, _energy_and_forces, _energy_loss, _Packed, _tensors
    from driver.models.geometry import make_batch

    frames = p2_dft_frames[:12]
    model = _member(hidden, dtype, frames)
    params = list(model.parameters())
    cfg = TrainConfig()
    shift = fit_energy_shift(frames, 3, _species_index(frames, ("Mg", "Si", "O")))
    data = _tensors(frames, ("Mg", "Si", "O"), shift)
    packed, ids = _Packed(data, dtype), [4, 0, 9, 2]
    b = packed.batch(ids)
    e_ref, f_ref, loss_ref = _reference_loss(model, b.structures, b.energy, b.forces, cfg)
    loss = _energy_loss(model, packed, ids, cfg, True)
    assert float(loss.detach()) == pytest.approx(float(loss_ref.detach()), rel=tol)
    for g, g_ref in zip(torch.autograd.grad(loss, params), torch.autograd.grad(loss_ref, params)):
        assert float((g - g_ref).abs().max()) <= tol * float(g_ref.abs().max())
    # Padding (structures of different sizes in one batch, as the validation of other callers may have).
    p1 = read(shared_file("structures", "pyroxene_N01_GM.xyz"))
    mixed = make_batch([data.index[0], _species_index([p1], ("Mg", "Si", "O"))[0]],
                       [frames[0].positions, p1.positions], dtype=dtype)
    e, f = _energy_and_forces(model, mixed, create_graph=False)
    e_ref, f_ref, _ = _reference_loss(model, mixed, torch.zeros(2, dtype=dtype), torch.zeros_like(mixed.positions), cfg)
    np.testing.assert_allclose(e.detach(), e_ref.detach(), rtol=tol, atol=tol)
    np.testing.assert_allclose(f.detach(), f_ref.detach(), rtol=tol, atol=tol * float(f_ref.detach().abs().max()))
    assert float(f.detach()[1, len(p1):].abs().max()) == 0.0


def test_packed_batches_equal_padded_ones(p2_dft_frames):
    from driver.models.geometry import make_batch
    from driver.training import _Packed, _tensors

    frames = p2_dft_frames[:6]
    data = _tensors(frames, ("Mg", "Si", "O"), np.zeros(3))
    data.index.append(data.index[0][:4])   # one smaller structure: a group of its own
    data.positions.append(data.positions[0][:4])
    data.forces.append(data.forces[0][:4])
    data.energy = np.append(data.energy, 1.0)
    data.dipole.append(None)
    packed, ids = _Packed(data), [5, 1, 3]
    b, ref = packed.batch(ids), make_batch([data.index[i] for i in ids], [data.positions[i] for i in ids])
    assert torch.equal(b.structures.positions, ref.positions) and torch.equal(b.structures.species, ref.species)
    assert torch.equal(b.forces, torch.as_tensor(np.stack([data.forces[i] for i in ids]), dtype=torch.float32))
    assert torch.equal(b.energy, torch.as_tensor(data.energy[ids], dtype=torch.float32))
    assert b.dipole is not None and b.n_atoms.tolist() == [len(data.index[0])] * 3
    assert packed.batch([6]).dipole is None
    with pytest.raises(ValueError, match="one atom count"):
        packed.batch([0, 6])


def test_fused_adam_steps_equal_plain_adam():
    from driver.training import _adam

    torch.manual_seed(0)
    a = [torch.randn(40, 30, requires_grad=True), torch.randn(30, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    opt_a, opt_b = _adam(a, 1e-2), torch.optim.Adam(b, lr=1e-2)
    for step in range(5):
        grads = [torch.randn_like(t) for t in a]
        for opt, ts in ((opt_a, a), (opt_b, b)):
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - step / 5)
            for t, g in zip(ts, grads):
                t.grad = g.clone()
            opt.step()
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.detach(), y.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ progress lines
def _member_task(frames, kind: str, **cfg):
    from driver.models.committee import ModelConfig
    from driver.training import TrainConfig, _tensors

    model = dict(hidden=(16,), dipole_features=8, dipole_interactions=1, dipole_gaussians=6)
    train, val = split_train_validation(frames)
    shift = fit_energy_shift(train, 3, _species_index(train, ("Mg", "Si", "O")))
    return dict(kind=kind, member=1, threads=1, cfg=TrainConfig(model=model, **cfg), model_config=ModelConfig(**model),
                train=_tensors(train, ("Mg", "Si", "O"), shift), val=_tensors(val, ("Mg", "Si", "O"), shift),
                warm_state=None)


def test_member_progress_lines_name_the_member_and_report_validation_errors(p2_dft_frames, capfd):
    import re

    from driver.training import TrainConfig, _train_member

    _train_member(_member_task(p2_dft_frames, "energy", epochs=20, patience=20))
    lines = capfd.readouterr().err.splitlines()
    assert lines and all(line.startswith("[energy member 1] ") for line in lines)
    epoch = re.compile(r"^\[energy member 1\] epoch (\d+)/20 train loss \S+ val E [\d.]+ meV/atom F [\d.]+ eV/Å "
                       r"\(val loss \S+, best \S+ at epoch \d+\) lr \S+ \d+ s ETA \d+ s$")
    # by default a line every ~10 % of the epochs (and the first), whatever the time limit of 30 s adds
    assert [int(epoch.match(line).group(1)) for line in lines[:-1]] == [1] + list(range(2, 21, 2))
    assert lines[-1].startswith("[energy member 1] done: 20 epochs in ")

    _train_member(_member_task(p2_dft_frames, "dipole", epochs=3, patience=3, log_every=1))
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 4 and all(re.search(r"^\[dipole member 1\] epoch \d/3 .* val mu [\d.]+ D ", line)
                                   for line in lines[:3])
    _train_member(_member_task(p2_dft_frames, "energy", epochs=3, patience=3, progress="off"))
    assert capfd.readouterr().err == ""
    with pytest.raises(ValueError, match="progress"):
        TrainConfig(progress="loud")


def test_parallel_members_write_whole_lines(p2_dft_frames, tmp_path, capfd):
    """Members in parallel processes write to the same stderr: every line is whole and names its member."""
    import re

    from driver.training import TrainConfig, train_committee

    model = dict(hidden=(8,), dipole_features=8, dipole_interactions=1, dipole_gaussians=6)
    train_committee(p2_dft_frames[:16], tmp_path / "m", TrainConfig(committee=2, dipole_members=1, epochs=25,
                                                                    patience=25, log_every=1, workers=2, model=model))
    lines = [line for line in capfd.readouterr().err.splitlines() if "member" in line]
    whole = re.compile(r"^\[(energy member [01]|dipole member 0)\] (epoch \d+/25 train loss [^\[\]]* ETA \d+ s"
                       r"|done: [^\[\]]*)$")
    assert len(lines) == 3 * 26 and all(whole.match(line) for line in lines), lines
