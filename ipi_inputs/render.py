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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.md.velocitydistribution import Stationary, ZeroRotation, thermalize_momenta

from spectra.spectrum import atomic_write_text as _write_atomic

TEMPLATE_DIR = Path(__file__).resolve().parent
TEMPLATES = ("al_sampling", "production_nvt", "production_nve")
TIMESTEP_FS = 0.5                       # the timestep written in every template
AL_MAX_STEPS = int(5000 / TIMESTEP_FS)  # active-learning sampling runs at most 5 ps
DEFAULT_BOX = 50.0                      # Å, minimum box side; grown for big clusters
BOX_MARGIN = 30.0                       # Å added to the cluster's extent
DEFAULT_TIMEOUT = 300.0                 # s before i-PI declares a silent driver dead
_PLACEHOLDER = re.compile(r"@@([A-Z_]+)@@")
# i-PI reads an xyz comment line for units; such a file is read the way i-PI would read it
_IPI_HEADER = re.compile(r"CELL[\(\[\{](abcABC|H|GENH)[\)\]\}]|\b(positions|cell)\{[A-Za-z_]*\}")
# velocity: i-PI atomic unit (bohr per atomic time unit) in ASE units (Å per ASE time unit)
_AU_VELOCITY = units.Bohr / (units._aut * units.second)


@dataclass(frozen=True)
class SocketAddress:
    """Where i-PI listens: a UNIX socket NAME (i-PI creates ``/tmp/ipi_NAME``) or HOST:PORT over TCP."""

    mode: str          # "unix" or "inet"
    address: str       # socket name (unix) or host (inet)
    port: int = 65535  # unused for unix sockets

    @classmethod
    def parse(cls, spec: "str | SocketAddress") -> "SocketAddress":
        """``unix:NAME``, ``inet:HOST:PORT``, ``HOST:PORT`` (inet) or a bare ``NAME`` (unix)."""
        if isinstance(spec, SocketAddress):
            return spec
        text = str(spec).strip()
        if text.startswith("unix:"):
            return cls.unix(text[5:])
        if text.startswith("inet:"):
            text = text[5:]
        elif ":" not in text:
            return cls.unix(text)
        host, _, port = text.rpartition(":")
        try:
            port_number = int(port)
        except ValueError:
            raise ValueError(f"socket address {spec!r}: port {port!r} is not a number") from None
        if not host or not 1 <= port_number <= 65535:
            raise ValueError(f"socket address {spec!r}: expected HOST:PORT with a port in 1..65535")
        return cls("inet", host.strip("[]"), port_number)

    @classmethod
    def unix(cls, name: str) -> "SocketAddress":
        if not name or "/" in name or any(c.isspace() for c in name):
            raise ValueError(f"UNIX socket name {name!r}: give a plain name (i-PI makes /tmp/ipi_NAME)")
        return cls("unix", name)

    def __str__(self) -> str:
        return f"unix:{self.address}" if self.mode == "unix" else f"{self.address}:{self.port}"


def read_cluster(path: str | os.PathLike) -> Atoms:
    """Read a cluster (last frame) in Å. An xyz file with an i-PI comment line (``# CELL(abcABC): ...
    positions{angstrom}``) is read with i-PI's own rules, i.e. in Bohr unless its header says otherwise,
    so a file means the same here as in i-PI; any other file is read by ASE (Å)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    if path.suffix.lower() == ".xyz":
        with open(path) as f:
            f.readline()
            comment = f.readline()
        if _IPI_HEADER.search(comment):
            return _read_ipi_xyz(path)
    from ase.io import read

    try:
        atoms = read(path, index=-1)
    except Exception as exc:  # ASE raises many kinds; the user needs the file name and the reason
        raise ValueError(f"cannot read structure file {path}: {exc}") from None
    if len(atoms) == 0:
        raise ValueError(f"structure file {path} contains no atoms")
    return atoms


def _read_ipi_xyz(path: Path) -> Atoms:
    from ipi.utils.io import iter_file

    frame = None
    try:
        with open(path) as f:
            for frame in iter_file("xyz", f):
                pass
    except Exception as exc:
        raise ValueError(f"cannot read i-PI xyz file {path}: {exc}") from None
    if frame is None:
        raise ValueError(f"structure file {path} contains no atoms")
    atoms = frame["atoms"]
    positions = np.asarray(atoms.q, dtype=float).reshape(-1, 3) * units.Bohr
    return Atoms(symbols=list(atoms.names), positions=positions)


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
                 velocities: str = "auto", box: float | None = None, timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Write ``<workdir>/<prefix>.xml`` from template ``al_sampling`` | ``production_nvt`` | ``production_nve``.

    - ``socket``: see :meth:`SocketAddress.parse` (``unix:NAME`` or ``HOST:PORT``).
    - ``temperature``: target vibrational temperature (K) of the NVT templates.
    - ``structure`` (NVT templates): ASE Atoms or a file (see :func:`read_cluster`); written as
      ``<prefix>.init.xyz`` in Å, centred in a cubic box (``box`` Å, default :func:`box_side`), with
      velocities ``<prefix>.init_vel.xyz`` in atomic units. ``velocities``: ``"thermal"`` draws them at
      ``temperature``, ``"keep"`` uses those the structure carries, ``"auto"`` keeps them when present.
    - ``checkpoint`` (``production_nve``): an i-PI checkpoint of an equilibrated run.
    - ``steps``, ``seed``, ``prefix`` (output files ``<prefix>.out`` ...), ``timeout`` (s, hung driver).
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
    if template == "al_sampling" and steps > AL_MAX_STEPS:
        raise ValueError(f"al_sampling runs at most 5 ps ({AL_MAX_STEPS} steps of {TIMESTEP_FS} fs), "
                         f"got {steps} steps")
    if int(seed) != seed or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")

    values = {"PREFIX": prefix, "STEPS": str(int(steps)), "SEED": str(int(seed)),
              "SOCKET_MODE": address.mode, "ADDRESS": address.address, "PORT": str(address.port),
              "TIMEOUT": f"{float(timeout):g}"}
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
        vel_au = start_velocities(atoms, temperature, seed, keep=keep) / _AU_VELOCITY
        symbols = atoms.get_chemical_symbols()
        struct_file, vel_file = workdir / f"{prefix}.init.xyz", workdir / f"{prefix}.init_vel.xyz"
        _write_atomic(struct_file, _ipi_xyz(symbols, positions, side, "positions", "angstrom"))
        _write_atomic(vel_file, _ipi_xyz(symbols, vel_au, side, "velocities", "atomic_unit"))
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
    _write_atomic(out, header + text)
    return out


def _relative_to(path: Path, folder: Path) -> str:
    path, folder = path.resolve(), folder.resolve()
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)
