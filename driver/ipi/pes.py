"""The nanosil committee as an i-PI PES (i-PI's own Python-driver convention), and the reply both of
nanosil's socket drivers send.

With i-PI's driver::

    i-pi-py_driver -u -a NAME -m custom -P driver/ipi/pes.py \\
        -o models=MODELS_DIR,structure=CLUSTER.xyz[,energy_threshold=X][,force_threshold=Y][,trust_cap=Z]
           [,flag_endpoint=ipc:///tmp/flags][,run_id=ID][,threads=1][,dtype=float32][,device=cpu]
           [,dipole_every=K][,step_offset=S]

``nanosil-driver`` (:mod:`driver.main`) builds the same :class:`NanosilDriver` around an MPI-parallel
committee, so both answer identically.

The reply (atomic units at the socket): committee-mean energy (Hartree), mean forces (Hartree/Bohr),
a zero virial (a cluster has no cell), and an extras JSON object::

    {"dipole": [x, y, z],            # e·Bohr, committee mean (absent without a dipole model)
     "dipole_members": [[x, y, z], ...],  # e·Bohr, every dipole member (absent without a dipole model)
     "energy_std_per_atom": s_E,     # Hartree/atom, calibrated
     "max_force_std": s_F,           # Hartree/Bohr, calibrated
     "dipole_std": s_mu,             # e·Bohr, only with >= 2 dipole members
     "uncertain": false,             # flagged for labelling (see driver.flagging)
     "exploded": false}              # committee std above the upper cap

The key ``uncertainty`` is avoided on purpose: i-PI's committee force field reserves it.

Dipole every K steps (``dipole_every``, ``--dipole-every``): the dipole model (a quarter of a P10 step)
runs only on MD steps that are multiples of K, the steps i-PI writes with ``<trajectory stride='K'
extra_type='dipole'>``. i-PI numbers its outputs by MD step: the configuration after s steps is written
with the label ``Step: s`` when s % stride == 0 (label 0 = the initial configuration, which is also i-PI's
first force request), and velocity Verlet asks for one force evaluation per step, so request r of a run
started at MD step S (``step_offset``, a restart from a checkpoint) is the configuration of step S + r.
On the other steps the extras carry the last computed ``dipole``, ``dipole_members`` and ``dipole_std``:
i-PI writes only every K-th step, so nothing stale is ever written (as long as i-PI's stride is a multiple
of K; tests/test_dipole_stride.py checks the written dipoles against the committee on the written positions).
"""
from __future__ import annotations

# this is how i-PI finds the driver when the file is given with -m custom -P
__DRIVER_NAME__ = "nanosil"
__DRIVER_CLASS__ = "NanosilDriver"

import json
from typing import Callable

import numpy as np
from ase import units

try:  # i-PI's base class gives batched calls (compute on lists) for free
    from ipi.pes.dummy import Dummy_driver
except ImportError:  # pragma: no cover - i-PI is a dependency, but the class works without it
    Dummy_driver = object

BOHR = units.Bohr             # Å per Bohr
HARTREE = units.Hartree       # eV per Hartree
FORCE_AU = HARTREE / BOHR     # eV/Å per Hartree/Bohr


class AtomCountMismatch(ValueError):
    """i-PI sent a structure whose atom count differs from --structure."""


class NonFinitePositions(ValueError):
    """i-PI sent NaN or infinite positions (the simulation blew up, or a damaged checkpoint)."""


def check_positions(positions: np.ndarray, step: int, source: str) -> None:
    """Refuse non-finite positions before they reach the model (whose C descriptor would only see two
    replicas that differ). ``step``: the MD step (0 = i-PI's first configuration)."""
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        atoms = np.flatnonzero(bad)
        shown = ", ".join(map(str, atoms[:5])) + (", ..." if len(atoms) > 5 else "")
        raise NonFinitePositions(f"i-PI sent non-finite positions (NaN/inf) at step {step} for {source}: "
                                 f"atom(s) {shown} of {len(positions)}; the simulation has blown up or its "
                                 f"input/checkpoint is damaged")


