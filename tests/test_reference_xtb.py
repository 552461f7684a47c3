"""GFN2-xTB backend (tblite): labels of real clusters, forces = -dE/dx, dipole physics, input checks,
relaxation and harmonic IR through ASE Infrared (with the km/mol unit factor checked independently)."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from ase import Atoms
from ase.units import Debye

from al_manager.reference import HarmonicIR, Label, ReferenceError, get_backend
from spectra.constants import KM_MOL_PER_D2_A2_AMU

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STRUCTURES = SHARED / "structures"


def _read(name: str) -> Atoms:
    from ase.io import read

    path = STRUCTURES / name
    if not path.exists():
        pytest.skip(f"shared reference data not found: {path}")
    return read(str(path))


@pytest.fixture(scope="module")
def xtb():
    return get_backend("xtb")


@pytest.mark.parametrize("name,n_atoms", [("pyroxene_N01_GM.xyz", 5), ("olivine_N01_GM.xyz", 7)])
def test_labels_p1_o1(xtb, name, n_atoms):
    atoms = _read(name)
    lab = xtb.label(atoms)
    assert isinstance(lab, Label)
    assert xtb.method == "xtb:GFN2-xTB"
    assert lab.forces.shape == (n_atoms, 3) and lab.dipole.shape == (3,)
    # GFN2 total energies of these clusters: about -80 eV per atom
    assert -100 < lab.energy / n_atoms < -60
    # an isolated cluster: no net force
    np.testing.assert_allclose(lab.forces.sum(axis=0), 0.0, atol=1e-6)
    # polar clusters; tblite's dipole is e·Å (GFN2 gives 7.6-7.8 D for MgSiO3, PBE0 11.9 D)
    mu_debye = np.linalg.norm(lab.dipole) / Debye
    assert 3.0 < mu_debye < 15.0


def test_forces_are_minus_energy_gradient(xtb):
    from ase.calculators.fd import calculate_numerical_forces

    atoms = _read("pyroxene_N01_GM.xyz")
    atoms.rattle(0.05, seed=3)  # off the minimum, forces of order 1 eV/Å
    lab = xtb.label(atoms)
    work = atoms.copy()
    work.calc = xtb.calculator()
    numerical = calculate_numerical_forces(work, eps=1e-4)
    assert np.abs(lab.forces).max() > 0.1
    np.testing.assert_allclose(lab.forces, numerical, atol=2e-3)


def test_dipole_origin_independent_for_neutral_and_shifts_by_qt_when_charged():
    atoms = _read("olivine_N01_GM.xyz")
    shift = np.array([5.0, -3.0, 7.0])
    moved = atoms.copy()
    moved.positions += shift
    neutral = get_backend("xtb")
    np.testing.assert_allclose(neutral.label(moved).dipole, neutral.label(atoms).dipole, atol=1e-8)
    charged = get_backend("xtb", charge=2)  # mu(r + t) = mu(r) + q t for a charged cluster
    np.testing.assert_allclose(charged.label(moved).dipole - charged.label(atoms).dipole, 2 * shift, atol=1e-8)


def test_dipole_rotates_with_the_cluster(xtb):
    atoms = _read("pyroxene_N01_GM.xyz")
    rotated = atoms.copy()
    rotated.rotate(37.0, (1.0, 2.0, 0.5), center=(0, 0, 0))
    R = np.linalg.lstsq(atoms.positions, rotated.positions, rcond=None)[0]  # row-vector rotation
    np.testing.assert_allclose(xtb.label(rotated).dipole, xtb.label(atoms).dipole @ R, atol=1e-6)


def test_bad_input_is_refused_naming_the_frame(xtb):
    atoms = _read("pyroxene_N01_GM.xyz")
    close = atoms.copy()
    close.positions[1] = close.positions[0] + [0.3, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"frame 7: atoms 0 \(Mg\) and 1 \(O\) are 0.300 Å apart"):
        xtb.check(close, frame="frame 7")
    odd = atoms + Atoms("H", positions=[[0.0, 0.0, 4.0]])
    with pytest.raises(ValueError, match="frame 2: odd number of electrons"):
        xtb.check(odd, frame="frame 2")
    odd.info["multiplicity"] = 2
    assert xtb.check(odd, frame="frame 2") == (0, 2)
    uranium = Atoms("UO2", positions=[[0, 0, 0], [1.8, 0, 0], [-1.8, 0, 0]])
    with pytest.raises(ValueError, match="frame 0: element U is not available"):
        xtb.check(uranium, frame="frame 0")
    with pytest.raises(ValueError, match="unknown reference backend"):
        get_backend("gaussian")


def test_scf_failure_is_a_reference_error(xtb):
    atoms = _read("pyroxene_N01_GM.xyz")
    centre = atoms.positions.mean(axis=0)
    away = atoms.positions[0] - centre
    atoms.positions[0] += 10.0 * away / np.linalg.norm(away)  # Mg pulled 10 Å off: the SCF cannot converge
    with pytest.raises(ReferenceError, match="SCF not converged"):
        xtb.label(atoms)


def test_relax_and_harmonic_ir_in_km_per_mol(xtb):
    atoms = _read("pyroxene_N01_GM.xyz")
    relaxed = xtb.relax(atoms, fmax=1e-3)
    assert np.abs(relaxed.get_forces()).max() < 1e-3
    assert relaxed.get_potential_energy() < xtb.label(atoms).energy
    har = xtb.harmonic(relaxed, delta=0.01)
    assert isinstance(har, HarmonicIR)
    n = len(relaxed)
    assert har.frequencies.shape == (3 * n,) and har.intensities.shape == (3 * n,)
    assert har.modes.shape == (3 * n, n, 3)
    assert np.all(np.diff(har.frequencies) >= 0)
    # 6 translations/rotations near zero, 9 real vibrations of a bound cluster
    assert np.all(np.abs(har.frequencies[:6]) < 60.0)
    vib = har.frequencies[6:]
    assert np.all(vib > 100.0) and vib.max() < 1500.0
    # independent check of the intensity unit: displace along the strongest mode (ASE convention:
    # Cartesian displacement per unit normal coordinate, Å per Å·amu^1/2) and differentiate the dipole
    k = int(np.argmax(har.intensities))
    s = 0.005
    plus, minus = relaxed.copy(), relaxed.copy()
    plus.positions += s * har.modes[k]
    minus.positions -= s * har.modes[k]
    dmu_dq = (xtb.label(plus).dipole - xtb.label(minus).dipole) / (2 * s)  # e / amu^1/2
    expected = np.sum(dmu_dq**2) / Debye**2 * KM_MOL_PER_D2_A2_AMU  # (D/Å)^2/amu -> km/mol
    assert har.intensities[k] > 50.0
    assert har.intensities[k] == pytest.approx(expected, rel=0.03)
