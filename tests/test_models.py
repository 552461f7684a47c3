"""Physics of the models: forces are minus the gradient, invariances, charge conservation, batching,
checkpoints, calibration and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.io import read
from scipy.spatial.transform import Rotation

from driver.models.committee import (MemberOutputs, build_committee, load_committee, save_committee)
from driver.models.gaussian_moments import n_features

from conftest import shared_file


@pytest.fixture
def committee(small_config):
    c = build_committee(small_config, n_members=3, n_dipole=2, seed=1).to(torch.float64)
    # Realistic output scale: untrained NTK networks give O(1) eV atomic energies.
    return c


@pytest.fixture
def p2():
    return read(shared_file("structures", "pyroxene_N02_GM.xyz"))


def test_default_sizes_are_the_papers():
    from driver.models.committee import ModelConfig
    from driver.models.energy_model import EnergyModel

    cfg = ModelConfig()
    assert n_features(cfg.n_radial) == 360 and cfg.n_basis == 7 and cfg.cutoff == 5.0 and cfg.r_min == 0.5
    model = EnergyModel(3)
    sizes = [tuple(layer.weight.shape[1:]) for layer in model.layers]
    assert sizes == [(360, 512), (512, 512), (512, 1)]


def test_forces_are_minus_the_finite_difference_gradient(committee, p2):
    pred = committee.predict(p2.numbers, p2.positions)
    h = 1e-5
    rng = np.random.default_rng(0)
    for i, a in [(0, 0), (3, 1), (7, 2), (int(rng.integers(len(p2))), int(rng.integers(3)))]:
        plus, minus = p2.positions.copy(), p2.positions.copy()
        plus[i, a] += h
        minus[i, a] -= h
        fd = -(committee.predict(p2.numbers, plus).member_energies
               - committee.predict(p2.numbers, minus).member_energies) / (2 * h)
        np.testing.assert_allclose(pred.member_forces[:, i, a], fd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pred.forces, pred.member_forces.mean(0), rtol=1e-12)
    # The cheaper single-backward path gives the same mean force.
    mean_only = committee.predict(p2.numbers, p2.positions, member_forces=False)
    np.testing.assert_allclose(mean_only.forces, pred.forces, rtol=1e-9, atol=1e-12)


def test_rotation_translation_permutation(committee, p2):
    ref = committee.predict(p2.numbers, p2.positions)
    rot = Rotation.random(random_state=3).as_matrix()
    perm = np.random.default_rng(1).permutation(len(p2))
    pos = (p2.positions @ rot.T + np.array([1.7, -3.2, 0.4]))[perm]
    new = committee.predict(p2.numbers[perm], pos)
    np.testing.assert_allclose(new.member_energies, ref.member_energies, rtol=1e-10)
    np.testing.assert_allclose(new.forces, (ref.forces @ rot.T)[perm], atol=1e-9)
    np.testing.assert_allclose(new.member_dipoles, ref.member_dipoles @ rot.T, atol=1e-9)
    assert new.energy_std_per_atom == pytest.approx(ref.energy_std_per_atom, rel=1e-8)
    assert new.max_force_std == pytest.approx(ref.max_force_std, rel=1e-8)


def test_charges_sum_to_total_charge_and_dipole_is_origin_independent(committee, p2):
    from driver.models.geometry import make_batch

    idx = committee.species_index(p2.numbers)
    q = committee.dipole_model.charges(make_batch([idx], [p2.positions], dtype=torch.float64))
    np.testing.assert_allclose(q.sum(-1).detach().numpy(), 0.0, atol=1e-12)
    assert q.detach().abs().max() > 1e-3  # charges are not trivially zero
    shifted = committee.predict(p2.numbers, p2.positions + 25.0)
    base = committee.predict(p2.numbers, p2.positions)
    np.testing.assert_allclose(shifted.dipole, base.dipole, atol=1e-10)
    # mu = sum_i q_i r_i with the neutral charges
    mu = (q[0, 0].detach().numpy()[:, None] * p2.positions).sum(0)
    np.testing.assert_allclose(base.member_dipoles[0], mu, atol=1e-10)


def test_committee_batched_equals_members_separately(committee, p2):
    p1 = read(shared_file("structures", "pyroxene_N01_GM.xyz"))
    whole = committee.predict(p2.numbers, p2.positions)
    for k in range(3):
        alone = committee.subset([k], []).predict(p2.numbers, p2.positions)
        assert alone.energy == pytest.approx(whole.member_energies[k], rel=1e-12)
        np.testing.assert_allclose(alone.forces, whole.member_forces[k], atol=1e-10)
    # Statistics as documented: ddof=1, per atom, calibrated.
    committee.calibration = {"energy": 2.0, "forces": 0.5}
    stats = committee.predict(p2.numbers, p2.positions)
    assert stats.energy_std_per_atom == pytest.approx(2.0 * np.std(whole.member_energies, ddof=1) / len(p2))
    per_atom = np.sqrt(whole.member_forces.var(0, ddof=1).sum(-1))
    assert stats.max_force_std == pytest.approx(0.5 * per_atom.max())
    assert stats.dipole_std == pytest.approx(np.sqrt(whole.member_dipoles.var(0, ddof=1).sum()))
    # Rank-0 style reduction of parts equals the whole.
    parts = [committee.subset([0], [0]).member_outputs(p2.numbers, p2.positions),
             committee.subset([1, 2], [1]).member_outputs(p2.numbers, p2.positions)]
    merged = committee.summarize(MemberOutputs.concatenate(parts), len(p2))
    assert merged.energy == pytest.approx(stats.energy, rel=1e-12)
    np.testing.assert_allclose(merged.dipole, stats.dipole, atol=1e-12)
    # Mixed sizes in one padded pass equal one-by-one predictions.
    batched = committee.predict_batch([p1.numbers, p2.numbers], [p1.positions, p2.positions])
    single = committee.predict(p1.numbers, p1.positions)
    assert batched[0].energy == pytest.approx(single.energy, rel=1e-10)
    np.testing.assert_allclose(batched[0].forces, single.forces, atol=1e-9)
    np.testing.assert_allclose(batched[1].forces, stats.forces, atol=1e-9)
    np.testing.assert_allclose(batched[1].dipole, stats.dipole, atol=1e-10)


def test_checkpoint_round_trip(committee, p2, tmp_path):
    committee.calibration = {"energy": 1.7, "forces": 2.1}
    committee.energy_shift = np.array([-100.0, -200.0, -300.0])
    save_committee(committee, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "committee.json").read_text())
    assert meta["species"] == ["Mg", "Si", "O"] and meta["calibration"]["forces"] == 2.1
    assert meta["units"]["energy"] == "eV"
    loaded = load_committee(tmp_path / "m", dtype=torch.float64)
    a, b = committee.predict(p2.numbers, p2.positions), loaded.predict(p2.numbers, p2.positions)
    assert a.energy == b.energy and np.array_equal(a.forces, b.forces) and np.array_equal(a.dipole, b.dipole)
    assert a.energy_std_per_atom == b.energy_std_per_atom
    # Saving again over an existing folder swaps it atomically and leaves no temporary folders behind.
    save_committee(loaded, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    meta["format_version"] = 99
    (tmp_path / "m" / "committee.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99 is incompatible"):
        load_committee(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no committee.json"):
        load_committee(tmp_path)


def test_bad_input_is_named(committee, p2):
    numbers = p2.numbers.copy()
    numbers[2] = 26
    with pytest.raises(ValueError, match=r"element Fe in cluster.xyz is not supported.*Mg, Si, O"):
        committee.validate(numbers, p2.positions, source="cluster.xyz")
    close = p2.positions.copy()
    close[1] = close[0] + [0.3, 0, 0]
    with pytest.raises(ValueError, match=r"atoms 0 and 1 .* 0.300 Å apart"):
        committee.validate(p2.numbers, close)
    nan = p2.positions.copy()
    nan[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        committee.validate(p2.numbers, nan)
    with pytest.raises(ValueError, match="between 1 and 8"):
        build_committee(n_members=9)


def test_calibration_makes_normalised_errors_unit(small_config, p2_dft_frames, tmp_path):
    from driver.training import calibrate

    c = build_committee(small_config, n_members=3, n_dipole=0, seed=2).to(torch.float64)
    frames = p2_dft_frames[:8]
    alpha = calibrate(c, frames)
    c.calibration = alpha
    ratios = []
    for f in frames:
        p = c.predict(f.numbers, f.positions)
        sigma = alpha["energy"] * np.std(p.member_energies, ddof=1)
        ratios.append((p.energy - f.energy) ** 2 / sigma**2)
    assert np.mean(ratios) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("kernels", ["c", "torch"])
def test_fast_inference_path_equals_plain_autograd(committee, p2, kernels, monkeypatch):
    """The inference path (the compiled descriptor, or its PyTorch twin with the hand-written backward of
    the neighbour sums) gives the same energies, per-member forces and mean forces as plain autograd, on
    a padded batch of two clusters; and the contraction tables of the invariants give the features of
    the readable one-einsum-per-contraction definition."""
    from driver.models import fast_kernels

    if kernels == "c" and not fast_kernels.AVAILABLE:
        pytest.skip("the C extension driver.models._gm_kernels is not built (no compiler at install)")
    monkeypatch.setattr(fast_kernels, "AVAILABLE", kernels == "c")
    from driver.models.gaussian_moments import SYMMETRIC_TO_FULL, invariants_cartesian
    from driver.models.geometry import Batch, make_batch

    p1 = read(shared_file("structures", "olivine_N01_GM.xyz"))
    rng = np.random.default_rng(4)
    pos = [p1.positions + rng.normal(scale=0.1, size=p1.positions.shape), p2.positions]
    batch = make_batch([committee.species_index(p1.numbers), committee.species_index(p2.numbers)], pos,
                       dtype=torch.float64)
    model, k = committee.energy_model, committee.n_energy_members
    for per_member in (False, True):
        species = batch.species.repeat(k, 1) if per_member else batch.species
        start = batch.positions.repeat(k, 1, 1) if per_member else batch.positions
        results = []
        for fast in (False, True):
            positions = start.clone().requires_grad_(True)
            energy = model(Batch(species, positions, species >= 0), per_member=per_member, fast=fast)
            (grad,) = torch.autograd.grad(energy.sum(), positions)
            results.append((energy.detach(), grad))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-10, atol=1e-12)
    # the features against the Cartesian definition of the table
    d = model.descriptor
    m = d.shared_moments(batch)
    c = d.coefficients.reshape(k, 3, -1, d.n_radial)[:, batch.species.clamp(min=0)] / np.sqrt(d.n_basis)
    psi = torch.einsum("kbiqs,biqm->kbism", c, m)
    reference = invariants_cartesian(psi[..., SYMMETRIC_TO_FULL], d.index)
    torch.testing.assert_close(d(batch), reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gemm", ["torch", "openblas"])
def test_inference_network_equals_autograd_in_float32(small_config, p2, gemm, monkeypatch):
    """The inference path (the network's hand-written input gradient, in either GEMM library, and no autograd
    where the compiled descriptor is built) gives autograd's energies, per-member and mean forces to float32
    rounding, one cluster and a padded batch of two; the paper-size network included."""
    from driver.models import atomic_network
    from driver.models.committee import ModelConfig

    p1 = read(shared_file("structures", "olivine_N01_GM.xyz"))
    for config in (small_config, ModelConfig()):
        c = build_committee(config, n_members=3, n_dipole=0, seed=3)            # float32, as in production
        outputs = {}
        for mode in ("autograd", gemm):
            monkeypatch.setenv("NANOSIL_GEMM", mode)
            assert atomic_network.chosen(c.energy_model) == mode
            outputs[mode] = (c.member_outputs(p2.numbers, p2.positions, dipoles=False),
                             c.member_outputs(p2.numbers, p2.positions, member_forces=False, dipoles=False),
                             c.subset([1], []).member_outputs(p2.numbers, p2.positions, dipoles=False),
                             c.predict_batch([p1.numbers, p2.numbers], [p1.positions, p2.positions], dipoles=False),
                             c.member_outputs(p2.numbers, p2.positions, forces=False, dipoles=False))
        (ref, ref_mean, ref_one, ref_batch, ref_e), (new, new_mean, new_one, new_batch, new_e) = outputs.values()
        scale = np.abs(ref.forces).max()
        for a, b in ((ref, new), (ref_one, new_one), (ref_e, new_e)):
            np.testing.assert_allclose(b.energies, a.energies, rtol=1e-6, atol=1e-5)
        for a, b in ((ref.forces, new.forces), (ref_mean.mean_forces, new_mean.mean_forces),
                     (ref_one.forces, new_one.forces)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale)
        assert new_e.forces is None and new_e.mean_forces is None
        for a, b in zip(ref_batch, new_batch):
            np.testing.assert_allclose(b.member_energies, a.member_energies, rtol=1e-6, atol=1e-5)
            np.testing.assert_allclose(b.member_forces, a.member_forces, rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(new_batch[1].member_forces, new.forces, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("gemm", ["torch", "openblas"])
def test_inference_network_function_equals_autograd(small_config, p2, gemm, monkeypatch):
    """The autograd Function of the inference network (the PyTorch-descriptor path, ``fast=True``) gives
    autograd's energies and input gradient; float64 models run it in torch whatever is asked."""
    from driver.models import atomic_network
    from driver.models.geometry import make_batch

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        c = build_committee(small_config, n_members=2, n_dipole=0, seed=5).to(dtype)
        model = c.energy_model
        monkeypatch.setenv("NANOSIL_GEMM", gemm)
        assert atomic_network.chosen(model) == (gemm if dtype == torch.float32 else "torch")
        batch = make_batch([c.species_index(p2.numbers)], [p2.positions], dtype=dtype)
        g = model.features(batch).reshape(2, len(p2), -1).detach().requires_grad_(True)
        out = atomic_network.atomic_outputs(model, g)
        cotangent = torch.randn_like(out)
        (grad,) = torch.autograd.grad((out * cotangent).sum(), g)
        x = (g - model.feature_mean) / model.feature_std
        for layer in model.layers[:-1]:
            x = torch.nn.functional.silu(layer(x))
        ref = model.layers[-1](x)[..., 0]
        (ref_grad,) = torch.autograd.grad((ref * cotangent).sum(), g)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())


