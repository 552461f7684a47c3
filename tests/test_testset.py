"""The paper's test set (al_manager.learning.testset): MD frames with the committee, labelled by the real
xTB oracle into a database of their own, and the error report against the committee's own uncertainty."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tblite")


def test_md_frames_are_labelled_apart_and_scored_per_cluster(xtb_model, tmp_path):
    from ase.io import read

    from al_manager.learning.testset import label_test_set, sample_md_frames, uncertainty_report
    from driver.calculator import NanosilCalculator
    from driver.data import read_frames

    models, paths = xtb_model
    frames = sample_md_frames(models, {k: str(v) for k, v in paths.items()}, temperatures=(400.0,), ps=0.1,
                              equilibration_ps=0.02, frames_per_run=3, seed=3, log=lambda m: None)
    assert len(frames) == 6
    for fr in frames:
        assert fr.info["cluster"] in paths and fr.info["temperature"] == 400.0
        assert 40 <= fr.info["md_step"] < 200          # drawn after the equilibration, within the run
        start = read(paths[fr.info["cluster"]])
        assert not np.allclose(fr.positions, start.positions)   # the MD moved

    db = tmp_path / "test.db"
    report = label_test_set(frames, "xtb", db)
    assert not report.failures
    labelled = read_frames(db)
    assert sorted(f.cluster for f in labelled) == ["O1"] * 3 + ["P1"] * 3

    scores = uncertainty_report(models, labelled)
    assert scores["n_frames"] == 6
    # the energy error recomputed frame by frame with the committee as an ASE calculator
    calc = NanosilCalculator(str(models))
    errors = []
    for fr in labelled:
        atoms = read(paths[fr.cluster])
        atoms.positions = fr.positions
        atoms.calc = calc
        errors.append(abs(atoms.get_potential_energy() - fr.energy) / len(atoms) * 1e3)
    assert scores["test_energy_mae_meV_per_atom"] == pytest.approx(np.mean(errors), rel=1e-3, abs=1e-3)
    assert scores["test_energy_median_meV_per_atom"] == pytest.approx(np.median(errors), rel=1e-3, abs=1e-3)
    per = scores["per_cluster"]
    assert {c: v["frames"] for c, v in per.items()} == {"P1": 3, "O1": 3}
    overall = sum(v["frames"] * v["energy_mae_meV_per_atom"] for v in per.values()) / 6
    assert overall == pytest.approx(scores["test_energy_mae_meV_per_atom"], rel=1e-9)
    for v in per.values():
        assert v["energy_max_meV_per_atom"] >= v["energy_mae_meV_per_atom"]
    # a committee trained on normal-mode samples up to 600 K, scored at 400 K: small errors, a finite ranking
    assert scores["test_energy_mae_meV_per_atom"] < 50.0
    assert 0.0 < scores["test_force_mae_eV_per_A"] < 1.0
    assert np.isfinite(scores["test_dipole_mae_D"])
    assert -1.0 <= scores["force_spearman"] <= 1.0
