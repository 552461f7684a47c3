"""``--device cpu|cuda|auto`` (driver.device): the resolver, the one-line refusal of cuda without CUDA through the
real commands, the same numbers on the CPU whichever way it is asked for, and (without a GPU) that the PyTorch
paths make every tensor on the model's device."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import read
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from driver.device import CHOICES, DeviceError, check_name, resolve_device
from driver.models.committee import ModelConfig, build_committee, load_committee, save_committee

from conftest import CHILD_ENV, cluster, shared_file

BIN = Path(sys.executable).parent
NO_CUDA = "--device cuda: this torch has no CUDA device (torch.cuda.is_available() is False); use --device cpu or auto"
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a CUDA device")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("device") / "models"
    config = ModelConfig(hidden=(16, 16), dipole_features=16, dipole_interactions=1, dipole_gaussians=8)
    save_committee(build_committee(config, n_members=3, n_dipole=2, seed=0), folder)
    return folder


# ---------------------------------------------------------------------------------------- the resolver
def test_resolver_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert CHOICES == ("cpu", "cuda", "auto")


@needs_no_cuda
def test_resolver_refuses_cuda_without_cuda_in_one_line():
    with pytest.raises(DeviceError) as exc:
        resolve_device("cuda")
    assert str(exc.value) == NO_CUDA
    assert isinstance(exc.value, ValueError)  # the commands print ValueErrors as one line, exit 2
    with pytest.raises(DeviceError, match=r"^--device cuda:0: this torch has no CUDA device"):
        resolve_device("cuda:0")
    with pytest.raises(DeviceError, match=r"^device cuda: this torch has no CUDA device .* use device cpu or auto$"):
        resolve_device("cuda", option="device")


def test_resolver_and_train_config_refuse_unknown_names():
    from driver.training import TrainConfig

    with pytest.raises(DeviceError, match="expected cpu, cuda or auto"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match="expected cpu, cuda or auto"):
        check_name("tpu")
    with pytest.raises(ValueError, match="device 'gpu'"):
        TrainConfig(device="gpu")
    # the name alone is checked when a configuration is read: CUDA is asked for when training starts
    assert TrainConfig(device="cuda").device == "cuda"
    assert TrainConfig(device="Auto").device == "auto"
    assert TrainConfig().device == "cpu"


# ---------------------------------------------------------------------------------------- the commands
@needs_no_cuda
@pytest.mark.parametrize("ranks", [1, 2])
def test_nanosil_driver_refuses_cuda_with_one_line_exit_2(models, ranks):
    cmd = [str(BIN / "nanosil-driver"), "--models", str(models), "--structure", str(cluster("pyroxene_N01_GM.xyz")),
           "--unix", "nobody", "--device", "cuda"]
    if ranks > 1:
        cmd = [str(BIN / "mpirun"), "-n", str(ranks), *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"nanosil-driver: error: {NO_CUDA}"]  # once per job


@needs_no_cuda
def test_nanosil_train_refuses_cuda_before_reading_anything(tmp_path):
    db = shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj")
    run = subprocess.run([str(BIN / "nanosil"), "train", "--db", str(db), "--out", str(tmp_path / "m"),
                          "--device", "cuda"], capture_output=True, text=True, timeout=120, env=CHILD_ENV)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"nanosil train: error: {NO_CUDA}"]
    assert not (tmp_path / "m").exists()


@needs_no_cuda
def test_batch_driver_evaluate_transferability_md_and_harmonic_refuse_cuda(models, tmp_path, capsys):
    from al_manager.cli import main
    from driver.ipi.batch_server import main as batch_main

    p1 = str(cluster("pyroxene_N01_GM.xyz"))
    db = str(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"))
    runs = {
        "nanosil-batch-driver": lambda: batch_main(["--models", str(models), "--target", f"x={p1}", "--device", "cuda"]),
        "nanosil evaluate": lambda: main(["evaluate", "--db", db, "--models", str(models), "--device", "cuda"]),
        "nanosil transferability": lambda: main(["transferability", db, "--models", str(models), "--out",
                                                 str(tmp_path / "t"), "--device", "cuda"]),
        "nanosil md": lambda: main(["md", p1, "--models", str(models), "-T", "300", "--ps", "0.1", "--out",
                                    str(tmp_path / "md"), "--device", "cuda"]),
        "nanosil harmonic": lambda: main(["harmonic", p1, "--models", str(models), "--out", str(tmp_path / "h"),
                                          "--device", "cuda"]),
    }
    threads = torch.get_num_threads()  # the batch driver sets its --threads in this process
    try:
        for prog, call in runs.items():
            assert call() == 2, prog
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"{prog}: error: {NO_CUDA}"], prog
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "md").exists() and not (tmp_path / "h").exists()


def test_device_option_is_on_every_model_command():
    from al_manager.cli import _SubcommandParser, _load
    from driver.ipi.batch_server import build_parser as batch_parser
    from driver.main import build_parser as driver_parser

    parsers = {"nanosil-driver": driver_parser(), "nanosil-batch-driver": batch_parser()}
    for name in ("train", "evaluate", "md", "transferability", "harmonic"):
        parsers[f"nanosil {name}"] = parser = _SubcommandParser(prog=f"nanosil {name}")
        _load(name).add_arguments(parser)
    for name, parser in parsers.items():
        (action,) = [a for a in parser._actions if "--device" in a.option_strings]
        assert tuple(action.choices) == CHOICES and action.default == "cpu", name


# ---------------------------------------------------------------------------------------- same numbers on the CPU
def test_cpu_by_the_option_gives_the_same_numbers(models):
    from driver.calculator import NanosilCalculator

    atoms = read(cluster("pyroxene_N02_GM.xyz"))
    before = load_committee(models, dtype=torch.float64)           # what every command did before --device
    ref = before.predict(atoms.numbers, atoms.positions)
    ref_batch = before.predict_batch([atoms.numbers] * 2, [atoms.positions, atoms.positions + 0.01])
    for device in ("cpu", "auto" if not torch.cuda.is_available() else "cpu", torch.device("cpu")):
        c = load_committee(models, dtype=torch.float64, device=device)
        assert c.device == torch.device("cpu")
        p = c.predict(atoms.numbers, atoms.positions)
        assert p.energy == ref.energy
        np.testing.assert_array_equal(p.member_energies, ref.member_energies)
        np.testing.assert_array_equal(p.member_forces, ref.member_forces)
        np.testing.assert_array_equal(p.member_dipoles, ref.member_dipoles)
        for a, b in zip(c.predict_batch([atoms.numbers] * 2, [atoms.positions, atoms.positions + 0.01]), ref_batch):
            np.testing.assert_array_equal(a.member_energies, b.member_energies)
            np.testing.assert_array_equal(a.member_forces, b.member_forces)
    moved = load_committee(models, dtype=torch.float32).to(torch.float64, "cpu")
    np.testing.assert_array_equal(moved.predict(atoms.numbers, atoms.positions).member_energies, ref.member_energies)
    calc = NanosilCalculator(str(models), device="cpu")
    plain = NanosilCalculator(str(models))
    a, b = atoms.copy(), atoms.copy()
    a.calc, b.calc = calc, plain
    assert a.get_potential_energy() == b.get_potential_energy() == ref.energy
    np.testing.assert_array_equal(calc.hessian(atoms), plain.hessian(atoms))
    np.testing.assert_array_equal(calc.dipole_derivatives(atoms), plain.dipole_derivatives(atoms))


def test_evaluate_table_is_the_same_with_device_cpu_and_auto(models, tmp_path, capsys):
    from al_manager.cli import main

    db = str(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"))
    tables = []
    for extra in ([], ["--device", "cpu"], ["--device", "auto"]):
        out = tmp_path / f"t{len(tables)}.json"
        assert main(["evaluate", "--db", db, "--models", str(models), "--json", str(out), *extra]) == 0
        tables.append(json.loads(out.read_text()))
    capsys.readouterr()
    if torch.cuda.is_available():
        tables = tables[:2]
    assert all(t == tables[0] for t in tables)


def test_training_on_cpu_by_the_option_is_the_same(tmp_path, p2_dft_frames):
    from driver.training import TrainConfig, train_committee

    settings = dict(committee=2, dipole_members=1, epochs=3, patience=3, batch_size=4, workers=2, progress="off",
                    model={"hidden": (16, 16), "dipole_features": 16, "dipole_interactions": 1, "dipole_gaussians": 8})
    frames = p2_dft_frames[:12]
    plain = train_committee(frames, tmp_path / "plain", TrainConfig(**settings))
    asked = train_committee(frames, tmp_path / "cpu", TrainConfig(**settings, device="cpu"))
    assert asked.device == torch.device("cpu")
    for name in ("energy_model", "dipole_model"):
        a, b = getattr(plain, name).state_dict(), getattr(asked, name).state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert plain.calibration == asked.calibration
    assert asked.metadata["train_config"]["device"] == "cpu"
    reloaded = torch.load(tmp_path / "cpu" / "energy.pt", weights_only=True, map_location="cpu")
    assert all(t.device.type == "cpu" for t in reloaded.values())


# ---------------------------------------------------------------------------------------- on the model's device
class SameDevice(TorchDispatchMode):
    """Records every ATen operation (forward and backward) that takes tensors on two devices (0-dim CPU
    scalars and the copies that move a tensor aside)."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        devices = {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func not in (torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default):
            self.mixed.append(str(func))
        return func(*args, **kwargs)


