"""Fill the placeholders of the i-PI XML templates of this folder.

One function, :func:`render_input`, shared by the active-learning manager and the production runner:
it writes, into a run folder, the XML input, the start structure as an i-PI xyz file (Å, with a large
cubic box: i-PI needs a cell even for a cluster) and start velocities with zero linear and angular
momentum, and returns the XML path. Run ``i-pi <xml>`` *in that folder* (file names are relative to it).

Temperatures: ``temperature`` is the vibrational temperature the user wants. i-PI removes the
centre-of-mass motion but not the rotation, and its SVR thermostat drives 3N-3 degrees of freedom;
with zero angular momentum the rotation stays frozen, so the thermostat target written into the XML
is T (3N-6)/(3N-3) (see :func:`thermostat_temperature`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from spectra.atomic import write_text

from .files import AU_VELOCITY, SocketAddress, read_cluster

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATES = ("al_sampling", "production_nvt", "production_nve")
TIMESTEP_FS = 0.5                       # default MD time step (fs)
AL_MAX_PS = 5.0                         # active-learning sampling runs at most 5 ps (the paper)
AL_MAX_STEPS = int(AL_MAX_PS * 1000 / TIMESTEP_FS)
IPI_LATENCY_S = 1e-3                    # i-PI's force-field polling interval (i-PI's default: 1e-4 s)
CHECKPOINT_STEPS = {"al_sampling": 200, "production_nvt": 1000, "production_nve": 1000}
DEFAULT_BOX = 50.0                      # Å, minimum box side; grown for big clusters
BOX_MARGIN = 30.0                       # Å added to the cluster's extent
DEFAULT_TIMEOUT = 300.0                 # s before i-PI declares a silent driver dead
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")


def thermostat_temperature(temperature: float, atoms: Atoms) -> float:
    """i-PI's SVR target (K) that gives the vibrational temperature ``temperature`` (K) to a free cluster
    with zero angular momentum: i-PI counts 3N-3 degrees of freedom, the vibrations are 3N-6 (3N-5 if
    linear), so T_ipi = T * n_vib / (3N-3)."""
    n_dof_ipi = 3 * len(atoms) - 3
    if n_dof_ipi <= 0:
        raise ValueError("a single atom has no vibrations")
    return temperature * _n_vibrations(atoms) / n_dof_ipi


def _n_rotations(atoms: Atoms) -> int:
    if len(atoms) < 2:
        return 0
    moments = atoms.get_moments_of_inertia()
    return int(np.sum(moments > 1e-8 * max(moments.max(), 1e-300)))


def _n_vibrations(atoms: Atoms) -> int:
    return 3 * len(atoms) - 3 - _n_rotations(atoms)


def start_velocities(atoms: Atoms, temperature: float | None, seed: int, keep: bool = False) -> np.ndarray:
    """Velocities (ASE units) with zero linear and angular momentum. ``keep``: start from the velocities the
    structure carries (the paper continues each active-learning iteration from the previous one) and only
    remove translation and rotation; otherwise Maxwell-Boltzmann at ``temperature`` rescaled so that the
    kinetic energy is exactly n_vib kT/2. Masses are i-PI's, so the momenta stay zero inside i-PI."""
    work = atoms.copy()
    work.set_masses(_ipi_masses(work))
    if keep:
        work.set_velocities(atoms.get_velocities())
    else:
        if temperature is None or temperature <= 0:
            raise ValueError("a positive temperature is needed to draw start velocities")
        thermalize_momenta(work, temperature, rng=np.random.default_rng(seed))
    Stationary(work)
    ZeroRotation(work)
    Stationary(work)
    if not keep:
        target = 0.5 * _n_vibrations(work) * units.kB * temperature
        kinetic = work.get_kinetic_energy()
        if kinetic > 0:
            work.set_velocities(work.get_velocities() * np.sqrt(target / kinetic))
    return work.get_velocities()


def _ipi_masses(atoms: Atoms) -> np.ndarray:
    from ipi.utils.units import Elements

    amu_in_me = units._amu / units._me
    return np.array([Elements.mass(s) / amu_in_me for s in atoms.get_chemical_symbols()])


def box_side(atoms: Atoms) -> float:
    """A cubic box (Å) with ample vacuum: the driver ignores it, i-PI only needs one."""
    extent = float(np.ptp(atoms.positions, axis=0).max()) if len(atoms) > 1 else 0.0
    return max(DEFAULT_BOX, extent + BOX_MARGIN)


