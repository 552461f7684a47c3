"""ORCA backend without an ORCA binary: parsers on the real ORCA 5 run in ../shared/data/orca_P2/,
the generated input text, the no-binary message, and the run path (input written, program started,
results read, exit codes turned into failures) with a stand-in executable that replays the real files."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import read
from ase.units import Bohr, Hartree

from al_manager.reference import ReferenceError, get_backend
from al_manager.reference.orca import (
    PAPER_SIMPLE_INPUT,
    OrcaNotFoundError,
    find_orca,
    orca_input_text,
    read_orca_dipole,
    read_orca_energy,
    read_orca_engrad,
    read_orca_frequencies,
    read_orca_harmonic,
    read_orca_results,
)

REPO = Path(__file__).resolve().parents[1]
ORCA_P2 = REPO / ".." / "shared" / "data" / "orca_P2"
STRUCTURES = REPO / ".." / "shared" / "data" / "structures"


@pytest.fixture(scope="module")
def p2():
    if not (ORCA_P2 / "orca.out").exists():
        pytest.skip(f"shared ORCA data not found: {ORCA_P2}")
    return ORCA_P2


def test_final_energy(p2):
    assert read_orca_energy(p2 / "orca.out") / Hartree == pytest.approx(-1429.352848326076, abs=1e-9)


def test_engrad_energy_and_gradient(p2):
    energy, forces = read_orca_engrad(p2 / "orca.engrad")
    assert energy / Hartree == pytest.approx(-1429.352848326076, abs=1e-12)
    assert forces.shape == (10, 3)
    # first atom's gradient in the file, Eh/bohr
    grad0 = np.array([-0.000068951335, -0.000070245107, -0.000099911389])
    np.testing.assert_allclose(forces[0], -grad0 * Hartree / Bohr, rtol=1e-9)
    # a converged optimisation: the forces are tiny and sum to ~0
    assert np.abs(forces).max() < 0.02
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-3)


def test_dipole_and_results_dict(p2):
    dipole = read_orca_dipole(p2 / "orca.out")
    # the P2 minimum is centrosymmetric: ORCA prints 0.00000 a.u.
    np.testing.assert_allclose(dipole, 0.0, atol=1e-5 * Bohr)
    results = read_orca_results(p2 / "orca.out")
    assert set(results) == {"energy", "free_energy", "dipole", "forces"}
    assert results["forces"].shape == (10, 3)


def test_dipole_parser_units_and_origin():
    # an ORCA 5 DIPOLE MOMENT block as printed for a polar, charged cluster (atomic units, about the COM)
    text = "\n".join([
        "The origin for moment calculation is the CENTER OF MASS  = ( 1.000000, -2.000000  0.500000)",
        "                                X             Y             Z",
        "Total Dipole Moment    :      1.00000      -0.50000       0.25000",
        "Magnitude (a.u.)       :      1.14564",
    ]) + "\n"
    np.testing.assert_allclose(read_orca_dipole(text), np.array([1.0, -0.5, 0.25]) * Bohr)
    # charge +1: moved from the centre of mass to the coordinate origin, mu_0 = mu_com + q * r_com
    np.testing.assert_allclose(read_orca_dipole(text, charge=1), np.array([2.0, -2.5, 0.75]) * Bohr)


def test_unconverged_energy_is_nan_and_refused(p2, tmp_path):
    text = (p2 / "orca.out").read_text()
    final = "FINAL SINGLE POINT ENERGY     -1429.352848326076"
    assert final in text
    bad = tmp_path / "orca.out"
    bad.write_text(text.replace(final, final + " (Wavefunction not fully converged!)"))
    assert np.isnan(read_orca_energy(bad))
    with pytest.raises(ReferenceError, match="SCF not converged"):
        read_orca_results(bad)


def test_frequencies_and_intensities_match_the_extracted_table(p2):
    table = np.loadtxt(p2 / "harmonic_ir_from_orca_out.txt")
    freq, inten = read_orca_frequencies(p2 / "orca.out")
    assert freq.shape == (30,) and inten.shape == (30,)
    np.testing.assert_allclose(freq[:6], 0.0)
    np.testing.assert_allclose(freq[6:], table[:, 0], atol=1e-6)
    np.testing.assert_allclose(inten[6:], table[:, 1], atol=1e-6)
    assert inten[29] == pytest.approx(765.18)


def test_harmonic_modes_in_ase_convention(p2):
    atoms = read(str(p2 / "orca.xyz"))
    har = read_orca_harmonic(p2 / "orca.out", atoms.get_masses())
    assert har.modes.shape == (30, 10, 3)
    # mass-weighted vibrational modes are orthonormal (ASE convention: e / sqrt(m))
    q = har.modes[6:].reshape(24, 30) * np.repeat(np.sqrt(atoms.get_masses()), 3)
    np.testing.assert_allclose(q @ q.T, np.eye(24), atol=1e-4)
    np.testing.assert_allclose(har.frequencies[-1], 1130.15)


def test_generated_input_text():
    atoms = read(str(STRUCTURES / "pyroxene_N01_GM.xyz")) if STRUCTURES.exists() else pytest.skip("no data")
    backend = get_backend("orca", nprocs=4, maxcore=2000)
    text = backend.input_text(atoms)
    lines = [line.rstrip() for line in text.splitlines()]
    assert lines[0].split() == ["!", "PBE0", "def2-SVP", "def2/J", "RIJCOSX", "TightSCF", "EnGrad", "DEFGRID2"]
    assert "%pal nprocs 4 end" in lines and "%maxcore 2000" in lines
    assert lines[lines.index("*xyz 0 1") - 1].strip() == "end"
    # the coordinates read back are the structure's
    from ase.io.orca import read_geom_orcainp

    from io import StringIO

    back = read_geom_orcainp(StringIO(text))
    assert back.get_chemical_symbols() == atoms.get_chemical_symbols()
    np.testing.assert_allclose(back.positions, atoms.positions, atol=1e-10)
    # charge/multiplicity from atoms.info; an SCF retry adds SlowConv and a level shift
    atoms.info.update(charge=1, multiplicity=2)
    retry = backend.input_text(atoms, attempt=1)
    assert "*xyz 1 2 " in retry and "SlowConv" in retry.splitlines()[0] and "Shift Shift 0.3" in retry
    assert orca_input_text(atoms).startswith(f"! {PAPER_SIMPLE_INPUT}")


def test_no_binary_message(monkeypatch, tmp_path):
    monkeypatch.delenv("ORCA_COMMAND", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OrcaNotFoundError, match="ORCA_COMMAND") as err:
        find_orca()
    assert "--orca-command" in str(err.value) and "full path" in str(err.value)
    with pytest.raises(FileNotFoundError, match="/nowhere/orca"):
        get_backend("orca", command="/nowhere/orca").check_available()


def test_cli_without_binary_is_one_line(tmp_path):
    if not STRUCTURES.exists():
        pytest.skip("shared structures not found")
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), OMP_NUM_THREADS="1")
    env.pop("ORCA_COMMAND", None)
    proc = subprocess.run([sys.executable, "-m", "al_manager.cli", "label", str(STRUCTURES / "pyroxene_N01_GM.xyz"),
                           "--backend", "orca", "--db", str(tmp_path / "d.db")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "ORCA binary not found" in proc.stderr and "ORCA_COMMAND" in proc.stderr


def _stand_in_orca(tmp_path: Path, p2: Path) -> Path:
    """An executable called like ORCA (``orca orca.inp``) that replays the real P2 run's output files for
    a P2 input and exits 1 (as ORCA does on an error) for anything else."""
    script = tmp_path / "bin" / "orca"
    script.parent.mkdir()
    script.write_text(f"""#!/bin/sh
