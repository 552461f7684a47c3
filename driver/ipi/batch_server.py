"""One driver process for many i-PI servers: every waiting structure goes through one batched pass.

    nanosil-batch-driver --models MODELS_DIR --target NAME=CLUSTER.xyz [--target ...]
        [--log-dir DIR] [--trust-cap 1.0 --trust-measure force] [--fragment-distance 4.0] [--threads 1]
        [--dipole-every K] [--device cpu|cuda|auto]
    nanosil-batch-driver --models MODELS_DIR --control -      # targets arrive as JSON lines on stdin

i-PI is the server of its socket protocol, so this process is the *client* of N i-PI servers (one per
trajectory, UNIX sockets by default). Each connection is served by :meth:`driver.ipi.client.IPIClient.serve`
in its own thread; its ``compute`` callback only queues the structure and waits. The batching loop takes
every queued structure (after waiting briefly for the other trajectories, see ``gather``), splits them into
groups of similar size (padding a 5-atom cluster to 35 atoms would cost more than it saves; see
:func:`partition_by_size`) and evaluates each group with one :meth:`Committee.predict_batch` call. Replies
are exactly those of ``nanosil-driver`` (:func:`driver.ipi.pes.ipi_reply`): energy, forces, zero virial and the
extras JSON (dipole and dipole_members in e·Bohr, energy_std_per_atom, max_force_std, dipole_std, uncertain,
exploded).

Dipole every K MD steps (``--dipole-every``, or ``dipole_every`` in a control message): structures on other
steps skip the dipole model (a pass computes it only for the structures that need it), and their extras
carry the trajectory's last computed dipole; i-PI's dipole trajectories must have stride K (or a multiple),
so only computed dipoles are written (the step numbering is explained in :mod:`driver.ipi.pes`).

Committee every K MD steps (``--committee-every K`` > 1; default 1: the committee mean propagates every
step): energy member 0 alone propagates the trajectory on every step, and the whole committee (its
disagreement, the trust cap, flagging, the per-step log) runs only on steps that are multiples of K, about
a third of the model's cost for 3 members. The forces stay those of one smooth surface (member 0 on check steps too); the
extras of the other steps carry the last check's disagreement. Nothing is lost against the trust cap but
up to K - 1 steps of reaction time (``bench/spectrum_fidelity.py`` measures what the spectra lose,
``bench/campaign_throughput.py`` what the production gains).

Trusted region (per trajectory): when the committee disagreement reaches ``--trust-cap`` (max force std in
eV/Å, or energy std per atom in eV/atom with ``--trust-measure energy``), or when the cluster falls apart
(its graph of atoms closer than ``--fragment-distance`` Å is no longer connected), the connection is closed
without a reply: i-PI (``exit_on_disconnect``) then stops and writes a restartable checkpoint. The event is
reported on stdout.

Per trajectory, ``<log>`` (``--log-dir``/NAME.uncertainty.csv, or the ``log`` of a control message) records
the disagreement of every step: ``step,energy_std_per_atom_eV,max_force_std_eV_per_A,dipole_std_eA``
(step = MD step: the request index plus ``step_offset``, 0 = i-PI's first configuration; ``dipole_std`` is
empty on steps without a dipole); a stopped
trajectory also gets ``<log>.stop.json`` with the reason.

Machine-readable events go to stdout, one JSON object per line (``event`` = ``connected``, ``finished``,
``stopped``, ``disconnected``, ``error``, ``progress``, ``idle``); human messages go to stderr.

Control messages (``--control -``), one JSON object per line: ``{"add": {"id": ..., "socket": "unix:NAME",
"structure": PATH, "log": PATH, "step_offset": 0, "dipole_every": K}}`` (``dipole_every`` optional: default
``--dipole-every``) and ``{"shutdown": true}``. End of input also shuts
the server down (the campaign that started it is gone): open connections are closed, so their i-PI
servers write checkpoints and stop.

Threads: torch uses ``--threads`` (default 1) intra-op threads; connection threads only do socket I/O.
``--device cuda`` (or ``auto`` where torch sees a GPU) runs the batched passes on the GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from driver.device import add_device_argument
from driver.geometry_checks import fragments
from ipi_inputs.files import SOCKETS_PREFIX
from spectra.atomic import write_json

PROG = "nanosil-batch-driver"
LOG_COLUMNS = ("step", "energy_std_per_atom_eV", "max_force_std_eV_per_A", "dipole_std_eA")

# Cost model of one predict_batch call, in "atom" units, fitted on P1..O10 with the default model sizes on
# 1 thread: t(B, N) ~ 17 ms + B (0.64 N + 0.015 N^2) ms, i.e. a fixed cost worth ~26 atoms and a pair term
# N^2/42. Only the ratios matter: they decide when padding small clusters to a big one pays off.
CALL_COST_ATOMS = 26.0
PAIR_COST_DIVISOR = 42.0


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2."""


