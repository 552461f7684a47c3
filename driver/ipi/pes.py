"""The nanosil committee as an i-PI PES (i-PI's own Python-driver convention), and the reply both of
nanosil's socket drivers send.

With i-PI's driver::

    i-pi-py_driver -u -a NAME -m custom -P driver/ipi/pes.py \\
        -o models=MODELS_DIR,structure=CLUSTER.xyz[,energy_threshold=X][,force_threshold=Y][,trust_cap=Z]
           [,flag_endpoint=ipc:///tmp/flags][,run_id=ID][,threads=1][,dtype=float32]

``nanosil-driver`` (:mod:`driver.main`) builds the same :class:`NanosilDriver` around an MPI-parallel
committee, so both answer identically.

The reply (atomic units at the socket): committee-mean energy (Hartree), mean forces (Hartree/Bohr),
a zero virial (a cluster has no cell), and an extras JSON object::

    {"dipole": [x, y, z],            # e·Bohr, committee mean (absent without a dipole model)
     "energy_std_per_atom": s_E,     # Hartree/atom, calibrated
     "max_force_std": s_F,           # Hartree/Bohr, calibrated
     "dipole_std": s_mu,             # e·Bohr, only with >= 2 dipole members
     "uncertain": false,             # flagged for labelling (see driver.flagging)
     "exploded": false}              # committee std above the upper cap

The key ``uncertainty`` is avoided on purpose: i-PI's committee force field reserves it.
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
    replicas that differ). ``step``: the request index (0 = i-PI's first configuration)."""
    bad = ~np.isfinite(positions).all(axis=1)
    if bad.any():
        atoms = np.flatnonzero(bad)
        shown = ", ".join(map(str, atoms[:5])) + (", ..." if len(atoms) > 5 else "")
        raise NonFinitePositions(f"i-PI sent non-finite positions (NaN/inf) at step {step} for {source}: "
                                 f"atom(s) {shown} of {len(positions)}; the simulation has blown up or its "
                                 f"input/checkpoint is damaged")


def ipi_reply(prediction, decision) -> tuple[float, np.ndarray, np.ndarray, str]:
    """Energy (Hartree), forces (N,3 Hartree/Bohr), zero virial (Hartree) and the extras JSON string."""
    extras = {}
    if prediction.dipole is not None:
        extras["dipole"] = (np.asarray(prediction.dipole, dtype=float) / BOHR).tolist()
    extras["energy_std_per_atom"] = float(prediction.energy_std_per_atom) / HARTREE
    extras["max_force_std"] = float(prediction.max_force_std) / FORCE_AU
    if prediction.dipole_std is not None:
        extras["dipole_std"] = float(prediction.dipole_std) / BOHR
    extras["uncertain"] = bool(decision.uncertain)
    extras["exploded"] = bool(decision.exploded)
    forces = np.asarray(prediction.forces, dtype=np.float64) / FORCE_AU
    return float(prediction.energy) / HARTREE, forces, np.zeros((3, 3)), json.dumps(extras)


class NanosilDriver(Dummy_driver):
    """i-PI PES class: committee-mean energy and forces, dipole and disagreement in the extras.

    Init arguments (strings from i-PI's ``-o key=value,...``): ``models`` (committee folder),
    ``structure`` (the cluster file: i-PI never sends species), ``energy_threshold`` (eV/atom),
    ``force_threshold`` (eV/Å), ``trust_cap``, ``flag_endpoint``, ``flag_file``, ``run_id``,
    ``allow_remote_flags``, ``threads`` (torch threads), ``dtype`` (float32|float64), ``verbose``.
    """

    def __init__(self, models=None, structure=None, energy_threshold=None, force_threshold=None,
                 trust_cap=None, flag_endpoint=None, flag_file="flagged.extxyz", run_id="",
                 allow_remote_flags=False, threads=1, dtype="float32", verbose=False, *args, **kwargs):
        if models is None or structure is None:
            raise ValueError("the nanosil PES needs -o models=MODELS_DIR,structure=CLUSTER.xyz")
        import torch

        from driver.flagging import FlagConfig, Flagger
        from driver.models.committee import load_committee
        from ipi_inputs.files import read_cluster

        torch.set_num_threads(int(threads))
        committee = load_committee(str(models), dtype=_torch_dtype(dtype))
        atoms = read_cluster(str(structure))
        committee.check_numbers(atoms.numbers, source=str(structure))
        config = FlagConfig(energy_threshold=_opt_float(energy_threshold), force_threshold=_opt_float(force_threshold),
                            trust_cap=_opt_float(trust_cap), endpoint=flag_endpoint or None,
                            flag_file=str(flag_file), run_id=str(run_id or ""),
                            allow_remote=bool(allow_remote_flags))
        self._setup(lambda pos: committee.predict(atoms.numbers, pos), atoms.numbers,
                    Flagger(config, atoms.numbers, committee.version), str(structure))
        if Dummy_driver is not object:
            super().__init__(verbose, *args, **kwargs)

    @classmethod
    def from_predictor(cls, predict: Callable[[np.ndarray], object], numbers, flagger, source: str = "--structure"):
        """The same PES around any ``predict(positions_Å) -> CommitteePrediction`` (e.g. the MPI committee)."""
        self = cls.__new__(cls)
        self._setup(predict, numbers, flagger, source)
        self.verbose, self.args, self.kwargs = False, (), {}
        return self

    def _setup(self, predict, numbers, flagger, source):
        self.predict = predict
        self.numbers = np.asarray(numbers, dtype=int)
        self.flagger = flagger
        self.source = source
        self.step = 0

    def compute_structure(self, cell, pos):
        """``pos`` (N,3) and ``cell`` in Bohr -> energy (Hartree), forces (Hartree/Bohr), virial, extras.
        Raises :class:`AtomCountMismatch` or :class:`NonFinitePositions` (both ValueError) for a request
        the model must not see."""
        pos = np.asarray(pos, dtype=np.float64).reshape(-1, 3)
        if len(pos) != len(self.numbers):
            raise AtomCountMismatch(f"i-PI sent {len(pos)} atoms but {self.source} has {len(self.numbers)}: "
                                    f"driver and i-PI input describe different structures")
        check_positions(pos, self.step, self.source)
        positions = pos * BOHR
        prediction = self.predict(positions)
        decision = self.flagger.process(self.step, positions, prediction.energy, prediction.energy_std_per_atom,
                                        prediction.max_force_std, prediction.dipole_std)
        self.step += 1
        return ipi_reply(prediction, decision)

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