def _ipi_xyz(symbols, values: np.ndarray, box: float, quantity: str, unit: str) -> str:
    lines = [str(len(symbols)),
             f"# CELL(abcABC): {box:.5f} {box:.5f} {box:.5f} 90.00000 90.00000 90.00000 "
             f"cell{{angstrom}} {quantity}{{{unit}}}"]
    lines += [f"{s:>3s} {x: .16e} {y: .16e} {z: .16e}" for s, (x, y, z) in zip(symbols, values)]
    return "\n".join(lines) + "\n"




def render_input(template: str, workdir: str | os.PathLike, *, socket: "str | SocketAddress", steps: int,
                 seed: int, temperature: float | None = None, structure: "Atoms | str | os.PathLike | None" = None,
                 checkpoint: str | os.PathLike | None = None, prefix: str = "simulation",
                 velocities: str = "auto", box: float | None = None, timeout: float = DEFAULT_TIMEOUT,
                 timestep_fs: float = TIMESTEP_FS, checkpoint_steps: int | None = None, dipole_flush: int = 100,
                 latency_s: float = IPI_LATENCY_S, dipole_stride: int = 1) -> Path:
    """Write ``<workdir>/<prefix>.xml`` from template ``al_sampling`` | ``production_nvt`` | ``production_nve``.

    - ``socket``: see :meth:`SocketAddress.parse` (``unix:NAME`` or ``HOST:PORT``).
    - ``temperature``: target vibrational temperature (K) of the NVT templates.
    - ``structure`` (NVT templates): ASE Atoms or a file (see :func:`read_cluster`); written as
      ``<prefix>.init.xyz`` in Å, centred in a cubic box (``box`` Å, default :func:`box_side`), with
      velocities ``<prefix>.init_vel.xyz`` in atomic units. ``velocities``: ``"thermal"`` draws them at
      ``temperature``, ``"keep"`` uses those the structure carries, ``"auto"`` keeps them when present.
    - ``checkpoint`` (``production_nve``): an i-PI checkpoint of an equilibrated run.
    - ``steps``, ``seed``, ``prefix`` (output files ``<prefix>.out`` ...), ``timeout`` (s, hung driver).
    - ``timestep_fs``; ``checkpoint_steps`` (default per template, :data:`CHECKPOINT_STEPS`); ``dipole_flush``
      (written frames between flushes of the dipole files: 1 keeps them never behind a checkpoint, for
      resuming); ``dipole_stride`` (production templates): the dipole and per-member dipole trajectories are
      written every this many steps (labels 0, K, 2K, ...); run the driver with ``--dipole-every`` K;
      ``latency_s``: i-PI's force-field thread sleeps this long between polls, also while the integrator
      works: at i-PI's 1e-4 s, many i-PI processes waiting on one batched driver wake 10^4 times a second each.
    """
    if template.endswith(".xml"):
        template = template[:-4]
    if template not in TEMPLATES:
        raise ValueError(f"unknown i-PI template {template!r}; choose from {', '.join(TEMPLATES)}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    address = SocketAddress.parse(socket)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", prefix):
        raise ValueError(f"output prefix {prefix!r}: use letters, digits and _.+- only")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0 < timestep_fs <= 5:
        raise ValueError(f"timestep_fs must be in (0, 5] fs for MD with O and Mg, got {timestep_fs!r}")
    if template == "al_sampling" and steps * timestep_fs > AL_MAX_PS * 1000 * (1 + 1e-9):
        raise ValueError(f"al_sampling runs at most {AL_MAX_PS:g} ps, got {steps} steps of {timestep_fs:g} fs")
    checkpoint_steps = CHECKPOINT_STEPS[template] if checkpoint_steps is None else checkpoint_steps
    for name, value in (("checkpoint_steps", checkpoint_steps), ("dipole_flush", dipole_flush),
                        ("dipole_stride", dipole_stride)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not latency_s > 0:
        raise ValueError(f"latency_s must be positive, got {latency_s!r}")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")

    values = {"PREFIX": prefix, "STEPS": str(int(steps)), "SEED": str(int(seed)),
              "SOCKET_MODE": address.mode, "ADDRESS": address.address, "PORT": str(address.port),
              "TIMEOUT": f"{float(timeout):g}", "TIMESTEP": repr(float(timestep_fs)),
              "CHECKPOINT_STRIDE": str(int(checkpoint_steps)), "DIPOLE_FLUSH": str(int(dipole_flush)),
              "DIPOLE_STRIDE": str(int(dipole_stride)),
              "LATENCY": repr(float(latency_s))}
    note = ""
    if template == "production_nve":
        if checkpoint is None:
            raise ValueError("production_nve starts from a checkpoint of an equilibrated run: give checkpoint=")
        chk = Path(checkpoint)
        if not chk.is_file():
            raise FileNotFoundError(f"checkpoint file {chk} does not exist")
        values["CHECKPOINT"] = _relative_to(chk, workdir)
        note = f"NVE from checkpoint {values['CHECKPOINT']}"
    else:
        if structure is None:
            raise ValueError(f"{template} needs a start structure: give structure=")
        if temperature is None or not temperature > 0:
            raise ValueError(f"{template} needs a positive temperature (K), got {temperature!r}")
        atoms = structure.copy() if isinstance(structure, Atoms) else read_cluster(structure)
        has_velocities = bool(np.any(atoms.get_momenta()))
        if velocities not in ("auto", "thermal", "keep"):
            raise ValueError(f"velocities must be 'auto', 'thermal' or 'keep', got {velocities!r}")
        if velocities == "keep" and not has_velocities:
            raise ValueError("velocities='keep' but the structure carries no velocities")
        keep = velocities == "keep" or (velocities == "auto" and has_velocities)
        side = box_side(atoms) if box is None else float(box)
        extent = float(np.ptp(atoms.positions, axis=0).max())
        if side < extent + 2.0:
            raise ValueError(f"box side {side} Å is too small for a cluster {extent:.1f} Å across")
        atoms.set_masses(_ipi_masses(atoms))
        positions = atoms.positions - atoms.get_center_of_mass() + side / 2
        vel_au = start_velocities(atoms, temperature, seed, keep=keep) / AU_VELOCITY
        symbols = atoms.get_chemical_symbols()
        struct_file, vel_file = workdir / f"{prefix}.init.xyz", workdir / f"{prefix}.init_vel.xyz"
        write_text(struct_file, _ipi_xyz(symbols, positions, side, "positions", "angstrom"))
        write_text(vel_file, _ipi_xyz(symbols, vel_au, side, "velocities", "atomic_unit"))
        t_ipi = thermostat_temperature(temperature, atoms)
        values.update({"STRUCTURE": struct_file.name, "VELOCITIES": vel_file.name, "BOX": f"{side:.5f}",
                       "TEMPERATURE": f"{t_ipi:.6f}"})
        note = (f"vibrational temperature {temperature:g} K of {len(atoms)} atoms: i-PI thermostat at "
                f"T*{_n_vibrations(atoms)}/{3 * len(atoms) - 3} = {t_ipi:.4f} K; start velocities "
                f"{'kept from the structure' if keep else f'drawn at {temperature:g} K (seed {seed})'}, "
                f"zero linear and angular momentum")

    text = (TEMPLATE_DIR / f"{template}.xml").read_text()
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise ValueError(f"template {template}.xml has placeholders with no value: {', '.join(sorted(missing))}")
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
    header = f"<!-- rendered by ipi_inputs.render_input from {template}.xml: {note}; socket {address} -->\n"
    out = workdir / f"{prefix}.xml"
    write_text(out, header + text)
    return out


def restart_input(checkpoint: str | os.PathLike, out: str | os.PathLike, socket_name: str) -> Path:
    """An i-PI input that resumes ``checkpoint`` on UNIX socket ``socket_name`` (a resumed run gets a new
    socket); the checkpoint is edited as XML, element by element."""
    import xml.etree.ElementTree as ET

    checkpoint, out = Path(checkpoint), Path(out)
    SocketAddress.unix(socket_name)  # checks the name
    try:
        tree = ET.parse(checkpoint)
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"i-PI checkpoint {checkpoint}: {exc}") from None
    address = tree.getroot().find("ffsocket/address")
    if address is None:
        raise ValueError(f"i-PI checkpoint {checkpoint}: no <ffsocket><address>")
    address.text = f" {socket_name} "
    write_text(out, ET.tostring(tree.getroot(), encoding="unicode") + "\n")
    return out


def _relative_to(path: Path, folder: Path) -> str:
    path, folder = path.resolve(), folder.resolve()
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)
