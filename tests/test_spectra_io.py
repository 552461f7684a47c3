"""Dipole time-series readers: real i-PI extras files (dipole and per-member dipoles) from a real i-PI run,
extxyz, npz, text, bad input; the default spectrum of the real run is non-negative."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

from spectra.autocorrelation import NONNEGATIVE_WINDOWS, WINDOWS, SpectrumOptions, run_spectrum
from spectra.constants import KM_MOL_PER_E2_AMU
from spectra.io import (
    DipoleSeries,
    check_same_trajectory,
    detect_format,
    read_dipole_members,
    read_dipoles,
    write_dipole_members_npz,
    write_dipoles_npz,
)

BIN = Path(sys.executable).parent

# A tiny PES for i-PI's python driver: every atom on an isotropic spring to the origin (k in Hartree/Bohr^2),
# fixed charges +0.5, -0.5, +0.5, ... e; the dipole (e·Bohr, i-PI's atomic units) goes back in the extras.
# The atoms start near the origin (little potential energy) and the centre of mass is left free (fixcom
# False), so each atom is an independent 3D oscillator of frequency sqrt(k / m). A mock dipole committee
# goes in the extras too, as the key ``dipole_members`` (n_members x 3, e·Bohr): member k is MEMBER_SCALES[k]
# times the dipole, so its spectrum is MEMBER_SCALES[k]^2 times the dipole's.
PES_SOURCE = '''
import json
import numpy as np
from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "chargedspring"
__DRIVER_CLASS__ = "ChargedSpring"
MEMBER_SCALES = {member_scales!r}


class ChargedSpring(Dummy_driver):
    def __init__(self, k=0.05, *args, **kwargs):
        self.k = float(k)
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        pos = np.asarray(pos).reshape(-1, 3)
        q = np.where(np.arange(len(pos)) % 2 == 0, 0.5, -0.5)
        pot = 0.5 * self.k * (pos ** 2).sum()
        force = -self.k * pos
        dipole = (q[:, None] * pos).sum(axis=0)
        members = [(s * dipole).tolist() for s in MEMBER_SCALES]
        return pot, force.reshape(-1), cell * 0.0, json.dumps({"dipole": dipole.tolist(), "dipole_members": members})
'''

INPUT_XML = """<simulation verbosity='low' safe_stride='100000'>
  <output prefix='sim'>
    <trajectory filename='dipole' stride='{stride}' extra_type='dipole'> extras </trajectory>
    <trajectory filename='dipole_members' stride='{stride}' extra_type='dipole_members'> extras </trajectory>
    <trajectory filename='pos' stride='{stride}' format='xyz' cell_units='angstrom'> positions{{angstrom}} </trajectory>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>31415</seed></prng>
  <ffsocket name='spring' mode='unix' pbc='false'>
    <address>{address}</address>
  </ffsocket>
  <system>
    <initialize nbeads='1'>
      <file mode='xyz'>init.xyz</file>
      <velocities mode='thermal' units='kelvin'>{temperature}</velocities>
    </initialize>
    <forces><force forcefield='spring'/></forces>
    <ensemble><temperature units='kelvin'>{temperature}</temperature></ensemble>
    <motion mode='dynamics'>
      <fixcom>False</fixcom>
      <dynamics mode='nvt'>
        <thermostat mode='langevin'><tau units='femtosecond'>100</tau></thermostat>
        <timestep units='femtosecond'>{timestep}</timestep>
      </dynamics>
    </motion>
  </system>
