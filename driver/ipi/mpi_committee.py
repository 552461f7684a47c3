"""The committee spread over MPI ranks: rank 0 broadcasts positions, every rank evaluates its share of
the members, rank 0 gathers the raw member outputs and reduces them with ``Committee.summarize``.

Members are split in contiguous blocks of the list [energy members..., dipole members...], so gathering
in rank order restores the committee's own member order and the reduction is the single-process one.
With one rank (no mpirun) the same code runs without any communication partner.

Work loop: ranks > 0 call :meth:`MPICommittee.serve` and block until rank 0 calls :meth:`predict`
(one structure, with or without the dipole members) or :meth:`stop`. All buffers are numpy arrays (no
pickling between ranks); a step without dipoles sends zeros in their place, so every record keeps its size.
"""
from __future__ import annotations

import numpy as np

from driver.models.committee import Committee, CommitteePrediction, MemberOutputs

_STOP, _EVAL, _EVAL_NO_DIPOLE = 0, 1, 2


def split_members(n_energy: int, n_dipole: int, n_ranks: int) -> list[tuple[list[int], list[int]]]:
    """(energy members, dipole members) of each rank: contiguous, nearly equal blocks of all members."""
    items = [("e", i) for i in range(n_energy)] + [("d", j) for j in range(n_dipole)]
    bounds = np.linspace(0, len(items), n_ranks + 1).round().astype(int)
    shares = []
    for r in range(n_ranks):
        block = items[bounds[r]:bounds[r + 1]]
        shares.append(([i for kind, i in block if kind == "e"], [j for kind, j in block if kind == "d"]))
    return shares


class MPICommittee:
    """``comm`` defaults to MPI.COMM_WORLD (a world of one rank when started without mpirun)."""

    def __init__(self, committee: Committee, numbers, comm=None):
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.committee = committee
        self.numbers = np.asarray(numbers, dtype=int)
        self.n_atoms = len(self.numbers)
        self.shares = split_members(committee.n_energy_members, committee.n_dipole_members, self.size)
        energy, dipole = self.shares[self.rank]
        self.part = committee.subset(energy_members=energy, dipole_members=dipole) if (energy or dipole) else None
        # flat float64 record per rank: energies (k), forces (k*N*3), dipoles (j*3)
        self.counts = np.array([len(e) * (1 + 3 * self.n_atoms) + 3 * len(d) for e, d in self.shares])
        self.displs = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self._command = np.zeros(1, dtype=np.int64)
        self._positions = np.zeros((self.n_atoms, 3), dtype=np.float64)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return "; ".join(f"rank {r}: energy members {e or '-'} dipole members {d or '-'}"
                         for r, (e, d) in enumerate(self.shares))

    # ------------------------------------------------------------------ all ranks
    def _evaluate_share(self, dipoles: bool = True) -> np.ndarray:
        if self.part is None:
            return np.zeros(0)
        out = self.part.member_outputs(self.numbers, self._positions, dipoles=dipoles)
        forces = out.forces if out.forces is not None else np.zeros((0, self.n_atoms, 3))
        mu = out.dipoles if dipoles else np.zeros((self.part.n_dipole_members, 3))
        return np.concatenate([out.energies.ravel(), forces.ravel(), mu.ravel()]).astype(np.float64)

    def _gather(self, record: np.ndarray) -> np.ndarray | None:
        if self.size == 1:
            return record
        received = np.empty(int(self.counts.sum()), dtype=np.float64) if self.is_leader else None
        recv_spec = [received, self.counts, self.displs, self.MPI.DOUBLE] if self.is_leader else None
        self.comm.Gatherv([record, self.MPI.DOUBLE], recv_spec, root=0)
        return received

    # ------------------------------------------------------------------ rank 0
    def predict(self, positions: np.ndarray, dipoles: bool = True) -> CommitteePrediction:
        """Committee prediction at ``positions`` (N, 3) Å, with the members of all ranks (rank 0 only);
        ``dipoles=False`` skips the dipole members (the prediction has no dipole), as ``Committee.predict``."""
        if not self.is_leader:
            raise RuntimeError("predict() runs on rank 0; other ranks call serve()")
        positions = np.asarray(positions, dtype=np.float64)
        if positions.shape != (self.n_atoms, 3):
            raise ValueError(f"expected positions of shape ({self.n_atoms}, 3), got {positions.shape}")
        if self.size > 1:
            self._command[0] = _EVAL if dipoles else _EVAL_NO_DIPOLE
            self.comm.Bcast([self._command, self.MPI.INT64_T], root=0)
            self._positions[:] = positions
            self.comm.Bcast([self._positions, self.MPI.DOUBLE], root=0)
        else:
            self._positions[:] = positions
        flat = self._gather(self._evaluate_share(dipoles))
        parts = []
        for r, (energy, dipole) in enumerate(self.shares):
            k, j = len(energy), len(dipole)
            rec = flat[self.displs[r]:self.displs[r] + self.counts[r]]
            e = rec[:k]
            f = rec[k:k + 3 * k * self.n_atoms].reshape(k, self.n_atoms, 3)
            d = rec[k + 3 * k * self.n_atoms:].reshape(j, 3) if dipoles else np.zeros((0, 3))
            parts.append(MemberOutputs(energies=e, forces=f if k else None, dipoles=d))
        return self.committee.summarize(MemberOutputs.concatenate(parts), self.n_atoms)

    def stop(self) -> None:
        """Release the other ranks from :meth:`serve` (rank 0; safe to call more than once)."""
        if self.is_leader and self.size > 1 and self._command[0] != -1:
            self._command[0] = _STOP
            self.comm.Bcast([self._command, self.MPI.INT64_T], root=0)
            self._command[0] = -1

    # ------------------------------------------------------------------ ranks > 0
    def serve(self) -> int:
        """Evaluate this rank's members whenever rank 0 asks, until it says stop; returns the count."""
        served = 0
        while True:
            self.comm.Bcast([self._command, self.MPI.INT64_T], root=0)
            if self._command[0] not in (_EVAL, _EVAL_NO_DIPOLE):
                return served
            self.comm.Bcast([self._positions, self.MPI.DOUBLE], root=0)
            self._gather(self._evaluate_share(self._command[0] == _EVAL))
            served += 1