if grep -q '^Mg' "$1" && [ "$(grep -c '^Si' "$1")" = "2" ]; then
  cp '{p2}/orca.engrad' orca.engrad
  cat '{p2}/orca.out'
else
  echo 'ORCA finished by error termination in SCF'
  exit 1
fi
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_run_path_reads_results_and_records_crashes(p2, tmp_path):
    from al_manager.reference.labelling import label_structures, read_failures

    orca = _stand_in_orca(tmp_path, p2)
    atoms = read(str(p2 / "orca.xyz"))
    backend = get_backend("orca", command=str(orca), workdir=str(tmp_path / "runs"))
    lab = backend.label(atoms)
    assert lab.energy / Hartree == pytest.approx(-1429.352848326076, abs=1e-9)
    np.testing.assert_allclose(lab.forces, read_orca_engrad(p2 / "orca.engrad")[1])
    assert list((tmp_path / "runs").iterdir()) == []  # successful run folders are removed
    # the input ORCA was given is the paper's (kept with keep_files)
    keep = get_backend("orca", command=str(orca), workdir=str(tmp_path / "kept"), keep_files=True)
    keep.label(atoms)
    inp = next((tmp_path / "kept").glob("*/attempt0/orca.inp")).read_text()
    assert inp.startswith(f"! {PAPER_SIMPLE_INPUT}")

    p1 = read(str(STRUCTURES / "pyroxene_N01_GM.xyz"))
    with pytest.raises(ReferenceError, match="exit code 1"):
        backend.label(p1)
    db = tmp_path / "orca.db"
    report = label_structures([atoms, p1], "orca", db, executor="serial", progress=False,
                              backend_options={"command": str(orca), "workdir": str(tmp_path / "runs")})
    assert (report.n_labelled, report.n_failed) == (1, 1)
    failures = read_failures(db)
    assert len(failures) == 1 and "exit code 1" in failures[0]["reason"] and failures[0]["formula"] == "MgO3Si"
