"""`nanosil transferability` on the paper's P5 isomers (an untrained committee: plumbing and units only)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from al_manager.cli import main
from conftest import shared_file, untrained_committee

P5_REL_MEV = [0.0, 184.5, 683.2, 765.3, 895.2]   # the traj's PBE0 relative energies (README: 0, 0.184, ... eV)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return untrained_committee(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def isomers():
    return shared_file("structures", "pyroxene_N05_isomers_pbe0.traj")


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_isomers_errors_and_relative_energies(models, isomers, tmp_path, capsys):
    from al_manager.commands.transferability import CSV_COLUMNS

    out = tmp_path / "out"
    assert main(["transferability", "--models", str(models), str(isomers), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "relative energies of Mg5O15Si5" in printed
    rows = _rows(out / "transferability.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["name"] for r in rows] == ["P5-GM", "P5-I", "P5-II", "P5-III", "P5-IV"]
    rel = [float(r["relative_energy_ref_meV"]) for r in rows]
    np.testing.assert_allclose(rel, P5_REL_MEV, atol=0.1)
    frames = read(isomers, ":")
    for r, atoms in zip(rows, frames):
        assert float(r["energy_ref_eV"]) == pytest.approx(atoms.get_potential_energy())
        e_err = (float(r["energy_ml_eV"]) - float(r["energy_ref_eV"])) / len(atoms) * 1e3
        assert float(r["energy_error_meV_per_atom"]) == pytest.approx(e_err)
        assert float(r["relative_energy_error_meV"]) == pytest.approx(
            float(r["relative_energy_ml_meV"]) - float(r["relative_energy_ref_meV"]))
        for key in ("energy_std_meV_per_atom", "max_force_std_eV_per_A", "dipole_std_D", "dipole_error_D",
                    "force_mae_eV_per_A"):
            assert float(r[key]) >= 0.0       # the committee's spread sits next to the actual error
        assert r["relax_steps"] == "" and r["soap_distance"] == ""
    data = json.loads((out / "transferability.json").read_text())
    assert data["harmonic"] is None and data["soap_map"] is None
    (group,) = data["relative_energies"]
    assert group["lowest"] == "P5-GM" and group["relative_energy_ml_meV"][0] == 0.0


def test_errors_vanish_on_the_committees_own_labels(models, isomers, tmp_path, capsys):
    """Labels made by the committee itself: every error is zero, the std is still reported."""
    from driver.models.committee import load_committee

    committee = load_committee(models)
    frames = []
    for atoms in read(isomers, ":"):
        p = committee.predict(atoms.numbers, atoms.positions)
        a = Atoms(atoms.numbers, atoms.positions)
        a.calc = SinglePointCalculator(a, energy=p.energy, forces=p.forces, dipole=p.dipole)
        frames.append(a)
    own = tmp_path / "own.extxyz"
    write(own, frames, format="extxyz")
    assert main(["transferability", "--models", str(models), str(own), "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    for r in _rows(tmp_path / "o" / "transferability.csv"):
        assert abs(float(r["energy_error_meV_per_atom"])) < 1e-2      # float32 committee vs float64 run
        assert float(r["force_mae_eV_per_A"]) < 1e-4
        assert float(r["dipole_error_D"]) < 1e-4
        assert abs(float(r["relative_energy_error_meV"])) < 0.5
        assert float(r["energy_std_meV_per_atom"]) > 0


def test_harmonic_beside_the_paper(models, isomers, tmp_path, capsys):
    out = tmp_path / "h"
    # a few BFGS steps only: an untrained surface has no minimum worth finding (plumbing, not physics)
    assert main(["transferability", "--models", str(models), str(isomers), "--out", str(out), "--harmonic",
                 "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("I", "II", "III", "IV"):
        assert f"isomer_{name}_harmonic.npy (69, 4)" in printed      # the arrays' layout, printed first
    assert "did not reach fmax" in printed
    rows = {r["name"]: r for r in _rows(out / "transferability.csv")}
    data = json.loads((out / "transferability.json").read_text())
    theirs = {}
    for name, r in rows.items():
        assert int(r["relax_steps"]) == 2 and r["relax_converged"] == "0"
        assert float(r["relax_rmsd_A"]) > 0 and float(r["relax_max_displacement_A"]) >= float(r["relax_rmsd_A"])
        h = data["harmonic"][name]
        assert len(h["frequencies_cm-1"]) == 3 * 25 - 6
        assert (out / "harmonic" / f"{name}.txt").is_file() and (out / "harmonic" / f"{name}.png").is_file()
        if name == "P5-GM":
            assert r["freq_mae_vs_paper_dft_cm-1"] == "" and "paper" not in h
            continue
        cmp = h["paper"]
        assert cmp["vs_paper_dft"]["n_modes"] == 69
        assert float(r["freq_mae_vs_paper_dft_cm-1"]) == pytest.approx(cmp["vs_paper_dft"]["frequency_mae_cm-1"])
        theirs[name] = float(r["paper_ml_vs_dft_freq_mae_cm-1"])
    # the paper's own numbers, read from their arrays (Sec. III C): every isomer below 4 cm^-1,
    # isomer I the lowest and II the highest
    assert max(theirs.values()) < 4.0
    assert min(theirs, key=theirs.get) == "P5-I" and max(theirs, key=theirs.get) == "P5-II"


def test_relax_reports_how_far_it_moved():
    from ase.calculators.lj import LennardJones
    from ase.cluster import Icosahedron

    from al_manager.commands.transferability import relax

    atoms = Icosahedron("Ar", 2)
    calc = LennardJones(sigma=3.4, epsilon=0.0104, rc=12.0, smooth=True)
    first, moved = relax(atoms, calc, fmax=1e-4, steps=500)
    assert moved["relax_converged"] and moved["relax_energy_change_meV"] <= 0
    again, still = relax(first, calc, fmax=1e-4, steps=500)
    assert still["relax_rmsd_A"] < 1e-3 < moved["relax_rmsd_A"]
    rotated = first.copy()
    rotated.rotate(40, "z", center="COM")
    _, turned = relax(rotated, calc, fmax=1e-4, steps=500)
    assert turned["relax_rmsd_A"] < 1e-3      # a rigid rotation is not a move


def test_relative_energies_flag_a_reordering():
    from al_manager.commands.transferability import relative_energies

    rows = [{"file": "f", "formula": "X", "name": n, "energy_ref_eV": e, "energy_ml_eV": m}
            for n, e, m in (("a", 0.0, 0.5), ("b", 0.1, 0.0), ("c", 0.3, 0.9))]
    (g,) = relative_energies(rows)
    assert g["lowest"] == "a" and g["ml_lowest"] == "b" and not g["same_order"]
    assert rows[1]["relative_energy_ref_meV"] == pytest.approx(100.0)
    assert rows[1]["relative_energy_ml_meV"] == pytest.approx(-500.0)   # against the reference-lowest one
    assert g["mae_meV"] == pytest.approx((600.0 + 100.0) / 2)


def test_element_outside_the_model_is_one_line(models, tmp_path, capsys):
    atoms = read(shared_file("structures", "pyroxene_N02_GM.xyz"))
    atoms[0].symbol = "Al"
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.zeros((len(atoms), 3)))
    path = tmp_path / "alumina.extxyz"
    write(path, atoms, format="extxyz")
    assert main(["transferability", "--models", str(models), str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "element Al" in err[0] and str(path) in err[0], err
    assert not (tmp_path / "o").exists()


def test_bad_inputs_are_one_line(models, isomers, tmp_path, capsys):
    assert main(["transferability", "--models", str(models), str(tmp_path / "none.traj")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["transferability", "--models", str(models), str(isomers), "--test-db", str(isomers),
                 "--out", str(tmp_path / "o")]) == 2
    assert "--test-db needs --train-db" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["transferability", "--models", str(models), str(isomers), "--fmax", "0"])
    assert exc.value.code == 2


def test_soap_map_with_the_report(models, isomers, tmp_path, capsys):
    pytest.importorskip("dscribe", reason="dscribe is not installed (pip install nanosil[analysis])")
    train = shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj")
    out = tmp_path / "m"
    assert main(["transferability", "--models", str(models), str(isomers), "--out", str(out),
                 "--train-db", str(train), "--test-db", str(shared_file("structures", "pyroxene_N02_GM.xyz"))]) == 0
    printed = capsys.readouterr().out
    assert "distance of each new structure to the training set" in printed and "P5-IV" in printed
    rows = _rows(out / "transferability.csv")
    assert all(float(r["soap_distance"]) > 5 for r in rows)     # P5 against a P2 training set: outside
    with open(out / "soap_map.csv") as fh:
        sets = [r["set"] for r in csv.DictReader(fh)]
    assert sets.count("train") == 31 and sets.count("test") == 1 and sets.count("transfer") == 5
    assert (out / "soap_map.png").stat().st_size > 1000
