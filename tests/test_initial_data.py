"""Initial data with real GFN2-xTB on P1: normal modes (mass-orthonormal, thermal amplitudes that cost k_B T),
farthest point sampling (spread-out picks, the minimum first) and the 3N + 1 structures of the paper."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from ase import units
from ase.io import read

from al_manager.learning import fps, normal_modes
from al_manager.learning.initial_data import InitialDataSettings, initial_data_from_file, make_initial_data
from al_manager.reference import get_backend

STRUCTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "structures"


def _paper_file(name: str) -> Path:
    path = STRUCTURES / name
    if not path.exists():
        pytest.skip(f"reference data {path} not available (../shared/data is absent)")
    return path


@pytest.fixture(scope="module")
def xtb():
    return get_backend("xtb")


@pytest.fixture(scope="module")
def p1(xtb):
    """P1 relaxed with xTB, its harmonic analysis and its energy."""
    minimum = xtb.relax(read(str(_paper_file("pyroxene_N01_GM.xyz"))), fmax=0.005)
    har = xtb.harmonic(minimum)
    return minimum, har, xtb.label(minimum).energy


# ---------------------------------------------------------------------------- farthest point sampling
def test_fps_on_points_of_a_line():
    x = np.arange(11.0)[:, None]          # 0, 1, ..., 10
    assert list(fps.farthest_point_sampling(x, 3, first=0)) == [0, 10, 5]
    assert list(fps.farthest_point_sampling(x, 2, first=4)) == [4, 10]
    assert sorted(fps.farthest_point_sampling(x, 50)) == list(range(11))    # n >= M: everything
    assert len(fps.farthest_point_sampling(x, 0)) == 0
    with pytest.raises(ValueError, match="first=11"):
        fps.farthest_point_sampling(x, 2, first=11)


def test_fps_groups_take_turns():
    """With groups, each pick is the farthest row of the next group in turn (ascending labels): the cold group
    near the start keeps its share, where plain FPS goes out to the far group first."""
    x = np.arange(11.0)[:, None]
    groups = np.array([-1, 100, 100, 100] + [1500] * 7)   # rows 1-3 near row 0, rows 4-10 far out
    assert list(fps.farthest_point_sampling(x, 5, first=0)) == [0, 10, 5, 2, 7]
    assert list(fps.farthest_point_sampling(x, 5, first=0, groups=groups)) == [0, 3, 10, 1, 6]
    # a group that runs out is skipped: the rest of the picks go to the other one
    picked = fps.farthest_point_sampling(x, 11, first=0, groups=groups)
    assert sorted(picked) == list(range(11)) and list(picked[:7]) == [0, 3, 10, 1, 6, 2, 8]
    with pytest.raises(ValueError, match="one label per structure"):
        fps.farthest_point_sampling(x, 3, groups=groups[:5])


def test_global_descriptor_is_invariant(p1):
    minimum = p1[0]
    moved = minimum[[3, 1, 4, 0, 2]]
    moved.rotate(71, "y")
    moved.translate([1.0, -2.0, 0.5])
    a, b = fps.global_descriptor([minimum, moved])
    np.testing.assert_allclose(a, b, atol=1e-9)
    other = minimum.copy()
    other.positions[1] += [0.1, 0.0, 0.0]
    assert np.linalg.norm(fps.global_descriptor([other])[0] - a) > 1e-4


# ---------------------------------------------------------------------------- normal modes
def test_p1_modes_are_mass_orthonormal_and_real(p1):
    minimum, har, _ = p1
    n = len(minimum)
    assert har.modes.shape == (3 * n, n, 3)
    m = minimum.get_masses()
    # mass-weighted-normalised modes (ASE convention): sum_i m_i x_k,i . x_l,i = delta_kl
    gram = np.einsum("kia,i,lia->kl", har.modes, m, har.modes)
    np.testing.assert_allclose(gram, np.eye(3 * n), atol=1e-6)
    vib = normal_modes.vibrational_indices(har.frequencies, minimum)
    assert len(vib) == 3 * n - 6
    assert har.frequencies[vib].min() > 50.0          # a relaxed minimum: no imaginary or soft spurious mode
    rigid = np.setdiff1d(np.arange(3 * n), vib)
    assert np.abs(har.frequencies[rigid]).max() < har.frequencies[vib].min()


def test_thermal_amplitudes_cost_kT(p1, xtb):
    """At the turning points of the 100 K amplitude a mode holds k_B * 100 K of harmonic energy: the real
    xTB energy, averaged over both signs (odd anharmonic terms cancel), agrees within 5% (measured: 0-3%)."""
    minimum, har, e0 = p1
    cands = normal_modes.displacements(minimum, har.frequencies, har.modes, temperatures=[100.0],
                                       max_displacement=10.0, n_random=0)
    vib = normal_modes.vibrational_indices(har.frequencies, minimum)
    assert len(cands) == 2 * len(vib)
    kT = units.kB * 100.0
    for plus, minus in zip(cands[0::2], cands[1::2]):
        assert plus.mode == minus.mode and (plus.sign, minus.sign) == (1, -1)
        np.testing.assert_allclose(plus.positions - minimum.positions, minimum.positions - minus.positions, atol=1e-12)
        # the harmonic model of the displacement is exactly k_B T (mass-orthonormal modes) ...
        assert normal_modes.harmonic_energy(har.frequencies, har.modes, minimum.get_masses(),
                                            plus.positions - minimum.positions) == pytest.approx(kT, rel=1e-6)
        # ... and the reference energy agrees
        e = [xtb.label(minimum.__class__(numbers=minimum.numbers, positions=c.positions)).energy - e0
             for c in (plus, minus)]
        assert np.mean(e) == pytest.approx(kT, rel=0.05), (plus.mode, har.frequencies[plus.mode], e)


def test_displacement_cap(p1):
    minimum, har, _ = p1
    cands = normal_modes.displacements(minimum, har.frequencies, har.modes, temperatures=[300.0, 3000.0],
                                       max_displacement=0.1, n_random=5)
    largest = [np.linalg.norm(c.positions - minimum.positions, axis=1).max() for c in cands]
    assert max(largest) <= 0.1 + 1e-12
    assert any(c.scale < 1.0 for c in cands) and any(c.scale == 1.0 for c in cands)
    assert sum(c.mode == -1 for c in cands) == 5


# ---------------------------------------------------------------------------- the initial data
@pytest.fixture(scope="module")
def initial(xtb):
    logs = []
    frames = initial_data_from_file("P1", _paper_file("pyroxene_N01_GM.xyz"), xtb, InitialDataSettings(),
                                    log=logs.append)
    return frames, logs


def test_count_and_tags(initial, p1):
    frames, logs = initial
    minimum = p1[0]
    n = len(minimum)
    assert len(frames) == 3 * n + 1                       # the paper: 3 x N_atoms + the minimum
    assert frames[0].info["origin"] == "minimum"          # FPS starts from the minimum
    assert all(f.info["origin"] == "normal_modes" for f in frames[1:])
    assert all(f.info["cluster"] == "P1" for f in frames)
    assert np.abs(xtb_forces(frames[0])).max() < 0.02     # the minimum is relaxed
    assert len({tuple(np.round(f.positions, 6).ravel()) for f in frames}) == len(frames)  # no duplicates
    assert any("vibrational modes" in line for line in logs)
    # every amplitude keeps its share (15 picks, 5 temperatures), and the log says so
    temps = [f.info["mode_temperature"] for f in frames[1:]]
    assert {t: temps.count(t) for t in set(temps)} == {t: 3 for t in InitialDataSettings().temperatures}
    assert any("FPS kept 3 at 100 K, 3 at 300 K" in line for line in logs)
    for f in frames[1:]:
        assert np.linalg.norm(f.positions - frames[0].positions, axis=1).max() <= 0.3 + 1e-9


def test_one_fps_over_all_temperatures_keeps_fewer_cold_picks(p1, xtb):
    """``balance_temperatures = false`` (the paper's single FPS): the farthest candidates win, so fewer of
    the coldest displacements are kept than the balanced share, and no share is logged."""
    minimum = p1[0]
    logs = []
    plain = make_initial_data(minimum, xtb, InitialDataSettings(relax=False, balance_temperatures=False),
                              log=logs.append)
    assert sum(f.info["mode_temperature"] == 100.0 for f in plain[1:]) < 3
    assert not any("FPS kept" in line for line in logs)


def xtb_forces(atoms):
    return get_backend("xtb").label(atoms).forces


def test_selected_structures_have_sane_energies(initial, xtb):
    frames, _ = initial
    e0 = xtb.label(frames[0]).energy
    de = np.array([xtb.label(f).energy - e0 for f in frames[1:]])
    # displaced from a minimum: above it, by at most ~k_B T(1500 K) per mode (9 modes: 1.2 eV), plus anharmonicity
    assert de.min() > 0.0
    assert de.max() < 2.0
    assert np.median(de) > 0.02     # farthest points, not the 100 K ones only


def test_fps_spreads_the_selection(p1):
    """On the real candidate pool, FPS's subset has a larger minimum pairwise descriptor distance than
    random subsets of the same size."""
    minimum, har, _ = p1
    s = InitialDataSettings()
    cands = normal_modes.displacements(minimum, har.frequencies, har.modes, temperatures=s.temperatures,
                                       max_displacement=s.max_displacement, n_random=s.n_random,
                                       rng=np.random.default_rng(0))
    pool = [minimum] + [minimum.__class__(numbers=minimum.numbers, positions=c.positions) for c in cands]
    x = fps.global_descriptor(pool)
    k = 3 * len(minimum) + 1
    chosen = fps.farthest_point_sampling(x, k, first=0)
    assert chosen[0] == 0 and len(set(chosen)) == k
    d_fps = fps.min_pairwise_distance(x, chosen)
    rng = np.random.default_rng(1)
    d_random = [fps.min_pairwise_distance(x, np.r_[0, rng.choice(np.arange(1, len(pool)), k - 1, replace=False)])
                for _ in range(200)]
    assert d_fps > max(d_random)
    # and it covers the pool: every candidate is closer to the selection than the selection's spacing
    cover = max(min(np.linalg.norm(x[i] - x[j]) for j in chosen) for i in range(len(pool)))
    assert cover <= d_fps + 1e-9


def test_make_initial_data_without_relaxation_keeps_the_input_minimum(p1, xtb, tmp_path):
    minimum = p1[0]
    frames = make_initial_data(minimum, xtb, InitialDataSettings(relax=False, n_select=5, n_random=0),
                               name="P1", workdir=tmp_path / "harmonic")
    assert len(frames) == 6
    np.testing.assert_allclose(frames[0].positions, minimum.positions)
    assert any(tmp_path.joinpath("harmonic").iterdir())   # the harmonic analysis cached its displacements
    assert all(f.info["mode"] >= 0 for f in frames[1:])