def test_pytorch_paths_make_no_tensor_off_the_models_device(monkeypatch):
    """Without a GPU: every PyTorch path (descriptor with and without the fast backward, per-member forces,
    dipoles, the calculator's Hessian, a training step of both kinds) on the 'meta' device, every ATen
    operation watched (:class:`SameDevice`): none may meet a CPU tensor, as none may on a GPU. The compiled
    descriptor and the OpenBLAS network are CPU-only and stay off."""
    try:
        import torch.fx.experimental._config as fx_config
        monkeypatch.setattr(fx_config, "meta_nonzero_assume_all_nonzero", True)  # the dipole model's pair list
    except (ImportError, AttributeError):
        pytest.skip("this torch cannot run nonzero() on the meta device")
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: True if a.device.type == "meta" else equal(a, b))
    from driver.models.committee import _dipole_model, _energy_model

    atoms = read(cluster("pyroxene_N01_GM.xyz"))
    config = ModelConfig(hidden=(16, 16), dipole_features=16, dipole_interactions=1, dipole_gaussians=8)
    c = build_committee(config, n_members=3, n_dipole=2, seed=0)
    meta = torch.device("meta")
    c.energy_model.to(meta)
    c.dipole_model.to(meta)
    member, dipole = _energy_model(config, 1).to(meta), _dipole_model(config, 1).to(meta)
    assert c.device == meta and not c.energy_model.can_infer()
    watch = SameDevice()
    with watch:
        _meta_paths(c, member, dipole, atoms, meta)
    assert watch.mixed == []


