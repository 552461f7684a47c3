"""Harmonic IR: ASE Infrared vs exact derivatives, ORCA's own numbers, MD-vs-harmonic consistency, the ML model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

from spectra.autocorrelation import SpectrumOptions, run_spectrum
from spectra.compare import compare_harmonic
from spectra.harmonic import (
    HarmonicIR,
    harmonic_ase,
    harmonic_autograd,
    harmonic_from_derivatives,
    harmonic_ir,
    read_harmonic,
    write_harmonic,
)

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


class SpringCharges(Calculator):
    """Harmonic bonds (E = k/2 (d - d0)^2, eV and Å) and fixed charges (e): analytic Hessian and dipole derivatives.

    d0 are the distances of the reference structure, so that structure is a minimum.
    """

    implemented_properties = ["energy", "forces", "dipole"]

    def __init__(self, reference: Atoms, bonds, charges, **kw):
        super().__init__(**kw)
        self.bonds = [(i, j, k) for i, j, k in bonds]
        r = reference.get_positions()
        self.d0 = np.array([np.linalg.norm(r[i] - r[j]) for i, j, _ in self.bonds])
        self.charges = np.asarray(charges, dtype=float)

    def energy_forces(self, r):
        e = 0.0
        f = np.zeros_like(r)
        for (i, j, k), d0 in zip(self.bonds, self.d0):
            b = r[i] - r[j]
            d = np.linalg.norm(b)
            e += 0.5 * k * (d - d0) ** 2
            g = k * (d - d0) * b / d
            f[i] -= g
            f[j] += g
        return e, f

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        r = self.atoms.get_positions()
        e, f = self.energy_forces(r)
        self.results = {"energy": e, "forces": f, "dipole": self.charges @ r}

    def hessian(self, atoms):
        r = atoms.get_positions()
        n = len(r)
        h = np.zeros((3 * n, 3 * n))
        for (i, j, k), d0 in zip(self.bonds, self.d0):
            b = r[i] - r[j]
            d = np.linalg.norm(b)
            u = b / d
            block = k * (np.outer(u, u) + (d - d0) / d * (np.eye(3) - np.outer(u, u)))
            for a, c, sign in ((i, i, 1), (j, j, 1), (i, j, -1), (j, i, -1)):
                h[3 * a:3 * a + 3, 3 * c:3 * c + 3] += sign * block
        return h

    def dipole_derivatives(self, atoms):
        return self.charges[:, None, None] * np.eye(3)[None, :, :]


def spring_molecule():
    """A rigid, asymmetric 4-atom 'MgSiO2' tetrahedron with six springs of different stiffness (eV/Å^2)."""
    atoms = Atoms("MgOSiO", positions=[[0.0, 0.0, 0.0], [1.9, 0.1, 0.0], [0.8, 1.6, 0.2], [0.7, 0.5, 1.5]])
    bonds = [(0, 1, 21.7), (0, 2, 5.3), (0, 3, 21.9), (1, 2, 20.9), (1, 3, 8.0), (2, 3, 20.1)]  # modes >= 110 cm^-1 apart
    calc = SpringCharges(atoms, bonds, charges=[0.9, -0.6, 1.1, -1.4])
    return atoms, calc


def test_ase_infrared_equals_exact_derivatives_with_unit_factor(tmp_path):
    atoms, calc = spring_molecule()
    exact = harmonic_autograd(atoms, calc)
    fd = harmonic_ase(atoms, calc, delta=0.005, workdir=str(tmp_path / "ir"))
    assert fd.method == "ase" and exact.method == "autograd"
    assert (tmp_path / "ir").is_dir()  # ASE's cache kept where asked
    vib = np.abs(exact.frequencies) > 50
    assert vib.sum() == 6
    np.testing.assert_allclose(fd.frequencies[vib], exact.frequencies[vib], atol=0.05)
    np.testing.assert_allclose(fd.intensities[vib], exact.intensities[vib], rtol=1e-4)
    assert np.all(exact.intensities[vib] > 1.0)
    # at the minimum the six rigid-body modes are zero (the springs are rotation invariant)
    assert np.max(np.abs(exact.frequencies[~vib])) < 1e-3
    # 'auto' takes the exact route when the calculator offers it
    assert harmonic_ir(atoms, calc).method == "autograd"


def orca_hessian_file(path: Path):
    """masses (amu), positions (Å), Hessian (eV/Å^2), dipole derivatives (N, 3, 3) in e from an ORCA .hess file."""
    lines = path.read_text().splitlines()
    at = lines.index("$hessian")
    n = int(lines[at + 1])
    hess = np.zeros((n, n))
    row = at + 2
    while not lines[row].startswith("$"):
        cols = [int(c) for c in lines[row].split()] if lines[row].strip() else []
        row += 1
        if not cols:
            continue
        for r in range(n):
            parts = lines[row].split()
            hess[int(parts[0]), cols] = [float(x) for x in parts[1:]]
            row += 1
    at = lines.index("$atoms")
    na = int(lines[at + 1])
    masses, pos = [], []
    for k in range(na):
        parts = lines[at + 2 + k].split()
        masses.append(float(parts[1]))
        pos.append([float(x) for x in parts[2:5]])
    at = lines.index("$dipole_derivatives")
    dmu = np.array([[float(x) for x in lines[at + 2 + k].split()] for k in range(3 * na)])
    return (np.array(masses), np.array(pos) * units.Bohr, hess * units.Hartree / units.Bohr**2,
            dmu.reshape(na, 3, 3))


def test_derivative_route_reproduces_orca_frequencies_and_intensities():
    """ORCA P2 (PBE0/def2-SVP): our unit handling from ORCA's Hessian and dipole derivatives gives ORCA's table."""
    hess_file = SHARED / "orca_P2" / "orca.hess"
    table = SHARED / "orca_P2" / "harmonic_ir_from_orca_out.txt"
    if not hess_file.exists() or not table.exists():
        pytest.skip(f"reference data not found under {SHARED}")
    masses, pos, hess, dmu = orca_hessian_file(hess_file)
    ref = read_harmonic(table)
    for project in (False, True):
        ours = harmonic_from_derivatives(masses, hess, dmu, pos, project=project)
        np.testing.assert_allclose(ours.frequencies[6:], ref.frequencies, atol=0.05)
        np.testing.assert_allclose(ours.intensities[6:], ref.intensities, atol=0.02, rtol=1e-3)
    assert np.max(np.abs(ours.frequencies[:6])) < 1e-3  # projected rigid-body modes
    # the comparison tool drops the 6 zero modes from the 3N set by itself
    stats = compare_harmonic(ref, ours)
    assert stats["n_modes"] == 24
    assert stats["frequency_mae_cm-1"] < 0.02 and stats["intensity_mae_km_mol"] < 0.01


def test_md_band_areas_equal_harmonic_intensities_of_the_same_model():
    """Velocity-Verlet MD of the spring molecule, every mode given k_B T: bands at the harmonic frequencies,
    band areas equal to the harmonic intensities (the MD and harmonic normalisations agree)."""
    atoms, calc = spring_molecule()
    har = harmonic_autograd(atoms, calc)
    vib = np.where(np.abs(har.frequencies) > 50)[0]
    temperature, dt = 10.0, 0.5
    masses = atoms.get_masses()
    kt = units.kB * temperature
    # mass-weighted mode k: Q'(0) = sqrt(2 kT) -> Cartesian velocity (Å per ASE time) -> Å/fs
    vel = sum(np.sqrt(2 * kt) * har.modes[k] for k in vib) * units.fs
    r = atoms.get_positions().copy()
    acc_unit = units.fs**2  # eV/Å/amu -> Å/fs^2
    _, f = calc.energy_forces(r)
    n_steps = 50000
    dipoles = np.empty((n_steps, 3))
    for step in range(n_steps):
        dipoles[step] = calc.charges @ r
        vel += 0.5 * dt * f / masses[:, None] * acc_unit
        r += dt * vel
        _, f = calc.energy_forces(r)
        vel += 0.5 * dt * f / masses[:, None] * acc_unit
    spec = run_spectrum(dipoles, dt, temperature, SpectrumOptions(discard_ps=0.0))
    freqs = np.sort(har.frequencies[vib])
    order = np.argsort(har.frequencies[vib])
    intens = har.intensities[vib][order]
    edges = np.concatenate([[0.0], 0.5 * (freqs[1:] + freqs[:-1]), [np.inf]])
    for k in range(len(freqs)):
        band = spec.cropped(edges[k], edges[k + 1])
        assert abs(band.wavenumber[np.argmax(band.intensity)] - freqs[k]) < 1.0 / (2 * 2048 * 2.99792458e-5)
        assert band.integral() == pytest.approx(intens[k], rel=0.02)
    assert spec.integral(0, np.inf) == pytest.approx(intens.sum(), rel=0.02)


def test_write_read_harmonic_round_trip_and_errors(tmp_path):
    h = HarmonicIR(np.array([-12.5, 100.0, 1050.25]), np.array([0.0, 3.5, 250.125]), None, "test")
    write_harmonic(tmp_path / "modes.txt", h)
    back = read_harmonic(tmp_path / "modes.txt")
    np.testing.assert_allclose(back.frequencies, h.frequencies, atol=1e-4)
    np.testing.assert_allclose(back.intensities, h.intensities, atol=1e-6)
    bad = tmp_path / "bad.txt"
    bad.write_text("100 2\n200 3 4\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: expected 2 columns"):
        read_harmonic(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_harmonic(tmp_path / "nothing.txt")
    with pytest.raises(ValueError, match="unknown harmonic method"):
        harmonic_ir(Atoms("H"), None, method="magic")


def test_ml_model_ase_infrared_agrees_with_autograd(tmp_path):
    """The committee's exact autograd Hessian/dipole derivatives vs ASE Infrared finite differences on P1."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    calculator = pytest.importorskip("driver.calculator", reason="driver.calculator (NanosilCalculator) not available")
    committee = pytest.importorskip("driver.models.committee", reason="driver.models.committee not available")
    from ase.io import read

    p1 = SHARED / "structures" / "pyroxene_N01_GM.xyz"
    if not p1.exists():
        pytest.skip(f"reference structure not found: {p1}")
    atoms = read(p1)
    model = committee.build_committee(committee.ModelConfig(), n_members=1, n_dipole=1, seed=0)
    calc = calculator.NanosilCalculator(model)
    exact = harmonic_ir(atoms, calc, method="autograd")
    fd = harmonic_ir(atoms, calc, method="ase", delta=0.01)
    assert exact.method == "autograd" and fd.method == "ase"
    # P1 is not a minimum of the untrained (soft) model: its modes all lie within ~75 cm^-1 and some are
    # imaginary, which makes the comparison strict (a Hessian error shows up as dH / (2 nu) in frequency).
    # Only the three translations (exactly zero by autograd, a few 1e-3 cm^-1 by finite differences) are skipped.
    keep = np.abs(exact.frequencies) > 1.0
    assert keep.sum() == 3 * len(atoms) - 3
    np.testing.assert_allclose(fd.frequencies[keep], exact.frequencies[keep], atol=0.5)
    strong = keep & (exact.intensities > 1e-2 * exact.intensities.max())
    assert strong.sum() >= 6
    np.testing.assert_allclose(fd.intensities[strong], exact.intensities[strong], rtol=0.01)