</simulation>
"""

K_AU = 0.151  # Hartree/Bohr^2: O near 500 cm^-1, H near 2000 cm^-1
MEMBER_SCALES = (1.0, 1.1, 0.9)  # the mock dipole committee of the PES (see PES_SOURCE)


def run_ipi(folder: Path, steps=2000, stride=2, timestep=0.5, temperature=300.0) -> Path:
    """A real i-PI NVT run of an O and an H atom on springs, driven by i-pi-py_driver; returns the extras file."""
    if not (BIN / "i-pi").exists() or not (BIN / "i-pi-py_driver").exists():
        pytest.skip("i-PI (i-pi, i-pi-py_driver) not installed next to the test interpreter")
    address = f"nanosil-spectra-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    (folder / "pes_chargedspring.py").write_text(PES_SOURCE.replace("{member_scales!r}", repr(MEMBER_SCALES)))
    (folder / "init.xyz").write_text(
        "2\n# CELL(abcABC): 30.0 30.0 30.0 90.0 90.0 90.0 positions{angstrom} cell{angstrom}\n"
        "O 0.010 -0.005 0.002\nH 0.020 0.010 -0.010\n"
    )
    (folder / "input.xml").write_text(INPUT_XML.format(stride=stride, steps=steps, address=address,
                                                       temperature=temperature, timestep=timestep))
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1")
    server = subprocess.Popen([str(BIN / "i-pi"), "input.xml"], cwd=folder, env=env,
                              stdout=open(folder / "ipi.log", "w"), stderr=subprocess.STDOUT)
    driver = None
    try:
        sock = Path(f"/tmp/ipi_{address}")
        deadline = time.time() + 60
        while not sock.exists():
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"i-PI did not open its socket: {(folder / 'ipi.log').read_text()[-2000:]}")
            time.sleep(0.1)
        driver = subprocess.Popen(
            [str(BIN / "i-pi-py_driver"), "-u", "-a", address, "-m", "custom",
             "-P", str(folder / "pes_chargedspring.py"), "-o", f"k={K_AU}"],
            cwd=folder, env=env, stdout=open(folder / "driver.log", "w"), stderr=subprocess.STDOUT)
        server.wait(timeout=240)
        driver.wait(timeout=30)
    finally:
        for proc in (driver, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    extras = folder / "sim.dipole_0"
    assert extras.exists(), (folder / "ipi.log").read_text()[-2000:]
    return extras


def read_ipi_xyz_positions(path: Path) -> np.ndarray:
    """Positions (frames, atoms, 3) from i-PI's xyz trajectory (Å, as asked in the input)."""
    lines = path.read_text().splitlines()
    frames = []
    i = 0
    while i < len(lines):
        n = int(lines[i])
        frames.append([[float(x) for x in lines[i + 2 + k].split()[1:4]] for k in range(n)])
        i += n + 2
    return np.asarray(frames)


@pytest.fixture(scope="module")
def ipi_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ipi_dipole")
    return run_ipi(folder)


def test_real_ipi_extras_file_format_units_and_stride(ipi_run):
    text = ipi_run.read_text().splitlines()
    # the format as i-PI 3 writes it: a header per printed step, then the three numbers
    assert text[0].split() == ["#EXTRAS(dipole)#", "Step:", "0"]
    assert len(text[1].split()) == 3 and text[2].split() == ["#EXTRAS(dipole)#", "Step:", "2"]
    assert detect_format(ipi_run) == "ipi"
    series = read_dipoles(ipi_run, timestep_fs=0.5)  # i-PI default unit: e·Bohr
    assert series.n_frames == 1001
    assert series.frame_interval_fs == pytest.approx(1.0)  # stride 2 x 0.5 fs, from the step numbers
    np.testing.assert_array_equal(series.steps[:3], [0, 2, 4])
    # the dipole i-PI wrote equals sum q r of the positions i-PI wrote (after e·Bohr -> e·Å)
    pos = read_ipi_xyz_positions(ipi_run.parent / "sim.pos_0.xyz")
    assert pos.shape == (1001, 2, 3)
    expected = 0.5 * pos[:, 0] - 0.5 * pos[:, 1]
    np.testing.assert_allclose(series.dipoles, expected, atol=1e-6)
    raw = np.array([[float(x) for x in line.split()] for line in text[1::2]])
    np.testing.assert_allclose(series.dipoles, raw * units.Bohr, rtol=1e-12)
    in_ea = read_dipoles(ipi_run, timestep_fs=0.5, units="eA")
    np.testing.assert_allclose(in_ea.dipoles, raw, rtol=1e-12)