def _meta_paths(c, member, dipole, atoms, meta):
    from driver.calculator import NanosilCalculator
    from driver.models.geometry import Batch, make_batch
    from driver.training import _dipole_loss, _energy_and_forces, _Packed, _Tensors

    idx, positions = c.species_index(atoms.numbers), atoms.positions
    single, pos, _ = c._batch(atoms.numbers, positions, requires_grad=True)   # Committee.predict's batch
    assert {single.species.device, single.positions.device, pos.device} == {meta}
    assert {t.device for t in NanosilCalculator(c, dtype=c.dtype)._tensors(atoms)} == {meta}
    batch = make_batch([idx, idx], [positions, positions], device=meta)
    pos = batch.positions.requires_grad_(True)
    for fast in (False, True):
        (g,) = torch.autograd.grad(c.energy_model(batch, fast=fast).sum(), pos)
        assert g.device == meta
    k, (b, n) = 3, batch.species.shape
    rep = batch.positions.detach()[None].repeat(k, 1, 1, 1).requires_grad_(True)
    species = batch.species.repeat(k, 1)
    e = c.energy_model(Batch(species, rep.reshape(k * b, n, 3), species >= 0), per_member=True, fast=True)
    assert torch.autograd.grad(e.sum(), rep)[0].device == meta
    assert c.dipole_model(batch, 0.0).device == meta
    one = torch.as_tensor(idx).to(meta)[None]
    h = torch.autograd.functional.hessian(lambda flat: c.energy_model(Batch(one, flat.reshape(1, -1, 3), one >= 0))
                                          .mean(0).sum(), batch.positions.detach()[0].reshape(-1))
    assert h.device == meta
    data = _Tensors([idx, idx], [positions, positions + 0.01], np.zeros(2),
                    [np.zeros((len(idx), 3))] * 2, [np.zeros(3)] * 2)
    packed = _Packed(data, device=meta)
    step = packed.batch([0, 1])
    e, f = _energy_and_forces(member, step.structures, create_graph=True)
    loss = ((e - step.energy) ** 2).mean() + ((f - step.forces) ** 2).sum((-1, -2)).div(3 * step.n_atoms).mean()
    torch.autograd.backward(loss, inputs=[p for p in member.parameters() if p.requires_grad])
    assert member.layers[0].weight.grad.device == meta
    _dipole_loss(dipole, packed, [0, 1], 0.0).backward()
    assert dipole.embedding.grad.device == meta
