"""i-PI's files, read and trimmed in one place: clusters (xyz with i-PI's unit rules, or anything ASE reads),
socket addresses, checkpoints (positions, velocities, step), and the extras/trajectory files a resumed run
cuts back to its checkpoint. Units: Å and ASE units out, i-PI's atomic units only inside the files."""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase import Atoms, units

from spectra.atomic import write_text

SOCKETS_PREFIX = "/tmp/ipi_"   # i-PI's default <simulation sockets_prefix>: UNIX socket NAME is /tmp/ipi_NAME
# an i-PI xyz comment line (cell and units), as opposed to an extxyz or plain xyz one
_IPI_HEADER = re.compile(r"CELL[\(\[\{](abcABC|H|GENH)[\)\]\}]|\b(positions|cell)\{[A-Za-z_]*\}")
# velocity: i-PI atomic unit (bohr per atomic time unit) in ASE units (Å per ASE time unit)
AU_VELOCITY = units.Bohr / (units._aut * units.second)


# ---------------------------------------------------------------------- clusters and sockets
@dataclass(frozen=True)
class SocketAddress:
    """Where i-PI listens: a UNIX socket NAME (i-PI creates ``SOCKETS_PREFIX + NAME``) or HOST:PORT over TCP."""

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
    so a file means the same here as in i-PI; any other file is read by ASE (Å). A malformed xyz file
    (short atom count, truncated line) raises ValueError naming the file, line and frame."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"structure file {path} does not exist")
    if path.suffix.lower() in (".xyz", ".extxyz"):
        problem = xyz_problem(path)  # i-PI's reader accepts short frames silently; ASE's words name no file
        if problem:
            raise ValueError(problem)
        with open(path, errors="replace") as f:
            f.readline()
            comment = f.readline()
        if _IPI_HEADER.search(comment):
            return _read_ipi_xyz(path)
    from ase.io import read

    try:
        atoms = read(path, index=-1)
    except Exception as exc:  # ASE raises many kinds; the user needs the file name and the reason
        raise ValueError(f"cannot read structure file {path}: {' '.join(str(exc).split())}") from None
    if len(atoms) == 0:
        raise ValueError(f"structure file {path} contains no atoms")
    return atoms


def _position_columns(comment: str) -> tuple[int | None, int | None]:
    """(total columns, first position column) of an extxyz ``Properties=`` comment; (None, 1) for plain xyz
    (symbol x y z, extra columns allowed) and (None, None) when the Properties string cannot be parsed."""
    m = re.search(r"(?i)\bproperties=(\S+)", comment)
    if not m:
        return None, 1
    fields = m.group(1).strip("\"'").split(":")
    if len(fields) % 3:
        return None, None
    total, pos = 0, None
    for name, _kind, count in zip(fields[::3], fields[1::3], fields[2::3]):
        if not count.isdigit():
            return None, None
        if name.lower() == "pos":
            pos = total
        total += int(count)
    return total, pos