def test_spectrum_of_real_ipi_run_peaks_at_spring_frequencies(ipi_run):
    from ipi.utils.units import Elements

    series = read_dipoles(ipi_run, timestep_fs=0.5)
    opts = SpectrumOptions(depth_fs=250.0, discard_ps=0.1)
    spec = run_spectrum(series.dipoles, series.frame_interval_fs, 300.0, opts, source=str(ipi_run))
    expected = []
    for element in ("O", "H"):
        omega_au = np.sqrt(K_AU / Elements.mass(element))  # i-PI's own masses, atomic units
        expected.append(omega_au * units.Hartree / units.invcm)
    resolution = 1.0 / (2 * 250.0 * 2.99792458e-5)  # 67 cm^-1
    for nu, (lo, hi) in zip(expected, [(200.0, 1000.0), (1300.0, 3000.0)]):
        band = spec.cropped(lo, hi)
        assert abs(band.wavenumber[np.argmax(band.intensity)] - nu) < resolution
    # equipartition: each band area is 3 q^2 / m in km/mol (1 ps of Langevin NVT: statistical, so loose;
    # a wrong unit (Bohr vs Å: x3.57) or stride (x4) would be far outside)
    for element, (lo, hi) in zip(("O", "H"), [(200.0, 1000.0), (1300.0, 3000.0)]):
        mass_amu = Elements.mass(element) / (units._amu / units._me)
        harmonic = 3 * 0.25 / mass_amu * KM_MOL_PER_E2_AMU
        assert spec.integral(lo, hi) == pytest.approx(harmonic, rel=0.35), element


def test_default_spectrum_of_real_ipi_run_is_non_negative(ipi_run):
    """The real i-PI trajectory: the paper's Hann processing dips below zero, the default never does."""
    series = read_dipoles(ipi_run, timestep_fs=0.5)
    hann_minima = []
    for depth in (100.0, 250.0, 500.0):
        spectra = {w: run_spectrum(series.dipoles, series.frame_interval_fs, 300.0,
                                   SpectrumOptions(depth_fs=depth, discard_ps=0.1, window=w)) for w in WINDOWS}
        for w in NONNEGATIVE_WINDOWS:
            assert spectra[w].intensity.min() >= 0.0, (w, depth)
        hann = spectra["hann"].intensity
        hann_minima.append(hann.min() / hann.max())
        for w in WINDOWS:  # the window keeps lag 0: one band area for all
            assert spectra[w].integral() == pytest.approx(spectra["parzen"].integral(), rel=1e-10)
    assert min(hann_minima) < -1e-4  # so the check above has teeth on this very trajectory


def test_real_ipi_dipole_members_file(ipi_run):
    """i-PI writes the driver's ``dipole_members`` extras (n_members x 3) as one line per member."""
    path = ipi_run.parent / "sim.dipole_members_0"
    text = path.read_text().splitlines()
    n = len(MEMBER_SCALES)
    assert text[0].split() == ["#EXTRAS(dipole_members)#", "Step:", "0"]
    assert all(len(line.split()) == 3 for line in text[1:n + 1]) and text[n + 1].split()[2] == "2"
    members = read_dipole_members(path, timestep_fs=0.5)  # e·Bohr by default, like 'dipole'
    series = read_dipoles(ipi_run, timestep_fs=0.5)
    assert members.dipoles.shape == (n, 1001, 3) and members.n_members == n and members.n_frames == 1001
    assert members.frame_interval_fs == pytest.approx(1.0)
    np.testing.assert_array_equal(members.steps, series.steps)
    check_same_trajectory(series, members)
    for k, scale in enumerate(MEMBER_SCALES):  # i-PI prints 9 significant digits
        np.testing.assert_allclose(members.dipoles[k], scale * series.dipoles, rtol=1e-7, atol=1e-12)
    # the per-member file is not a dipole file, and the other way round: the message says what to do
    with pytest.raises(ValueError, match=r"extras of type 'dipole_members', expected 'dipole' .*--committee-band"):
        read_dipoles(path, 0.5)
    with pytest.raises(ValueError, match=r"extras of type 'dipole', expected 'dipole_members'"):
        read_dipole_members(ipi_run, 0.5)