class DipoleSample:
    """The dipole part of a prediction at one MD step (e·Å): committee mean, members, std."""

    __slots__ = ("step", "dipole", "members", "std")

    def __init__(self, step: int, dipole, members, std):
        self.step, self.dipole, self.members, self.std = step, dipole, members, std

    @classmethod
    def of(cls, prediction, step: int) -> "DipoleSample":
        return cls(step, prediction.dipole, prediction.member_dipoles, prediction.dipole_std)


class DipoleSchedule:
    """Which MD steps compute the dipole (multiples of ``every``), and the last dipole computed.

    ``due(step)``: compute at this step (a multiple of ``every``, or no dipole yet, e.g. the first request
    of a run restarted between two dipole steps). ``sample(prediction, step)``: the dipole to send, i.e. the
    prediction's own on a computed step, else the last computed one (see the module docstring)."""

    def __init__(self, every: int = 1):
        every = int(every)
        if every < 1:
            raise ValueError(f"dipole_every must be >= 1, got {every}")
        self.every = every
        self.last: DipoleSample | None = None
        self.computed = 0

    def due(self, step: int) -> bool:
        return self.every == 1 or self.last is None or step % self.every == 0

    def sample(self, prediction, step: int, computed: bool) -> DipoleSample | None:
        if computed:
            self.last = DipoleSample.of(prediction, step)
            self.computed += 1
        return self.last


def ipi_reply(prediction, decision, dipole: DipoleSample | None = None) -> tuple[float, np.ndarray, np.ndarray, str]:
    """Energy (Hartree), forces (N,3 Hartree/Bohr), zero virial (Hartree) and the extras JSON string.
    ``dipole``: the dipole part to send (the last computed one on a step without dipole); default the
    prediction's own."""
    if dipole is None:
        dipole = DipoleSample.of(prediction, -1)
    extras = {}
    if dipole.dipole is not None:
        extras["dipole"] = (np.asarray(dipole.dipole, dtype=float) / BOHR).tolist()
        extras["dipole_members"] = (np.asarray(dipole.members, dtype=float).reshape(-1, 3) / BOHR).tolist()
    extras["energy_std_per_atom"] = float(prediction.energy_std_per_atom) / HARTREE
    extras["max_force_std"] = float(prediction.max_force_std) / FORCE_AU
    if dipole.std is not None:
        extras["dipole_std"] = float(dipole.std) / BOHR
    extras["uncertain"] = bool(decision.uncertain)
    extras["exploded"] = bool(decision.exploded)
    forces = np.asarray(prediction.forces, dtype=np.float64) / FORCE_AU
    return float(prediction.energy) / HARTREE, forces, np.zeros((3, 3)), json.dumps(extras)


