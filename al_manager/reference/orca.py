"""ORCA backend: the paper's exact reference, PBE0/def2-SVP with RIJCOSX (def2/J), TightSCF, DEFGRID2.

ORCA is proprietary; users who have it point the project at the binary (full path, needed for parallel
ORCA) with the backend option ``command=``, the ``ORCA_COMMAND`` environment variable, or ``orca`` on
PATH. The run goes through ASE's ORCA calculator (``OrcaProfile``); results are read from the files
ORCA writes:

* energy: the last ``FINAL SINGLE POINT ENERGY`` of ``orca.out`` (NaN for an unconverged wavefunction,
  which is then retried with ``SlowConv`` + level shift, then ``VerySlowConv`` + early SOSCF);
* forces: ``orca.engrad`` (hence ``EnGrad`` in the input);
* dipole: the last ``Total Dipole Moment`` (atomic units, about the centre of mass) in e·Å, moved
  to the coordinate origin for charged clusters;
* harmonic frequencies (cm^-1), IR intensities (km/mol) and normal modes of a ``Freq`` run.

The parsers are module functions so that existing ORCA outputs can be read without a binary.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import warnings
from io import StringIO
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.units import Hartree

from spectra.harmonic import HarmonicIR

from .base import Label, ReferenceBackend, ReferenceError, _checked_label, _one_line

#: The paper's single-point input (ORCA 5): energy + gradient, the dipole comes with every run.
PAPER_SIMPLE_INPUT = "PBE0 def2-SVP def2/J RIJCOSX TightSCF EnGrad DEFGRID2"
#: Analytic harmonic frequencies and IR intensities at the same level.
FREQ_SIMPLE_INPUT = "PBE0 def2-SVP def2/J RIJCOSX TightSCF Freq DEFGRID2"
#: SCF retries: (extra simple-input keywords, %scf block body)
SCF_ATTEMPTS = (
    ("", "MaxIter 300"),
    ("SlowConv", "MaxIter 500\n  Shift Shift 0.3 ErrOff 0.0 end"),
    ("VerySlowConv", "MaxIter 1000\n  SOSCFStart 0.00033"),
)

ORCA_HOWTO = ("install ORCA (free for academic use, https://orcaforum.kofo.mpg.de) and point nanosil at the "
              "binary with its full path: backend option command=/path/to/orca (CLI: --orca-command), or "
              "export ORCA_COMMAND=/path/to/orca, or put the folder holding 'orca' on PATH")


class OrcaNotFoundError(FileNotFoundError):
    """No usable ORCA binary; the message says how to point the project at one."""


def find_orca(command: str | None = None) -> str:
    """Full path of the ORCA binary: ``command``, else ``$ORCA_COMMAND``, else ``orca`` on PATH."""
    for source, value in (("command option", command), ("ORCA_COMMAND", os.environ.get("ORCA_COMMAND"))):
        if value:
            path = shlex.split(value)[0]
            resolved = shutil.which(path)
            if resolved is None:
                raise OrcaNotFoundError(f"ORCA binary {path!r} (from the {source}) does not exist or is not "
                                        f"executable; {ORCA_HOWTO}")
            return os.path.abspath(resolved)
    resolved = shutil.which("orca")
    if resolved is None:
        raise OrcaNotFoundError(f"ORCA binary not found; {ORCA_HOWTO}")
    return os.path.abspath(resolved)


# --------------------------------------------------------------------------------------------------
# input

def orca_blocks(nprocs: int = 1, maxcore: int = 1000, scf: str = "MaxIter 300", extra: str = "") -> str:
    """The ``%`` blocks: parallel processes, memory per process (MB), SCF settings, anything extra."""
    lines = [f"%pal nprocs {int(nprocs)} end", f"%maxcore {int(maxcore)}", f"%scf\n  {scf}\nend"]
    if extra.strip():
        lines.append(extra.strip())
    return "\n".join(lines)


def orca_input_text(atoms: Atoms, *, simple_input: str = PAPER_SIMPLE_INPUT, charge: int = 0,
                    multiplicity: int = 1, nprocs: int = 1, maxcore: int = 1000, scf: str = "MaxIter 300",
                    extra_blocks: str = "") -> str:
    """The text of ``orca.inp`` exactly as the ASE ORCA calculator writes it."""
    from ase.io.orca import write_orca

    buf = StringIO()
    write_orca(buf, atoms, {"orcasimpleinput": simple_input, "charge": int(charge), "mult": int(multiplicity),
                            "orcablocks": orca_blocks(nprocs, maxcore, scf, extra_blocks)})
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# output parsers (work on real ORCA 5/6 files, no binary needed)

def _lines(path_or_text) -> list[str]:
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text):
        return Path(path_or_text).read_text(errors="replace").splitlines()
    return str(path_or_text).splitlines()


def read_orca_energy(out) -> float:
    """Final single-point energy (eV) of an ORCA output; NaN when the wavefunction did not converge."""
    from ase.io.orca import read_energy

    lines = _lines(out)
    energy = read_energy(lines)
    if energy is None:
        raise ReferenceError("orca: no 'FINAL SINGLE POINT ENERGY' in the output (run did not finish)")
    last = max((i for i, line in enumerate(lines) if "FINAL SINGLE POINT ENERGY" in line), default=0)
    block = lines[max(0, last - 400): last + 1]
    if any("not fully converged" in line or "SCF NOT CONVERGED" in line for line in block):
        return float("nan")
    return float(energy)


def read_orca_dipole(out, charge: int = 0) -> np.ndarray | None:
    """Last ``Total Dipole Moment`` in e·Å about the coordinate origin (ORCA prints it about the centre of
    mass; the two differ only for charged clusters), or None when absent."""
    from ase.io.orca import read_center_of_mass, read_dipole

    lines = _lines(out)
    dipole = read_dipole(lines)
    if dipole is None:
        return None
    com = read_center_of_mass(lines)
    if com is not None and charge:
        dipole = dipole + charge * com
    return np.asarray(dipole, dtype=float)


def read_orca_engrad(path) -> tuple[float, np.ndarray]:
    """(energy eV, forces eV/Å) from an ``orca.engrad`` file."""
    from ase.io.orca import read_orca_engrad as _ase_read_engrad

    lines = Path(path).read_text().splitlines()
    energy = None
    for i, line in enumerate(lines):
        if line.startswith("# The current total energy"):
            energy = float(lines[i + 2]) * Hartree
            break
    forces = _ase_read_engrad(str(path))
    n_atoms = int(next(lines[i + 2] for i, line in enumerate(lines) if line.startswith("# Number of atoms")))
    if energy is None or forces.shape != (n_atoms, 3):
        raise ReferenceError(f"orca: malformed engrad file {path}")
    return energy, forces


def read_orca_results(out_path, engrad_path=None, charge: int = 0) -> dict:
    """ASE results dict (energy, free_energy, dipole, forces where present) of a finished ORCA run.

    Raises :class:`ReferenceError` when the energy is NaN (unconverged SCF)."""
    out_path = Path(out_path)
    energy = read_orca_energy(out_path)
    if not np.isfinite(energy):
        raise ReferenceError("orca: SCF not converged (wavefunction not fully converged)")
    results = {"energy": energy, "free_energy": energy}
    dipole = read_orca_dipole(out_path, charge)
    if dipole is not None:
        results["dipole"] = dipole
    engrad_path = Path(engrad_path) if engrad_path is not None else out_path.with_suffix(".engrad")
    if engrad_path.is_file():
        _, results["forces"] = read_orca_engrad(engrad_path)
    return results


_FREQ_RE = re.compile(r"^\s*(\d+):\s+(-?\d+\.\d+)\s+cm\*\*-1")
_IR_RE = re.compile(r"^\s*(\d+):\s+(-?\d+\.\d+)\s+([-\d.eE+]+)\s+([-\d.eE+]+)\s")


def _last_block(lines: list[str], title: str) -> int:
    idx = [i for i, line in enumerate(lines) if line.strip() == title]
    if not idx:
        raise ReferenceError(f"orca: no {title} section in the output (not a Freq run?)")
    return idx[-1]


def read_orca_frequencies(out) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies cm^-1, IR intensities km/mol) of all 3N modes of the last ``Freq`` block, in ORCA's
    order (translations/rotations as 0, imaginary modes negative); modes without IR line get 0."""
    lines = _lines(out)
    start = _last_block(lines, "VIBRATIONAL FREQUENCIES")
    freqs: dict[int, float] = {}
    for line in lines[start + 1:]:
        m = _FREQ_RE.match(line)
        if m:
            freqs[int(m.group(1))] = float(m.group(2))
        elif freqs and line.strip().startswith("---"):
            break
    if not freqs:
        raise ReferenceError("orca: empty VIBRATIONAL FREQUENCIES section")
    n = max(freqs) + 1
    frequencies = np.array([freqs.get(i, 0.0) for i in range(n)])
    intensities = np.zeros(n)
    ir_start = _last_block(lines, "IR SPECTRUM")
    for line in lines[ir_start + 1:]:
        m = _IR_RE.match(line)
        if m:
            intensities[int(m.group(1))] = float(m.group(4))
        elif line.startswith("* ") or "first frequency considered" in line:
            break
    return frequencies, intensities