def test_extxyz_npz_text_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    dip = rng.normal(size=(40, 3))
    frames = []
    for k, d in enumerate(dip):
        a = Atoms("MgO", positions=[[0, 0, 0], [1.8, 0, 0]])
        a.calc = SinglePointCalculator(a, energy=0.0, dipole=d)
        a.info["step"] = 10 * k
        frames.append(a)
    write(tmp_path / "traj.extxyz", frames, format="extxyz")
    s = read_dipoles(tmp_path / "traj.extxyz", timestep_fs=0.25)
    np.testing.assert_allclose(s.dipoles, dip, atol=1e-8)
    assert s.frame_interval_fs == pytest.approx(2.5)

    write_dipoles_npz(tmp_path / "d.npz", dip / units.Debye)
    s = read_dipoles(tmp_path / "d.npz", timestep_fs=0.5, units="debye")
    np.testing.assert_allclose(s.dipoles, dip, rtol=1e-12)
    assert s.frame_interval_fs == 0.5 and s.steps is None

    np.savetxt(tmp_path / "d3.txt", dip, header="mu_x mu_y mu_z (e*Angstrom)")
    np.testing.assert_allclose(read_dipoles(tmp_path / "d3.txt", 0.5).dipoles, dip, rtol=1e-12)
    np.savetxt(tmp_path / "d4.dat", np.column_stack([np.arange(40) * 4, dip]))
    s = read_dipoles(tmp_path / "d4.dat", 0.5)
    assert s.frame_interval_fs == 2.0
    assert detect_format(tmp_path / "d4.dat") == "text"

    members = np.stack([dip, 2 * dip])
    write_dipole_members_npz(tmp_path / "m.npz", members, steps=np.arange(40) * 4)
    m = read_dipole_members(tmp_path / "m.npz", 0.5)
    np.testing.assert_allclose(m.dipoles, members, rtol=1e-12)
    assert m.frame_interval_fs == 2.0 and m.n_members == 2
    check_same_trajectory(s, m)
    # one line of 3 x n_members numbers per step is read as well
    flat = tmp_path / "flat.dipole_members_0"
    flat.write_text("".join(f" #EXTRAS(dipole_members)# Step:  {k} \n" + " ".join(map(str, members[:, k].ravel())) + "\n"
                            for k in range(40)))
    np.testing.assert_allclose(read_dipole_members(flat, 0.5, units="eA").dipoles, members, rtol=1e-12)