def xyz_problem(path: str | os.PathLike) -> str | None:
    """The first layout error of an xyz/extxyz file, as one line naming the file, the line and the frame
    (a bad atom count, a short frame, a truncated atom line, a coordinate that is not a number); None when
    every frame is complete. Read the way ASE and i-PI read: a blank line where an atom count is expected
    ends the file; ``VEC`` lines may follow a frame's atoms."""
    path = Path(path)
    try:
        f = open(path, errors="replace")
    except OSError as exc:
        return f"{path}: cannot be read ({exc.strerror or exc})"
    with f:
        line = f.readline()
        lineno, frame = 1, 0
        if not line.strip():
            return f"{path}: empty file (no structures)"
        while line and line.strip():
            header = line.strip()
            try:
                natoms = int(header)
            except ValueError:
                hint = (f" (does the atom count of frame {frame - 1} match its atom lines?)"
                        if frame and len(header.split()) >= 4 else "")
                return f"{path} line {lineno}: expected the atom count of frame {frame}, got {header[:60]!r}{hint}"
            if natoms < 1:
                return f"{path} line {lineno}: frame {frame} declares {natoms} atoms"
            count_line = lineno
            comment = f.readline()
            lineno += 1
            if not comment:
                return (f"{path}: frame {frame} (atom count {natoms} on line {count_line}) is truncated: "
                        f"the file ends before its comment line")
            total, pos = _position_columns(comment)
            for atom in range(natoms):
                text = f.readline()
                lineno += 1
                where = f"{path} line {lineno} (frame {frame}, atom {atom + 1} of {natoms} declared on line {count_line})"
                if not text:
                    return (f"{path}: frame {frame} declares {natoms} atoms on line {count_line} but the file ends "
                            f"after {atom} atom line(s): truncated file or wrong atom count")
                cols = text.split()
                if len(cols) == 1 and cols[0].lstrip("+-").isdigit():
                    return (f"{where}: expected an atom line, got the atom count {cols[0]}: frame {frame} has "
                            f"only {atom} atom line(s), fewer than declared")
                if total is not None and len(cols) != total:
                    return (f"{where}: {len(cols)} column(s) where its Properties declare {total}: "
                            f"truncated or malformed atom line {text.strip()[:60]!r}")
                if len(cols) < 4:
                    return f"{where}: truncated atom line {text.strip()[:60]!r}: expected 'symbol x y z'"
                if pos is not None:
                    try:
                        [float(c) for c in cols[pos:pos + 3]]
                    except ValueError:
                        return f"{where}: coordinates {' '.join(cols[pos:pos + 3])!r} are not numbers"
            line = f.readline()
            lineno += 1
            while line.lstrip().startswith("VEC"):
                line = f.readline()
                lineno += 1
            frame += 1
    return None


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



