"""The SOAP-PCA map (paper Fig. 7 b) on real clusters: invariances, distances, files, a missing dscribe."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from ase.io import read

from conftest import CHILD_ENV, REPO, cluster, shared_file, untrained_committee
from spectra.soap_map import CSV_COLUMNS, MISSING_DSCRIBE, SoapMap, SoapSettings

needs_dscribe = pytest.mark.skipif(
    __import__("importlib").util.find_spec("dscribe") is None,
    reason="dscribe is not installed (pip install nanosil[analysis])")


def _rotated(atoms, seed: int):
    from scipy.spatial.transform import Rotation

    a = atoms.copy()
    com = a.get_center_of_mass()
    r = Rotation.random(random_state=seed).as_matrix()
    a.positions = (a.positions - com) @ r.T + com + np.array([1.3, -2.1, 0.7])
    return a


@needs_dscribe
@pytest.mark.parametrize("name", ["pyroxene_N05_GM.xyz", "olivine_N04_GM.xyz", "pyroxene_N10_GM.xyz"])
@pytest.mark.parametrize("average", ["inner", "outer"])
def test_global_descriptor_is_rotation_and_permutation_invariant(name, average):
    from spectra.soap_map import global_descriptors

    atoms = read(cluster(name))
    perm = np.random.default_rng(1).permutation(len(atoms))
    others = [_rotated(atoms, 0), _rotated(atoms, 1), atoms[perm], _rotated(atoms[perm], 2)]
    x = global_descriptors([atoms] + others, SoapSettings(average=average))
    ref = x[0]
    assert x.shape[1] > 100 and np.linalg.norm(ref) > 0
    for y in x[1:]:
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-8


@needs_dscribe
def test_distorted_structure_is_farther_than_the_minimum():
    """Training set: the 31 PBE0 P2 structures displaced along normal modes. The P2 minimum sits among them;
    the same cluster distorted further lies farther out, and P5 clusters are outside."""
    from spectra.soap_map import build_map

    train = read(shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj"), ":")
    gm = read(cluster("pyroxene_N02_GM.xyz"))
    rng = np.random.default_rng(0)
    distorted = []
    for amp in (0.1, 0.25):
        a = gm.copy()
        a.positions += amp * rng.standard_normal(a.positions.shape)
        distorted.append(a)
    p5 = read(shared_file("structures", "pyroxene_N05_isomers_pbe0.traj"), ":")
    names = ["P2 GM", "P2 rattled 0.1 Å", "P2 rattled 0.25 Å"]
    smap, points = build_map(train, {"test": (names, [gm] + distorted),
                                     "transfer": ([f"P5 {i}" for i in range(len(p5))], p5)})
    d = {p.name: p.distance for p in points}
    assert d["P2 GM"] < d["P2 rattled 0.1 Å"] < d["P2 rattled 0.25 Å"]
    assert d["P2 GM"] < 3.0                                  # within a few training spacings
    assert min(d[f"P5 {i}"] for i in range(len(p5))) > 5.0   # another size: far outside
    train_d = np.array([p.distance for p in points if p.set == "train"])
    assert np.median(train_d) == pytest.approx(1.0)         # the unit: the training median NN distance
    # projection on the training axes: the training set is centred there
    xy = np.array([[p.pc1, p.pc2] for p in points if p.set == "train"])
    np.testing.assert_allclose(xy.mean(0), 0.0, atol=1e-10)
    assert 0 < smap.explained.sum() <= 1


def test_soap_map_numbers_without_dscribe():
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 8)) * np.array([5, 3, 1, 1, 1, 1, 1, 1])
    m = SoapMap(train)
    # principal axes of the training set: the first is the widest direction
    assert abs(m.axes[0, 0]) > 0.9 and abs(m.axes[1, 1]) > 0.9
    np.testing.assert_allclose(m.project(train).mean(0), 0.0, atol=1e-10)
    assert m.distance(train[:3]) == pytest.approx(0.0, abs=1e-6)
    far = train.mean(0) + 100.0
    assert m.distance(far)[0] > 10
    with pytest.raises(ValueError, match="at least 2 training structures"):
        SoapMap(train[:1])


@needs_dscribe
def test_map_files(tmp_path):
    from spectra.soap_map import build_map, plot_map, write_map_csv

    train = [read(cluster(f"pyroxene_N0{n}_GM.xyz")) for n in range(1, 10)]
    new = [read(cluster("olivine_N03_GM.xyz"))]
    smap, points = build_map(train, {"transfer": (["O3"], new)})
    write_map_csv(tmp_path / "map.csv", points)
    plot_map(tmp_path / "map.png", smap, points)
    with open(tmp_path / "map.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["set"] for r in rows].count("train") == 9 and rows[-1]["name"] == "O3"
    assert (tmp_path / "map.png").stat().st_size > 1000


MISSING = """
import sys
sys.modules["dscribe"] = None            # as if it were not installed
sys.modules["dscribe.descriptors"] = None
from al_manager.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_missing_dscribe_is_one_line(tmp_path):
    models = untrained_committee(tmp_path / "models")
    traj = shared_file("structures", "pyroxene_N05_isomers_pbe0.traj")
    train = shared_file("pbe0_P2_normal_modes", "farthest_selected_opt_pbe0.traj")
    proc = subprocess.run([sys.executable, "-c", MISSING, "transferability", "--models", str(models), str(traj),
                           "--train-db", str(train), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and MISSING_DSCRIBE in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()   # refused before any work

    direct = subprocess.run([sys.executable, "-c", "import sys; sys.modules['dscribe'] = None\n"
                             "from spectra.soap_map import global_descriptors, MissingPackageError\n"
                             "from ase.build import molecule\n"
                             "try:\n    global_descriptors([molecule('H2O')])\n"
                             "except MissingPackageError as e:\n    print(e)\n"],
                            cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert direct.stdout.strip() == MISSING_DSCRIBE, direct.stderr