class StopTrajectory(Exception):
    """The trajectory left the trusted region: close its connection without replying."""

    def __init__(self, reason: str, step: int, measure: float | None = None):
        super().__init__(reason)
        self.reason, self.step, self.measure = reason, step, measure


@dataclass(frozen=True)
class TrustRegion:
    """When a trajectory is stopped. ``trust_cap``: committee disagreement (eV/Å for ``measure="force"``, eV/atom
    for ``"energy"``) at or above which the model is not trusted; ``fragment_distance`` (Å): the cluster has
    fallen apart when its graph of atoms closer than this is disconnected (checked every ``check_every``
    steps). None switches a check off."""

    trust_cap: float | None = None
    measure: str = "force"
    fragment_distance: float | None = None
    check_every: int = 10

    def __post_init__(self):
        if self.measure not in ("force", "energy"):
            raise ValueError(f"stop measure must be 'force' or 'energy', got {self.measure!r}")
        for name in ("trust_cap", "fragment_distance"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', ' ')} must be a positive number, got {value}")
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

    @property
    def unit(self) -> str:
        return "eV/Å" if self.measure == "force" else "eV/atom"

    def value(self, prediction) -> float:
        return float(prediction.max_force_std if self.measure == "force" else prediction.energy_std_per_atom)

    def verdict(self, prediction, positions: np.ndarray, step: int) -> StopTrajectory | None:
        measure = self.value(prediction)
        if not math.isfinite(measure) or not np.all(np.isfinite(prediction.forces)):
            return StopTrajectory("non-finite committee prediction (NaN/inf)", step, measure)
        if self.trust_cap is not None and measure >= self.trust_cap:
            name = "max force std" if self.measure == "force" else "energy std per atom"
            return StopTrajectory(f"{name} {measure:.4g} {self.unit} >= trust cap {self.trust_cap:g} {self.unit}", step, measure)
        if self.fragment_distance is not None and step % self.check_every == 0:
            sizes = fragments(positions, self.fragment_distance)
            if len(sizes) > 1:
                return StopTrajectory(f"cluster fell apart into fragments of {'+'.join(map(str, sizes))} atoms "
                                      f"(no atom within {self.fragment_distance:g} Å of the rest)", step, measure)
        return None



def _cheapest_partition(sizes: list[int], call_cost: float, pair_divisor: float) -> tuple[list[list[int]], float]:
    """The groups of :func:`partition_by_size` and their total cost (atom units): dynamic programming over the
    sizes in ascending order, a group costing ``call_cost + len(group) * (n_max + n_max^2 / pair_divisor)``."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        n_max = sizes[order[j - 1]]
        per = n_max + n_max * n_max / pair_divisor
        for i in range(j):
            cost = best[i] + call_cost + (j - i) * per
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1], best[n]


def partition_by_size(sizes: list[int], call_cost: float = CALL_COST_ATOMS,
                      pair_divisor: float = PAIR_COST_DIVISOR) -> list[list[int]]:
    """Split structures (atom counts ``sizes``) into groups evaluated by one padded call each, minimising
    sum over groups of ``call_cost + len(group) * (n_max + n_max^2 / pair_divisor)`` (dynamic programming
    over the sizes in ascending order; optimal among contiguous groups, which is where the optimum lies).
    Returns lists of indices into ``sizes``."""
    return _cheapest_partition(sizes, call_cost, pair_divisor)[0]


def pass_cost(sizes: list[int], call_cost: float = CALL_COST_ATOMS, pair_divisor: float = PAIR_COST_DIVISOR) -> float:
    """The cost model's price (atom units) of one pass over structures of atom counts ``sizes``, grouped as
    :func:`partition_by_size` groups them; 0 for none."""
    return _cheapest_partition(sizes, call_cost, pair_divisor)[1]


@dataclass
class Target:
    """One trajectory to serve: its i-PI socket, its species (from ``structure``) and where to log."""

    id: str
    socket: str                      # "unix:NAME" (i-PI listens on sockets_prefix + NAME) or "HOST:PORT"
    structure: str
    log: str | None = None
    step_offset: int = 0             # MD step of i-PI's first request (a restart from a checkpoint)
    sockets_prefix: str = SOCKETS_PREFIX
    connect_timeout: float = 120.0
    dipole_every: int | None = None  # dipole on MD steps that are multiples of this (None: the server's default)

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown target key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("id", "socket", "structure") if k not in data]
        if missing:
            raise ValueError(f"target needs {', '.join(missing)}")
        for key in ("step_offset", "dipole_every"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (1 if key == "dipole_every" else 0)):
                raise ValueError(f"target {key} must be an integer >= {1 if key == 'dipole_every' else 0}, "
                                 f"got {value!r}")
        return cls(**data)


@dataclass
class _Request:
    connection: "_Connection"
    positions: np.ndarray            # (N, 3) Å
    step: int
    created: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    reply: tuple | None = None
    error: BaseException | None = None


class _Connection:
    def __init__(self, target: Target, numbers: np.ndarray, flagger=None, dipole_every: int = 1,
                 committee_every: int = 1):
        from driver.ipi.pes import DipoleSchedule

        self.target = target
        self.numbers = numbers
        self.flagger = flagger
        self.dipoles = DipoleSchedule(target.dipole_every or dipole_every)
        self.committee_every = committee_every
        self.last_check = None       # the last whole-committee prediction (committee_every > 1)
        self.requests = 0
        self.serving = False         # connected and answering: the batcher waits for it when gathering
        self.client = None
        self.log_file = None
        if target.log:
            path = Path(target.log)
            path.parent.mkdir(parents=True, exist_ok=True)
            new = not path.exists() or path.stat().st_size == 0
            self.log_file = open(path, "a", buffering=1)
            if new:
                self.log_file.write(",".join(LOG_COLUMNS) + "\n")

    @property
    def step(self) -> int:
        return self.target.step_offset + self.requests

    def check_due(self, step: int) -> bool:
        """The whole committee runs at this step (every step with committee_every = 1; else multiples of
        it, and the first request of a connection)."""
        return self.committee_every == 1 or self.last_check is None or step % self.committee_every == 0

    def log(self, step: int, prediction) -> None:
        if self.log_file is None:
            return
        dip = "" if prediction.dipole_std is None else f"{prediction.dipole_std:.6g}"
        self.log_file.write(f"{step},{prediction.energy_std_per_atom:.6g},{prediction.max_force_std:.6g},{dip}\n")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        if self.flagger is not None:
            self.flagger.close()


class BatchServer:
    """Serves many i-PI connections with one committee. ``emit(dict)`` receives the events."""

    def __init__(self, committee, trust: TrustRegion | None = None, flag_config=None, gather_s: float = 0.02,
                 emit=None, say=None, progress_every: float = 2.0, dipole_every: int = 1,
                 committee_every: int = 1):
        for name, value in (("dipole_every", dipole_every), ("committee_every", committee_every)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.committee = committee
        self.dipole_every = int(dipole_every)
        self.committee_every = int(committee_every)
        # member 0 alone (with every dipole member) between the committee's checks
        self.propagator = committee.subset(energy_members=[0]) if self.committee_every > 1 else committee
        self.trust = trust or TrustRegion()
        self.flag_config = flag_config
        self.gather_s = gather_s
        self.emit = emit or (lambda event: None)
        self.say = say or (lambda message: None)
        self.progress_every = progress_every
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._connections: dict[str, _Connection] = {}
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._added = 0
        self.batches = self.structures = self.calls = 0
        self.eval_seconds = 0.0

    # ------------------------------------------------------------------ connections
    def add(self, target: Target) -> None:
        """Start serving ``target`` (connects in a new thread; i-PI may still be starting)."""
        from ipi_inputs.files import SocketAddress, read_cluster

        SocketAddress.parse(target.socket)
        atoms = read_cluster(target.structure)
        self.committee.check_numbers(atoms.numbers, source=target.structure)
        flagger = None
        if self.flag_config is not None and self.flag_config.criterion is not None:
            from dataclasses import replace

            from driver.flagging import Flagger

            flagger = Flagger(replace(self.flag_config, run_id=target.id), atoms.numbers, self.committee.version)
        with self._cond:
            if target.id in self._connections:
                raise ValueError(f"target {target.id!r} is already being served")
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            conn = _Connection(target, np.asarray(atoms.numbers), flagger, self.dipole_every, self.committee_every)
            self._connections[target.id] = conn
            self._added += 1
        thread = threading.Thread(target=self._serve, args=(conn,), name=f"ipi-{target.id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    @property
    def n_connections(self) -> int:
        with self._cond:
            return len(self._connections)

    def _serve(self, conn: _Connection) -> None:
        from driver.ipi.client import IPIClient, IPIDisconnected, IPIProtocolError, connect
        from ipi_inputs.files import SocketAddress

        target = conn.target
        address = SocketAddress.parse(target.socket)
        event = {"id": target.id}
        try:
            try:
                sock = connect(address.mode, address.address, address.port, target.sockets_prefix,
                               target.connect_timeout)
            except ConnectionError as exc:
                self.emit({"event": "error", **event, "message": str(exc)})
                return
            conn.client = IPIClient(sock)
            with self._cond:
                if self._stopping:
                    return
                conn.serving = True
            self.emit({"event": "connected", **event, "step": conn.step})
            try:
                n = conn.client.serve(lambda cell, pos: self._compute(conn, pos))
                self.emit({"event": "finished", **event, "step": conn.step, "requests": n})
            except StopTrajectory as stop:
                record = {"event": "stopped", **event, "step": stop.step, "reason": stop.reason,
                          "measure": stop.measure}
                if target.log:  # a record that outlives this process (read by a resumed campaign)
                    write_json(Path(target.log + ".stop.json"), record)
                self.emit(record)
                self.say(f"{target.id}: stopped at step {stop.step}: {stop.reason}")
            except IPIDisconnected as exc:
                if not self._stopping:
                    self.emit({"event": "disconnected", **event, "step": conn.step, "message": str(exc)})
            except (IPIProtocolError, ValueError, RuntimeError) as exc:
                self.emit({"event": "error", **event, "step": conn.step, "message": str(exc)})
                if not self._stopping:
                    self.say(f"{target.id}: error: {exc}")
        finally:
            with self._cond:
                conn.serving = False
                self._connections.pop(target.id, None)
                self._cond.notify_all()
            conn.close()

    def _compute(self, conn: _Connection, pos_bohr: np.ndarray):
        from driver.ipi.pes import BOHR, check_positions

        positions = np.asarray(pos_bohr, dtype=np.float64).reshape(-1, 3) * BOHR
        if len(positions) != len(conn.numbers):
            raise ValueError(f"i-PI sent {len(positions)} atoms but {conn.target.structure} has "
                             f"{len(conn.numbers)}: driver and i-PI input describe different structures")
        check_positions(positions, conn.step, f"{conn.target.id} ({conn.target.structure})")  # NaN: not to the model
        request = _Request(conn, positions, conn.step)
        with self._cond:
            if self._stopping:
                raise RuntimeError("driver shutting down")
            self._pending.append(request)
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        conn.requests += 1
        return request.reply

    # ------------------------------------------------------------------ batching loop
    def run(self, until_idle: bool = False, idle_timeout: float | None = None) -> None:
        """Evaluate batches until :meth:`stop`; with ``until_idle``, also return once no connection is left
        (after at least one was added). ``idle_timeout``: return after this many seconds without any."""
        last_progress = idle_since = time.monotonic()
        while True:
            with self._cond:
                if self._stopping:
                    self._fail_pending(RuntimeError("driver shutting down"))
                    return
                batch = []
                if not self._pending:
                    if self._connections:
                        idle_since = time.monotonic()
                    elif (until_idle and self._added) or (
                            idle_timeout is not None and time.monotonic() - idle_since > idle_timeout):
                        return
                    self._cond.wait(timeout=0.5)
                else:
                    # Wait for the other trajectories (each i-PI is busy with its step) so they share this
                    # pass, but not longer than `gather`: a straggler costs less than an idle model.
                    deadline = self._pending[0].created + self.gather_s
                    while len(self._pending) < sum(c.serving for c in self._connections.values()):
                        left = deadline - time.monotonic()
                        if left <= 0 or self._stopping:
                            break
                        self._cond.wait(timeout=left)
                    batch, self._pending = self._pending, []
            if batch:
                self._evaluate(batch)
            if time.monotonic() - last_progress >= self.progress_every:
                last_progress = time.monotonic()
                self._progress()

    def _progress(self) -> None:
        with self._cond:
            steps = {cid: c.step for cid, c in self._connections.items()}
        self.emit({"event": "progress", "time": time.time(), "steps": steps, "batches": self.batches,
                   "structures": self.structures, "calls": self.calls, "eval_s": round(self.eval_seconds, 3)})

    def _fail_pending(self, error: BaseException) -> None:
        for request in self._pending:
            request.error = error
            request.done.set()
        self._pending = []

    def _evaluate(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        checked = [r.connection.check_due(r.step) for r in batch]
        for model, chosen in ((self.committee, [i for i, c in enumerate(checked) if c]),
                              (self.propagator, [i for i, c in enumerate(checked) if not c])):
            for group in partition_by_size([len(batch[i].positions) for i in chosen]):
                self._evaluate_group(model, [batch[chosen[i]] for i in group], checked=model is self.committee)
        self.batches += 1
        self.structures += len(batch)
        self.eval_seconds += time.perf_counter() - start

    def _evaluate_group(self, model, requests: list[_Request], checked: bool) -> None:
        """One padded pass of ``model`` (the committee, or member 0 between checks) and the replies."""
        from dataclasses import replace

        from driver.flagging import FlagDecision
        from driver.ipi.pes import ipi_reply

        due = [r.connection.dipoles.due(r.step) for r in requests]
        try:
            predictions = model.predict_batch([r.connection.numbers for r in requests],
                                              [r.positions for r in requests], dipoles=due)
        except Exception as exc:  # a model failure ends these trajectories, not the server
            for r in requests:
                r.error = RuntimeError(f"model evaluation failed: {exc}")
                r.done.set()
            return
        self.calls += 1
        for r, p, computed in zip(requests, predictions, due):
            conn = r.connection
            try:
                if conn.committee_every > 1:
                    if checked:  # the committee's disagreement; the propagation stays on member 0
                        conn.last_check = p
                        p = replace(p, energy=float(p.member_energies[0]), forces=p.member_forces[0])
                    else:
                        last = conn.last_check
                        p = replace(p, energy_std_per_atom=last.energy_std_per_atom, max_force_std=last.max_force_std)
                if checked:
                    conn.log(r.step, p)
                stop = self.trust.verdict(p, r.positions, r.step)
                if stop is not None:
                    r.error = stop
                    continue
                decision = FlagDecision(False, False, None)
                if conn.flagger is not None and checked:
                    decision = conn.flagger.process(r.step, r.positions, p.energy, p.energy_std_per_atom,
                                                    p.max_force_std, p.dipole_std)
                r.reply = ipi_reply(p, decision, conn.dipoles.sample(p, r.step, computed))
            except Exception as exc:
                r.error = RuntimeError(f"cannot answer step {r.step}: {exc}")
            finally:
                r.done.set()

    def stop(self) -> None:
        """Close every connection (their i-PI servers stop and write checkpoints) and end :meth:`run`."""
        with self._cond:
            self._stopping = True
            connections = list(self._connections.values())
            self._fail_pending(RuntimeError("driver shutting down"))
            self._cond.notify_all()
        for conn in connections:
            if conn.client is not None:
                conn.client.close()

    def join(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve many i-PI servers (one per trajectory) from one process, evaluating the waiting "
                    "structures in batched committee passes.")
    parser.add_argument("--models", required=True, help="committee folder (committee.json + weights)")
    parser.add_argument("--target", action="append", default=[], metavar="NAME=STRUCTURE",
                        help="i-PI UNIX socket NAME (/tmp/ipi_NAME) and the cluster file it simulates; repeat")
    parser.add_argument("--control", metavar="-", help="read targets as JSON lines from stdin ('-')")
    parser.add_argument("--log-dir", help="write NAME.uncertainty.csv here for every --target")
    parser.add_argument("--sockets-prefix", default=SOCKETS_PREFIX, help=f"prefix of UNIX socket paths (default {SOCKETS_PREFIX})")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds to wait for each i-PI to listen (default 120)")
    trust = parser.add_argument_group("trusted region (stop a trajectory that leaves it)")
    trust.add_argument("--trust-cap", type=float, metavar="X",
                       help="stop when the committee disagreement reaches X (see --trust-measure); frames at or "
                            "above it are never flagged")
    trust.add_argument("--trust-measure", choices=("force", "energy"), default="force",
                       help="max force std in eV/Å (default) or energy std per atom in eV/atom")
    trust.add_argument("--fragment-distance", type=float, metavar="ANGSTROM",
                       help="stop when the cluster splits into parts farther apart than this")
    flags = parser.add_argument_group("flagging uncertain frames for labelling (as nanosil-driver)")
    flags.add_argument("--energy-threshold", type=float, metavar="EV_PER_ATOM")
    flags.add_argument("--force-threshold", type=float, metavar="EV_PER_A")
    flags.add_argument("--flag-endpoint", metavar="ZMQ_ENDPOINT")
    flags.add_argument("--flag-file", default="flagged.extxyz")
    parser.add_argument("--dipole-every", type=int, default=1, metavar="K",
                        help="compute the dipole model only on MD steps that are multiples of K (default 1); "
                             "other steps carry the last dipole. i-PI's dipole trajectories need stride K")
    parser.add_argument("--committee-every", type=int, default=1, metavar="K",
                        help="propagate on energy member 0 and run the whole committee (disagreement, trust "
                             "cap, flagging, log) only on MD steps that are multiples of K (default 1: the "
                             "committee mean every step)")
    parser.add_argument("--gather-ms", type=float, default=20.0,
                        help="wait at most this long for the other trajectories before a pass (default 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    add_device_argument(parser)
    parser.add_argument("--progress-every", type=float, default=2.0, help="seconds between progress events")
    return parser


def _parse_targets(args) -> list[Target]:
    targets = []
    for spec in args.target:
        name, sep, structure = spec.partition("=")
        if not sep or not name or not structure:
            raise UsageError(f"--target {spec!r}: expected NAME=STRUCTURE")
        log = str(Path(args.log_dir) / f"{name}.uncertainty.csv") if args.log_dir else None
        targets.append(Target(id=name, socket=f"unix:{name}", structure=structure, log=log,
                              sockets_prefix=args.sockets_prefix, connect_timeout=args.connect_timeout))
    return targets


def _emitter():
    lock = threading.Lock()

    def emit(event: dict) -> None:
        line = json.dumps(event)
        with lock:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass  # nobody listens any more; the control loop notices the closed stdin
    return emit


def _control_loop(server: BatchServer, args, say) -> None:
    """Read JSON control lines from stdin; shut the server down at end of input."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
            if message.get("shutdown"):
                break
            data = dict(message["add"])
            data.setdefault("sockets_prefix", args.sockets_prefix)
            data.setdefault("connect_timeout", args.connect_timeout)
            server.add(Target.from_dict(data))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            server.emit({"event": "error", "id": (message.get("add") or {}).get("id") if isinstance(
                message, dict) and isinstance(message.get("add"), dict) else None, "message": f"bad control "
                         f"message: {exc}"})
            say(f"error: bad control message {line[:200]!r}: {exc}")
    server.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def say(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    try:
        import torch

        from driver.device import resolve_device
        from driver.flagging import FlagConfig
        from driver.models.committee import load_committee

        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        if not os.path.isdir(args.models):
            raise UsageError(f"model folder {args.models} does not exist")
        targets = _parse_targets(args)
        if not targets and args.control != "-":
            raise UsageError("give at least one --target NAME=STRUCTURE, or --control -")
        if args.control not in (None, "-"):
            raise UsageError(f"--control takes '-' (stdin), got {args.control!r}")
        if not args.gather_ms >= 0:
            raise UsageError(f"--gather-ms must be >= 0, got {args.gather_ms}")
        for flag, value in (("--dipole-every", args.dipole_every), ("--committee-every", args.committee_every)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        trust = TrustRegion(trust_cap=args.trust_cap, measure=args.trust_measure, fragment_distance=args.fragment_distance)
        flag_config = FlagConfig(energy_threshold=args.energy_threshold, force_threshold=args.force_threshold,
                                 endpoint=args.flag_endpoint, flag_file=args.flag_file,
                                 run_id="batch")
        device = resolve_device(args.device)  # DeviceError (a ValueError): one line, exit 2
        committee = load_committee(args.models, dtype=getattr(torch, args.dtype), device=device)
        server = BatchServer(committee, trust, flag_config, gather_s=args.gather_ms / 1000.0, emit=_emitter(),
                             say=say, progress_every=args.progress_every, dipole_every=args.dipole_every,
                             committee_every=args.committee_every)
        for target in targets:
            server.add(target)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    say(f"model {committee.version}: {committee.n_energy_members} energy + {committee.n_dipole_members} dipole "
        f"members (dipole every {args.dipole_every} step(s), "
        f"{'committee mean every step' if args.committee_every == 1 else f'member 0 with the committee every {args.committee_every} steps'}), {args.threads} torch thread(s) on {committee.device}; "
        f"{len(targets)} target(s)"
        f"{', more from stdin' if args.control == '-' else ''}")
    if args.control == "-":
        threading.Thread(target=_control_loop, args=(server, args, say), daemon=True).start()
    try:
        server.run(until_idle=args.control != "-")
    except KeyboardInterrupt:
        server.stop()
    finally:
        server.stop()
        server.join()
    if server.batches:
        say(f"served {server.structures} structures in {server.batches} passes ({server.calls} model calls; "
            f"mean {server.structures / server.batches:.2f} per pass), model time {server.eval_seconds:.1f} s")
    server.emit({"event": "idle", "structures": server.structures, "batches": server.batches})
    return 0


if __name__ == "__main__":
    sys.exit(main())
