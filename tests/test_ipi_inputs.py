"""The i-PI XML templates and ipi_inputs.render_input: placeholders, units, start velocities, and real
i-PI runs (NVT then NVE from its checkpoint) driven through driver.ipi.client by a spring-network PES."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms, units
from ase.io import read, write

from driver.ipi.client import IPIClient, connect
from ipi_inputs import SocketAddress, read_cluster, render_input, thermostat_temperature
from ipi_inputs.render import AL_MAX_STEPS, _ipi_masses
from conftest import cluster

BIN = Path(sys.executable).parent
AU_VELOCITY = units.Bohr / (units._aut * units.second)  # i-PI velocity unit in ASE units


def ipi_frame(path: Path) -> tuple[list[str], np.ndarray, str]:
    lines = path.read_text().splitlines()
    n = int(lines[0])
    rows = [line.split() for line in lines[2:2 + n]]
    return [r[0] for r in rows], np.array([[float(x) for x in r[1:4]] for r in rows]), lines[1]


# ---------------------------------------------------------------------------- rendering
@pytest.mark.parametrize("template", ["al_sampling", "production_nvt"])
def test_render_fills_every_placeholder_and_ipi_accepts_it(tmp_path, monkeypatch, template):
    xml = render_input(template, tmp_path, socket="unix:nanosil_render", structure=cluster("pyroxene_N02_GM.xyz"),
                       temperature=400, seed=7, steps=100, prefix="run1")
    text = xml.read_text()
    assert "@@" not in text
    assert "<address> nanosil_render </address>" in text and "mode='unix'" in text
    assert "<total_steps> 100 </total_steps>" in text and "<seed> 7 </seed>" in text
    assert "<output prefix='run1'>" in text
    # the thermostat target is the corrected one: 400 K * 24/27 for 10 atoms
    t_ipi = float(re.search(r"<temperature units='kelvin'> ([0-9.]+) </temperature>", text).group(1))
    assert t_ipi == pytest.approx(400 * 24 / 27, rel=1e-6)
    # i-PI itself parses the input and builds the simulation (files, units, cell) without opening sockets
    from ipi.engine.simulation import Simulation

    monkeypatch.chdir(tmp_path)
    sim = Simulation.load_from_xml(open(xml.name), read_only=True)
    system = sim.syslist[0]
    atoms = read(cluster("pyroxene_N02_GM.xyz"))
    q = np.asarray(system.beads.q[0]).reshape(-1, 3) * units.Bohr
    # the structure arrives in Å (not read as Bohr): same interatomic distances as the source file
    assert np.allclose(np.linalg.norm(q[0] - q[1:], axis=1), atoms.get_distances(0, range(1, len(atoms))), atol=1e-8)
    assert list(system.beads.names) == atoms.get_chemical_symbols()
    assert np.allclose(np.diag(system.cell.h) * units.Bohr, 50.0)


def test_start_velocities_have_zero_momentum_and_the_vibrational_temperature(tmp_path):
    src = cluster("pyroxene_N01_GM.xyz")
    render_input("production_nvt", tmp_path, socket="unix:x", structure=src, temperature=400, seed=3, steps=10,
                 prefix="p1")
    symbols, pos, header = ipi_frame(tmp_path / "p1.init.xyz")
    _, vel_au, vheader = ipi_frame(tmp_path / "p1.init_vel.xyz")
    assert "positions{angstrom}" in header and "cell{angstrom}" in header
    assert "velocities{atomic_unit}" in vheader
    atoms = Atoms(symbols, positions=pos)
    m = _ipi_masses(atoms)[:, None]
    v = vel_au * AU_VELOCITY
    r = pos - (m * pos).sum(0) / m.sum()
    p_scale = np.abs(m * v).sum()
    assert np.abs((m * v).sum(0)).max() < 1e-9 * p_scale                       # no translation
    assert np.abs(np.cross(r, m * v).sum(0)).max() < 1e-9 * p_scale * np.abs(r).max()  # no rotation
    kinetic = 0.5 * (m * v**2).sum()
    assert kinetic == pytest.approx(0.5 * (3 * 5 - 6) * units.kB * 400, rel=1e-9)


def test_thermostat_temperature_counts_only_vibrations():
    p1 = read(cluster("pyroxene_N01_GM.xyz"))
    assert thermostat_temperature(400, p1) == pytest.approx(300.0)  # 9 vibrations / 12 dof
    linear = Atoms("CO2", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]])
    assert thermostat_temperature(600, linear) == pytest.approx(600 * 4 / 6)


def test_read_cluster_follows_ipi_units(tmp_path):
    atoms = read(cluster("pyroxene_N01_GM.xyz"))
    bohr = atoms.positions / units.Bohr
    lines = [f"{s} {x} {y} {z}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), bohr)]
    # i-PI header without units: i-PI reads Bohr, so do we
    (tmp_path / "bohr.xyz").write_text("5\n# CELL(abcABC): 40 40 40 90 90 90\n" + "\n".join(lines) + "\n")
    (tmp_path / "au.xyz").write_text("5\n# CELL(abcABC): 40 40 40 90 90 90 positions{atomic_unit}\n"
                                     + "\n".join(lines) + "\n")
    write(tmp_path / "plain.xyz", atoms)  # ASE xyz: Å
    for name in ("bohr.xyz", "au.xyz", "plain.xyz"):
        got = read_cluster(tmp_path / name)
        assert got.get_chemical_symbols() == atoms.get_chemical_symbols()
        assert np.allclose(got.positions, atoms.positions, atol=1e-8), name
    with pytest.raises(FileNotFoundError, match="missing.xyz"):
        read_cluster(tmp_path / "missing.xyz")


def test_render_inet_socket_and_bad_requests(tmp_path):
    src = cluster("pyroxene_N01_GM.xyz")
    xml = render_input("al_sampling", tmp_path, socket="127.0.0.1:31415", structure=src, temperature=300, seed=1,
                       steps=AL_MAX_STEPS)
    text = xml.read_text()
    assert "mode='inet'" in text and "<port> 31415 </port>" in text and "<address> 127.0.0.1 </address>" in text
    assert SocketAddress.parse("unix:abc") == SocketAddress("unix", "abc")
    assert SocketAddress.parse("localhost:5000") == SocketAddress("inet", "localhost", 5000)
    with pytest.raises(ValueError, match="at most 5 ps"):
        render_input("al_sampling", tmp_path, socket="unix:a", structure=src, temperature=300, seed=1,
                     steps=AL_MAX_STEPS + 1)
    with pytest.raises(ValueError, match="checkpoint"):
        render_input("production_nve", tmp_path, socket="unix:a", seed=1, steps=10)
    with pytest.raises(ValueError, match="temperature"):
        render_input("production_nvt", tmp_path, socket="unix:a", structure=src, seed=1, steps=10)
    with pytest.raises(ValueError, match="unknown i-PI template"):
        render_input("npt", tmp_path, socket="unix:a", structure=src, temperature=300, seed=1, steps=10)
    with pytest.raises(ValueError, match="port"):
        render_input("production_nvt", tmp_path, socket="host:notaport", structure=src, temperature=300, seed=1,
                     steps=10)


def test_keep_velocities_removes_translation_and_rotation_only(tmp_path):
    atoms = read(cluster("pyroxene_N01_GM.xyz"))
    rng = np.random.default_rng(0)
    atoms.set_masses(_ipi_masses(atoms))
    atoms.set_velocities(rng.normal(size=(5, 3)) * 0.01 + 0.02)  # drifting and spinning
    render_input("production_nvt", tmp_path, socket="unix:a", structure=atoms, temperature=300, seed=1, steps=10)
    _, vel_au, _ = ipi_frame(tmp_path / "simulation.init_vel.xyz")
    v = vel_au * AU_VELOCITY
    m = atoms.get_masses()[:, None]
    assert np.abs((m * v).sum(0)).max() < 1e-9
    # what remains is the original velocity minus a rigid translation and rotation
    from ase.md.velocitydistribution import Stationary, ZeroRotation

    ref = atoms.copy()
    Stationary(ref)
    ZeroRotation(ref)
    Stationary(ref)
    assert np.allclose(v, ref.get_velocities(), atol=1e-12)


# ---------------------------------------------------------------------------- real i-PI runs
# the extras every production template writes: the dipole and the dipole members (e·Bohr)
EXTRAS = '{"dipole": [0, 0, 0], "dipole_members": [[0, 0, 0], [0, 0, 0]]}'


class SpringNetwork:
    """Harmonic springs between all atom pairs at their start lengths (eV, Å): a rotation-invariant
    potential whose equipartition is exact, served in i-PI's atomic units."""

    def __init__(self, positions_angstrom, k=5.0):
        self.r0 = np.linalg.norm(positions_angstrom[:, None] - positions_angstrom[None], axis=-1)
        self.k = k
        self.energies = []

    def __call__(self, cell, pos):
        x = pos * units.Bohr
        d = x[:, None] - x[None]
        r = np.linalg.norm(d, axis=-1)
        np.fill_diagonal(r, 1.0)
        stretch = r - self.r0
        np.fill_diagonal(stretch, 0.0)
        energy = 0.25 * self.k * np.sum(stretch**2)  # each pair counted twice
        forces = -self.k * np.sum((stretch / r)[:, :, None] * d, axis=1)
        self.energies.append(energy)
        return energy / units.Hartree, forces / (units.Hartree / units.Bohr), np.zeros((3, 3)), EXTRAS