def read_orca_normal_modes(out) -> np.ndarray:
    """(3N, 3N) ORCA ``NORMAL MODES`` (column k = mode k, Cartesian, normalised after mass weighting)."""
    lines = _lines(out)
    start = _last_block(lines, "NORMAL MODES")
    columns: dict[int, dict[int, float]] = {}
    header: list[int] = []
    for line in lines[start + 2:]:
        parts = line.split()
        if not parts:
            continue
        if line.strip().startswith("---") or parts[0].isalpha() or parts[0].startswith("*"):
            if columns:
                break
            continue
        if all(p.isdigit() for p in parts) and "." not in line:
            header = [int(p) for p in parts]
            for h in header:
                columns.setdefault(h, {})
            continue
        if header and parts[0].isdigit() and len(parts) == len(header) + 1:
            row = int(parts[0])
            for h, v in zip(header, parts[1:]):
                columns[h][row] = float(v)
    n = len(columns)
    if n == 0:
        raise ReferenceError("orca: empty NORMAL MODES section")
    return np.array([[columns[k].get(i, 0.0) for k in range(n)] for i in range(n)])


def read_orca_harmonic(out, masses) -> HarmonicIR:
    """:class:`HarmonicIR` of a ``Freq`` run; ``masses`` (amu, one per atom) turn ORCA's normal modes into
    the ASE convention (mass-weighted unit eigenvector times m^-1/2)."""
    freq, inten = read_orca_frequencies(out)
    raw = read_orca_normal_modes(out)
    masses = np.asarray(masses, dtype=float)
    n_atoms = len(masses)
    if raw.shape != (3 * n_atoms, 3 * n_atoms) or len(freq) != 3 * n_atoms:
        raise ReferenceError(f"orca: {len(freq)} modes in the output for {n_atoms} atoms")
    sqrt_m = np.repeat(np.sqrt(masses), 3)
    modes = np.zeros((3 * n_atoms, n_atoms, 3))
    for k in range(3 * n_atoms):
        e = raw[:, k] * sqrt_m
        norm = np.linalg.norm(e)
        if norm > 0:
            modes[k] = (e / norm / sqrt_m).reshape(n_atoms, 3)
    order = np.argsort(freq, kind="stable")
    return HarmonicIR(freq[order], inten[order], modes[order], "orca")