class NanosilDriver(Dummy_driver):
    """i-PI PES class: committee-mean energy and forces, dipole and disagreement in the extras.

    Init arguments (strings from i-PI's ``-o key=value,...``): ``models`` (committee folder),
    ``structure`` (the cluster file: i-PI never sends species), ``energy_threshold`` (eV/atom),
    ``force_threshold`` (eV/Å), ``trust_cap``, ``flag_endpoint``, ``flag_file``, ``run_id``,
    ``allow_remote_flags``, ``threads`` (torch threads), ``dtype`` (float32|float64), ``device``
    (cpu|cuda|auto, :mod:`driver.device`), ``dipole_every``
    (compute the dipole on every K-th MD step only, module docstring), ``step_offset`` (MD step of i-PI's
    first request: a restart from a checkpoint), ``verbose``.
    """

    def __init__(self, models=None, structure=None, energy_threshold=None, force_threshold=None,
                 trust_cap=None, flag_endpoint=None, flag_file="flagged.extxyz", run_id="",
                 allow_remote_flags=False, threads=1, dtype="float32", dipole_every=1, step_offset=0,
                 verbose=False, *args, device="cpu", **kwargs):
        if models is None or structure is None:
            raise ValueError("the nanosil PES needs -o models=MODELS_DIR,structure=CLUSTER.xyz")
        import torch

        from driver.flagging import FlagConfig, Flagger
        from driver.models.committee import load_committee
        from ipi_inputs.files import read_cluster

        torch.set_num_threads(int(threads))
        committee = load_committee(str(models), dtype=_torch_dtype(dtype), device=str(device))
        atoms = read_cluster(str(structure))
        committee.check_numbers(atoms.numbers, source=str(structure))
        config = FlagConfig(energy_threshold=_opt_float(energy_threshold), force_threshold=_opt_float(force_threshold),
                            trust_cap=_opt_float(trust_cap), endpoint=flag_endpoint or None,
                            flag_file=str(flag_file), run_id=str(run_id or ""),
                            allow_remote=bool(allow_remote_flags))
        self._setup(lambda pos, dipoles=True: committee.predict(atoms.numbers, pos, dipoles=dipoles), atoms.numbers,
                    Flagger(config, atoms.numbers, committee.version), str(structure), int(dipole_every),
                    int(step_offset))
        if Dummy_driver is not object:
            super().__init__(verbose, *args, **kwargs)

    @classmethod
    def from_predictor(cls, predict: Callable[..., object], numbers, flagger, source: str = "--structure",
                       dipole_every: int = 1, step_offset: int = 0):
        """The same PES around any ``predict(positions_Å, dipoles=True) -> CommitteePrediction`` (e.g. the
        MPI committee; ``dipoles`` is only passed when ``dipole_every`` > 1)."""
        self = cls.__new__(cls)
        self._setup(predict, numbers, flagger, source, dipole_every, step_offset)
        self.verbose, self.args, self.kwargs = False, (), {}
        return self

    def _setup(self, predict, numbers, flagger, source, dipole_every=1, step_offset=0):
        self.predict = predict
        self.numbers = np.asarray(numbers, dtype=int)
        self.flagger = flagger
        self.source = source
        self.dipoles = DipoleSchedule(dipole_every)
        if int(step_offset) < 0:
            raise ValueError(f"step_offset must be >= 0, got {step_offset}")
        self.step_offset = int(step_offset)
        self.requests = 0

    @property
    def step(self) -> int:
        """The MD step of the next request (i-PI's numbering: 0 = the initial configuration)."""
        return self.step_offset + self.requests

    def compute_structure(self, cell, pos):
        """``pos`` (N,3) and ``cell`` in Bohr -> energy (Hartree), forces (Hartree/Bohr), virial, extras.
        Raises :class:`AtomCountMismatch` or :class:`NonFinitePositions` (both ValueError) for a request
        the model must not see."""
        pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
        if len(pos) != len(self.numbers):
            raise AtomCountMismatch(f"i-PI sent {len(pos)} atoms but {self.source} has {len(self.numbers)}: "
                                    f"driver and i-PI input describe different structures")
        step = self.step
        check_positions(pos, step, self.source)
        positions = pos * BOHR
        due = self.dipoles.due(step)
        prediction = self.predict(positions) if self.dipoles.every == 1 else self.predict(positions, dipoles=due)
        decision = self.flagger.process(step, positions, prediction.energy, prediction.energy_std_per_atom,
                                        prediction.max_force_std, prediction.dipole_std)
        self.requests += 1
        return ipi_reply(prediction, decision, self.dipoles.sample(prediction, step, due))

    def close(self):
        self.flagger.close()


def _opt_float(value):
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return float(value)


def _torch_dtype(name):
    import torch

    table = {"float32": torch.float32, "float64": torch.float64}
    if str(name) not in table:
        raise ValueError(f"dtype must be float32 or float64, got {name!r}")
    return table[str(name)]