def run_ipi(xml: Path, pes, name: str) -> int:
    """Run i-PI on ``xml`` (in its folder) served by ``pes`` through driver.ipi.client; i-PI's exit status."""
    log = open(xml.with_suffix(".log"), "w")
    proc = subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=xml.parent, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        client = IPIClient(connect("unix", name, wait=60))
        try:
            client.serve(pes)
        finally:
            client.close()
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if os.path.exists(f"/tmp/ipi_{name}"):
            os.unlink(f"/tmp/ipi_{name}")


def properties(path: Path) -> dict[str, np.ndarray]:
    names = re.findall(r"^# column +\d+ +--> (\S+)", path.read_text(), flags=re.M)
    data = np.loadtxt(path, ndmin=2)
    return {n.split("{")[0]: data[:, i] for i, n in enumerate(names)}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nvt_then_nve_from_checkpoint_with_real_ipi(tmp_path):
    """SVR NVT on P1: the rotation stays frozen and the vibrations get the target temperature; then NVE
    from the NVT checkpoint conserves energy. Also checks the socket units: i-PI's potential (eV) equals
    what the PES computed."""
    src = cluster("pyroxene_N01_GM.xyz")
    atoms = read(src)
    target, steps = 400.0, 6000
    name = f"nst_{uuid.uuid4().hex[:10]}"
    xml = render_input("production_nvt", tmp_path, socket=f"unix:{name}", structure=src, temperature=target,
                       seed=11, steps=steps, prefix="nvt")
    # tau 10 fs instead of 100: the same canonical target, but the kinetic energy decorrelates within
    # ~20 steps, so 6000 steps pin its mean to a few percent (with 100 fs this needs ~10x longer)
    text = xml.read_text().replace(
        "<tau units='femtosecond'> 100 </tau>", "<tau units='femtosecond'> 10 </tau>").replace(
        "<properties stride='10'", "<properties stride='1'").replace(
        "</output>", "<trajectory filename='x' stride='50' format='ase'> positions </trajectory>\n"
                     "<trajectory filename='v' stride='50' format='ase'> velocities </trajectory>\n</output>")
    xml.write_text(text)
    pes = SpringNetwork(atoms.positions)
    assert run_ipi(xml, pes, name) == 0
    out = properties(tmp_path / "nvt.out")
    assert len(out["step"]) == steps + 1
    # socket units: i-PI's potential column (eV) is what the PES returned (in eV before conversion)
    assert np.allclose(out["potential"], pes.energies[:steps + 1], atol=1e-6)
    # rotation frozen: angular momentum about the centre of mass stays ~0 along the run
    xs = read(tmp_path / "nvt.x_0.extxyz", ":")
    vs = read(tmp_path / "nvt.v_0.extxyz", ":")
    m = _ipi_masses(atoms)[:, None]
    for fx, fv in zip(xs, vs):
        x, v = fx.arrays["positions"], fv.arrays["velocities"]
        r = x - (m * x).sum(0) / m.sum()
        scale = np.sum(m * np.linalg.norm(r, axis=1)[:, None] * np.abs(v))
        assert np.linalg.norm(np.cross(r, m * v).sum(0)) < 1e-5 * scale
    # all kinetic energy is vibrational: its mean is n_vib kT/2 with n_vib = 9, not i-PI's 12 dof
    kinetic = out["kinetic_md"][steps // 4:]
    expected = 0.5 * 9 * units.kB * target
    assert abs(kinetic.mean() - expected) < 0.12 * expected  # ~3 standard errors
    assert abs(kinetic.mean() - expected) < abs(kinetic.mean() - 0.5 * 12 * units.kB * target)

    name2 = f"nst_{uuid.uuid4().hex[:10]}"
    nve_steps = 2000
    xml2 = render_input("production_nve", tmp_path, socket=f"unix:{name2}", checkpoint=tmp_path / "nvt.chk",
                        seed=1, steps=nve_steps, prefix="nve")
    assert "<file mode='chk'> nvt.chk </file>" in xml2.read_text()
    assert run_ipi(xml2, SpringNetwork(atoms.positions), name2) == 0
    nve = properties(tmp_path / "nve.out")
    assert len(nve["step"]) == nve_steps + 1
    assert nve["kinetic_md"][0] > 0.2 * expected  # continued with the thermalised velocities
    conserved = nve["conserved"]
    assert np.ptp(conserved) < 1e-3 * nve["kinetic_md"].mean()
    rows = [line for line in (tmp_path / "nve.dipole_0").read_text().splitlines() if not line.startswith(" #")]
    assert len(rows) == nve_steps + 1
    members = [line for line in (tmp_path / "nve.dipole_members_0").read_text().splitlines()
               if not line.startswith(" #")]
    assert len(members) == 2 * (nve_steps + 1)   # one row per member and step (dipole stride 1 by default)