# --------------------------------------------------------------------------------------------------
# the calculator and the backend

def _orca_calculator(command: str, directory, **parameters):
    """ASE's ORCA calculator whose results come from :func:`read_orca_results` (NaN energy -> error,
    forces from ``orca.engrad``, dipole moved to the coordinate origin)."""
    from ase.calculators.orca import ORCA, OrcaProfile, OrcaTemplate

    charge = int(parameters.get("charge", 0))

    class _Template(OrcaTemplate):
        def read_results(self, directory):
            return read_orca_results(Path(directory) / self.outputname, charge=charge)

    calc = ORCA(profile=OrcaProfile(command=shlex.quote(command)), directory=str(directory), **parameters)
    calc.template = _Template()
    return calc


class OrcaBackend(ReferenceBackend):
    """ORCA with the paper's input. Options: ``command`` (binary), ``nprocs`` (``%pal``), ``maxcore``
    (MB per process), ``charge``, ``multiplicity``, ``simple_input``, ``extra_blocks`` (appended to the
    ``%`` blocks), ``workdir`` (where run folders go; default a temporary folder), ``keep_files``
    (keep run folders of successful runs; failed runs are always kept and named in the error)."""

    name = "orca"
    method = "orca:PBE0/def2-SVP/RIJCOSX"
    analytic_hessian = "analytic Hessian (ORCA Freq)"
    supported_numbers = frozenset(range(1, 87))  # def2 basis sets and def2/J: H to Rn

    def __init__(self, *, command: str | None = None, nprocs: int = 1, maxcore: int = 1000, charge: int = 0,
                 multiplicity: int | None = None, simple_input: str = PAPER_SIMPLE_INPUT, extra_blocks: str = "",
                 workdir: str | None = None, keep_files: bool = False):
        self._command = command
        self.nprocs, self.maxcore = int(nprocs), int(maxcore)
        self.charge, self.multiplicity = int(charge), multiplicity
        self.simple_input, self.extra_blocks = simple_input, extra_blocks
        self.workdir, self.keep_files = workdir, bool(keep_files)

    @property
    def command(self) -> str:
        return find_orca(self._command)

    def check_available(self) -> None:
        self.command  # noqa: B018  (raises OrcaNotFoundError with the how-to)

    def input_text(self, atoms: Atoms, *, simple_input: str | None = None, attempt: int = 0) -> str:
        """The ``orca.inp`` this backend writes for ``atoms`` (``attempt`` > 0: an SCF retry)."""
        charge, mult = self.check(atoms)
        keywords, scf = SCF_ATTEMPTS[attempt]
        return orca_input_text(atoms, simple_input=f"{simple_input or self.simple_input} {keywords}".strip(),
                               charge=charge, multiplicity=mult, nprocs=self.nprocs, maxcore=self.maxcore,
                               scf=scf, extra_blocks=self.extra_blocks)

    def _parameters(self, charge, mult, simple_input, attempt=0) -> dict:
        keywords, scf = SCF_ATTEMPTS[attempt]
        return {"charge": int(charge), "mult": int(mult),
                "orcasimpleinput": f"{simple_input} {keywords}".strip(),
                "orcablocks": orca_blocks(self.nprocs, self.maxcore, scf, self.extra_blocks)}

    def _calculator_for(self, charge: int, multiplicity: int):
        directory = tempfile.mkdtemp(prefix="nanosil-orca-", dir=self.workdir)
        return _orca_calculator(self.command, directory, **self._parameters(charge, multiplicity, self.simple_input))

    def _run(self, atoms: Atoms, simple_input: str, properties=("energy", "forces", "dipole")):
        """Run ORCA (with SCF retries); returns (results, run folder). Raises ReferenceError."""
        command = self.command
        charge, mult = self.check(atoms)
        if self.workdir:
            Path(self.workdir).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="nanosil-orca-", dir=self.workdir))
        last = ""
        for attempt in range(len(SCF_ATTEMPTS)):
            directory = root / f"attempt{attempt}"
            calc = _orca_calculator(command, directory, **self._parameters(charge, mult, simple_input, attempt))
            work = Atoms(numbers=atoms.numbers, positions=atoms.positions)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    calc.calculate(work, list(properties), ["positions", "numbers"])
                results = dict(calc.results)
            except ReferenceError as exc:  # NaN energy: SCF not converged -> retry
                last = str(exc)
                continue
            except subprocess.CalledProcessError as exc:
                tail = _tail(directory / "orca.out")
                if "NOT CONVERGED" in tail.upper():
                    last = f"SCF not converged (exit code {exc.returncode})"
                    continue
                raise ReferenceError(f"orca: exit code {exc.returncode} in {directory}: {tail}") from exc
            except OSError as exc:
                raise ReferenceError(f"orca: could not run {command}: {exc}") from exc
            missing = [p for p in properties if p not in results]
            if missing:
                raise ReferenceError(f"orca: {', '.join(missing)} missing from the output in {directory}")
            return results, directory, root
        raise ReferenceError(f"orca: SCF not converged after {len(SCF_ATTEMPTS)} attempts (default, SlowConv + "
                             f"level shift, VerySlowConv + SOSCF); last: {last}; files in {root}")

    def _cleanup(self, root: Path) -> None:
        if not self.keep_files:
            shutil.rmtree(root, ignore_errors=True)

    def label(self, atoms: Atoms) -> Label:
        charge, mult = self.check(atoms)
        t0 = time.perf_counter()
        results, directory, root = self._run(atoms, self.simple_input)
        label = _checked_label(self.name, results["energy"], results["forces"], results["dipole"],
                               {"seconds": time.perf_counter() - t0, "charge": charge, "multiplicity": mult,
                                "attempt": int(directory.name.removeprefix("attempt"))})
        self._cleanup(root)
        return label

    def harmonic(self, atoms: Atoms, **_ignored) -> HarmonicIR:
        """Analytic ORCA frequencies and IR intensities (``Freq``) at the given geometry."""
        simple = re.sub(r"\bEnGrad\b", "Freq", self.simple_input)
        if "Freq" not in simple:
            simple += " Freq"
        results, directory, root = self._run(atoms, simple, properties=("energy",))
        try:
            har = read_orca_harmonic(directory / "orca.out", atoms.get_masses())
        except Exception as exc:
            raise ReferenceError(f"orca harmonic: {_one_line(exc)} (files in {root})") from exc
        self._cleanup(root)
        return har


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return " | ".join(lines[-n:])
