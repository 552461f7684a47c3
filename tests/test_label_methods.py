"""Labels of different reference methods are different potential-energy surfaces: a database that mixes
them is refused with the methods named (or one is picked with ``--method``), and labelling into a
database of another method is refused before anything is computed."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from ase import Atoms

from conftest import BIN, CHILD_ENV
from driver.data import DatasetError, add_labelled, connect, read_frames


def _atoms(shift: float) -> Atoms:
    return Atoms("MgO", positions=[[0, 0, 0], [1.8 + shift, 0, 0]])


@pytest.fixture
def mixed_db(tmp_path):
    path = tmp_path / "mixed.db"
    db = connect(path)
    for k in range(3):
        add_labelled(db, _atoms(0.01 * k), -1.0 - k, np.zeros((2, 3)), method="xtb:GFN2-xTB")
    for k in range(2):
        add_labelled(db, _atoms(0.02 * k), -100.0 - k, np.zeros((2, 3)), method="pyscf:PBE0/def2-SVP")
    return path


def test_mixed_methods_are_refused_naming_them_or_picked(mixed_db):
    with pytest.raises(DatasetError, match=r"mixes labels of several reference methods \(xtb:GFN2-xTB: 3, "
                                           r"pyscf:PBE0/def2-SVP: 2\)"):
        read_frames(mixed_db)
    assert len(read_frames(mixed_db, method="xtb:GFN2-xTB")) == 3
    assert [f.energy for f in read_frames(mixed_db, method="pyscf:PBE0/def2-SVP")] == [-100.0, -101.0]
    with pytest.raises(DatasetError, match="no labels of method 'orca'"):
        read_frames(mixed_db, method="orca")


def test_cli_train_on_mixed_database_is_one_line_exit_2(mixed_db, tmp_path):
    run = subprocess.run([str(BIN / "nanosil"), "train", "--db", str(mixed_db), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, env=CHILD_ENV, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "xtb:GFN2-xTB: 3" in lines[0] and "pyscf:PBE0/def2-SVP: 2" in lines[0]
    assert not (tmp_path / "m").exists()


def test_labelling_into_a_database_of_another_method_is_refused(tmp_path):
    from al_manager.reference.labelling import label_structures

    path = tmp_path / "pbe0.db"
    add_labelled(connect(path), _atoms(0.0), -100.0, np.zeros((2, 3)), method="pyscf:PBE0/def2-SVP")
    with pytest.raises(ValueError, match=r"already holds labels of another reference method "
                                         r"\(pyscf:PBE0/def2-SVP: 1\)"):
        label_structures([_atoms(0.05)], "xtb", path, workers=1)
    assert len(connect(path)) == 1