# ---------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | os.PathLike) -> Atoms:
    """Positions (Å) and velocities (ASE units) of the first bead of an i-PI checkpoint (``RESTART`` or a
    ``<checkpoint>`` file). Raises ValueError when the file is not a readable checkpoint."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"i-PI checkpoint {path}: {exc}") from None
    beads = root.find("./system/beads")
    if beads is None:
        raise ValueError(f"i-PI checkpoint {path}: no <system><beads> element")

    def array(tag: str) -> np.ndarray:
        node = beads.find(tag)
        if node is None or node.text is None:
            raise ValueError(f"i-PI checkpoint {path}: no <{tag}> in <beads>")
        return np.array([float(x) for x in node.text.strip().strip("[]").split(",") if x.strip()])

    natoms = int(beads.get("natoms"))
    q = array("q")[: 3 * natoms].reshape(natoms, 3)          # Bohr
    p = array("p")[: 3 * natoms].reshape(natoms, 3)          # atomic units of momentum
    m = array("m")[:natoms]                                  # electron masses
    names_node = beads.find("names")
    if names_node is None or names_node.text is None:
        raise ValueError(f"i-PI checkpoint {path}: no <names> in <beads>")
    names = [s.strip() for s in names_node.text.strip().strip("[]").split(",") if s.strip()]
    if len(names) != natoms or not np.all(m > 0):
        raise ValueError(f"i-PI checkpoint {path}: inconsistent atoms")
    # the simulation's own masses (i-PI's table differs from ASE's in the 5th digit): velocities then
    # survive any later set_masses(i-PI masses) unchanged, and momenta stay those of the checkpoint
    atoms = Atoms(symbols=names, positions=q * units.Bohr, masses=m * units._me / units._amu)
    atoms.set_velocities((p / m[:, None]) * AU_VELOCITY)
    if not (np.all(np.isfinite(atoms.positions)) and np.all(np.isfinite(atoms.get_velocities()))):
        raise ValueError(f"i-PI checkpoint {path}: non-finite positions or velocities")
    return atoms


def checkpoint_step(path: Path) -> int | None:
    """The ``<step>`` of an i-PI checkpoint (completed MD steps), or None if unreadable."""
    try:
        root = ET.parse(path).getroot()
        node = root.find("step")
        return int(node.text.strip()) if node is not None and node.text else None
    except (ET.ParseError, OSError, ValueError):
        return None


def latest_checkpoint(folder: str | os.PathLike, prefix: str) -> tuple[Path, int] | None:
    """The newest consistent state of a run: ``PREFIX.chk`` (i-PI's periodic checkpoint) or ``RESTART``
    (written by i-PI when it stops, at its last safe step), whichever has more steps, with that step."""
    folder, best = Path(folder), None
    for name in (f"{prefix}.chk", "RESTART"):
        path = folder / name
        step = checkpoint_step(path) if path.is_file() else None
        if step is not None and (best is None or step > best[1]):
            best = (path, step)
    return best


_EXTRAS_HEADER = re.compile(r"^\s*#\s*EXTRAS\((\w+)\)#\s*Step:\s*(\d+)")


def expected_labels(last: int, stride: int = 1) -> list[int]:
    """The step labels i-PI writes up to MD step ``last`` with ``<trajectory stride='stride'>``: i-PI writes
    the configuration after s steps (label s) when s % stride == 0, the initial one (label 0) included, and
    keeps counting from the checkpoint's step after a restart, so the labels are 0, K, 2K, ... <= last."""
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    return list(range(0, int(last) + 1, int(stride)))


def dipole_labels(path: Path) -> list[int]:
    """Step labels of an i-PI extras file (``dipole``, ``dipole_members``, ...; label L = the configuration
    after L steps)."""
    labels = []
    if path.is_file():
        with open(path, errors="replace") as f:
            for line in f:
                m = _EXTRAS_HEADER.match(line)
                if m:
                    labels.append(int(m.group(2)))
    return labels


def cut_dipoles(path: Path, last: int, stride: int = 1) -> bool:
    """Keep the frames of an i-PI extras file (dipole or dipole_members) with label <= ``last``; True when
    they are exactly those i-PI writes with this ``stride`` (0, K, 2K, ... <= last: nothing missing, see
    :func:`expected_labels`) and every kept frame is whole (as many data lines as the first, each ending in a
    newline). False leaves the file untouched: the run cannot be resumed seamlessly from ``last``."""
    if not path.is_file():
        return False
    kept, labels, rows, keep = [], [], [], True
    with open(path, errors="replace") as f:
        for line in f:
            m = _EXTRAS_HEADER.match(line)
            if m:
                keep = int(m.group(2)) <= last
                if keep:
                    labels.append(int(m.group(2)))
                    rows.append(0)
            elif keep and rows and line.strip():
                rows[-1] += 1
            if keep:
                kept.append(line)
    if labels != expected_labels(last, stride) or (kept and not kept[-1].endswith("\n")):
        return False
    if rows and (min(rows) == 0 or len(set(rows)) > 1):  # a header without its rows, or a torn frame
        return False
    write_text(path, "".join(kept))
    return True


def cut_rows(path: Path, keep) -> None:
    """Keep comment lines and the rows whose first column passes ``keep`` (i-PI out, uncertainty CSV)."""
    if not path.is_file():
        return
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            head = line.split(",", 1)[0].split()[0] if line.strip() else ""
            try:
                value = float(head)
            except ValueError:
                out.append(line)  # header or comment
                continue
            if keep(value) and line.endswith("\n"):
                out.append(line)
    write_text(path, "".join(out))


_XYZ_STEP = re.compile(r"Step:\s*(\d+)")


def cut_xyz(path: Path, last: int) -> None:
    """Keep the frames of i-PI's xyz trajectory whose comment says ``Step: <= last``."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    out, i = [], 0
    while i < len(lines):
        try:
            n = int(lines[i].split()[0])
        except (ValueError, IndexError):
            break
        frame = lines[i:i + n + 2]
        if len(frame) < n + 2 or not frame[-1].endswith("\n"):
            break
        m = _XYZ_STEP.search(frame[1])
        if m and int(m.group(1)) > last:
            break
        out.extend(frame)
        i += n + 2
    write_text(path, "".join(out))