def test_inference_network_follows_the_weights_and_leaves_training_to_autograd(small_config, p2, monkeypatch):
    """The prepared weights are rebuilt when a weight changes in place; a model whose weights take gradients
    (training) runs autograd through its layers even with ``fast=True``, and its weights get gradients."""
    from driver.models.geometry import make_batch

    monkeypatch.setenv("NANOSIL_GEMM", "torch")
    c = build_committee(small_config, n_members=1, n_dipole=0, seed=6)
    before = c.member_outputs(p2.numbers, p2.positions, dipoles=False)
    with torch.no_grad():
        c.energy_model.layers[1].weight.mul_(1.5)
    after = c.member_outputs(p2.numbers, p2.positions, dipoles=False)
    monkeypatch.setenv("NANOSIL_GEMM", "autograd")
    ref = c.member_outputs(p2.numbers, p2.positions, dipoles=False)
    assert not np.allclose(after.energies, before.energies)
    np.testing.assert_allclose(after.energies, ref.energies, rtol=1e-6)
    np.testing.assert_allclose(after.forces, ref.forces, rtol=1e-5, atol=1e-6)

    monkeypatch.setenv("NANOSIL_GEMM", "torch")
    model = c.energy_model.train().requires_grad_(True)
    assert model.network_trainable() and not model.can_infer()
    batch = make_batch([c.species_index(p2.numbers)], [p2.positions])
    positions = batch.positions.requires_grad_(True)
    energy = model(batch, fast=True).sum()
    (force,) = torch.autograd.grad(energy, positions, create_graph=True)
    (force ** 2).sum().backward()  # the force loss of training: second derivatives through the layers
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in model.layers)


def test_gemm_auto_prefers_torch_unless_openblas_is_clearly_faster(small_config, monkeypatch):
    from driver.models import atomic_network

    model = build_committee(small_config, n_members=2, n_dipole=0, seed=7).energy_model
    calibrate = atomic_network.calibrate
    monkeypatch.setenv("NANOSIL_GEMM", "auto")
    for times, expected in (({"torch": 1.0, "openblas": 0.95}, "torch"),
                            ({"torch": 1.0, "openblas": 0.7}, "openblas"),
                            ({"torch": 1.0, "openblas": 1.3}, "torch")):
        monkeypatch.setattr(atomic_network, "_choice", {})
        monkeypatch.setattr(atomic_network, "calibrate", lambda m, times=times: times)
        assert atomic_network.chosen(model) == expected
    assert atomic_network.chosen(model.double()) == "torch"  # OpenBLAS is float32 only
    monkeypatch.setenv("NANOSIL_GEMM", "mkl")
    with pytest.raises(ValueError, match="NANOSIL_GEMM='mkl'"):
        atomic_network.requested()
    times = calibrate(model.float(), atoms=8, rounds=1, repeat=1)  # the real timing runs
    assert set(times) == {"torch", "openblas"} and all(t > 0 for t in times.values())