def _error(path, **kw):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        read_dipoles(path, timestep_fs=kw.pop("timestep_fs", 0.5), **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_input_gives_one_line_naming_file_and_line(tmp_path):
    head = " #EXTRAS(dipole)# Step:           {} \n"
    good = "".join(head.format(k) + f"  1.0e-01  2.0e-01  {k * 0.1:.3e}\n" for k in range(5))

    empty = tmp_path / "empty.dipole_0"
    empty.write_text("")
    assert "empty file" in _error(empty)

    assert "no such file" in _error(tmp_path / "missing.dipole_0")

    trunc_header = tmp_path / "trunc1.dipole_0"
    trunc_header.write_text(good + head.format(5))
    assert "line 11: header of step 5 has no data (truncated file?)" in _error(trunc_header)

    trunc_line = tmp_path / "trunc2.dipole_0"
    trunc_line.write_text(good + head.format(5) + "  1.0e-01  2.0e-0")
    assert "line 12: expected 3 numbers, found 2 (truncated file?)" in _error(trunc_line)

    nan = tmp_path / "nan.dipole_0"
    nan.write_text(good.replace("2.0e-01  3.000e-01", "nan  3.000e-01"))
    assert "line 8: NaN" in _error(nan)

    other = tmp_path / "forces.dipole_0"
    other.write_text(good.replace("(dipole)", "(forces)"))
    assert "extras of type 'forces', expected 'dipole'" in _error(other)

    gaps = tmp_path / "gaps.dipole_0"
    gaps.write_text(good.replace("Step:           3", "Step:           7"))
    assert "not increase" in _error(gaps) or "not equally spaced" in _error(gaps)

    four = tmp_path / "four.dipole_0"
    four.write_text(good.replace("2.0e-01  3.000e-01", "2.0e-01  3.000e-01  7.0"))
    assert "line 8: expected 3 numbers, found 4" in _error(four)

    two_lines = tmp_path / "two.dipole_0"
    two_lines.write_text(good.replace("  1.0e-01  2.0e-01  3.000e-01\n", "  1.0e-01  2.0e-01  3.000e-01\n 1 2 3\n"))
    assert "line 9: 2 data lines after the header of step 3" in _error(two_lines)

    cols = tmp_path / "cols.txt"
    cols.write_text("0.1 0.2 0.3\n0.1 0.2 0.3\n0.1 0.2\n")
    assert "line 3: expected 3 numbers, found 2" in _error(cols)
    five = tmp_path / "five.txt"
    five.write_text("1 2 3 4 5\n")
    assert "line 1: expected 3 columns" in _error(five)

    npz = tmp_path / "other.npz"
    np.savez(npz, forces=np.zeros((5, 3)))
    assert "no 'dipoles' array (found: forces)" in _error(npz)

    no_dip = tmp_path / "nodip.extxyz"
    write(no_dip, [Atoms("MgO", positions=[[0, 0, 0], [1.8, 0, 0]])] * 3, format="extxyz")
    assert "frame 0: no dipole" in _error(no_dip)

    # bad arguments (not the file's fault) name the argument
    with pytest.raises(ValueError, match="unknown dipole unit 'nm'; choose from au, eA, debye"):
        read_dipoles(tmp_path / "d.txt" if (tmp_path / "d.txt").exists() else good_file(tmp_path), 0.5, units="nm")
    with pytest.raises(ValueError, match="timestep must be a positive"):
        read_dipoles(good_file(tmp_path), -1.0)


def _members_error(path, **kw):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        read_dipole_members(path, timestep_fs=0.5, **kw)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_dipole_members_files_name_the_file(tmp_path):
    head = " #EXTRAS(dipole_members)# Step:  {} \n"
    two = " 1.0 2.0 3.0\n 1.1 2.1 3.1\n"
    good = "".join(head.format(k) + two for k in range(5))

    assert "no such file" in _members_error(tmp_path / "missing.dipole_members_0")
    cols = tmp_path / "cols.dipole_members_0"
    cols.write_text(good.replace(" 1.1 2.1 3.1\n", " 1.1 2.1 3.1 4.1\n", 1))
    assert "line 3: 4 numbers, expected 3 per member (x y z)" in _members_error(cols)
    fewer = tmp_path / "fewer.dipole_members_0"
    fewer.write_text(good + head.format(5) + " 1.0 2.0 3.0\n")
    assert "line 16: step 5 has 1 members, the first step has 2 (truncated file?)" in _members_error(fewer)
    uneven = tmp_path / "uneven.dipole_members_0"
    uneven.write_text(good.replace("Step:  2 \n", "Step:  3 \n"))
    assert "not equally spaced" in _members_error(uneven) or "not increase" in _members_error(uneven)
    nan = tmp_path / "nan.dipole_members_0"
    nan.write_text(good.replace("2.1", "nan", 1))
    assert "line 3: NaN" in _members_error(nan)
    npz = tmp_path / "flat.npz"
    np.savez(npz, dipole_members=np.zeros((10, 3)))
    assert "'dipole_members' has shape (10, 3), expected (n_members, n_frames, 3)" in _members_error(npz)
    assert "not 'text'" in _members_error(good_file(tmp_path), fmt="text")

    # a per-member file that does not match its run: both files named
    fine = tmp_path / "fine.dipole_members_0"
    fine.write_text(good)
    members = read_dipole_members(fine, 0.5, units="eA")
    run = DipoleSeries(np.zeros((5, 3)), 1.0, source="run_a.dipole_0")
    with pytest.raises(ValueError, match=r"fine.dipole_members_0: frames 0.5 fs apart, but run_a.dipole_0 has 1 fs"):
        check_same_trajectory(run, members)
    run = DipoleSeries(np.zeros((6, 3)), 0.5, source="run_b.dipole_0")
    with pytest.raises(ValueError, match=r"fine.dipole_members_0: 5 frames, but run_b.dipole_0 has 6"):
        check_same_trajectory(run, members)
    run = DipoleSeries(np.zeros((5, 3)), 0.5, source="run_c.dipole_0", steps=np.arange(5) + 10)
    with pytest.raises(ValueError, match=r"frame 0 is step 0, but in run_c.dipole_0 step 10"):
        check_same_trajectory(run, members)


def good_file(folder: Path) -> Path:
    path = folder / "good.txt"
    np.savetxt(path, np.ones((10, 3)))
    return path
