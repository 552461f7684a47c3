"""Which MD frames the committee is unsure about, and where they go.

Decision (:func:`classify`): the measure is the calibrated max force std (eV/Å) when a force threshold is
set, otherwise the calibrated per-atom energy std (eV/atom). A frame is *uncertain* when
``threshold < measure < upper_cap``; at or above the cap the structure has *exploded* (atoms flying
apart or collapsing): it is reported as such and never sent for labelling. Without any threshold
nothing is flagged (the standard deviations are still reported in i-PI's extras).

Destinations (:class:`Flagger`): uncertain frames are pushed as JSON over a ZMQ PUSH socket (never
pickle) to an active-learning manager that binds a PULL socket (:class:`FlagCollector`); without an
endpoint they are appended to a local extxyz file. Endpoints must be ``ipc://``, ``inproc://`` or
loopback ``tcp://`` unless remote endpoints are explicitly allowed.

Message schema ``nanosil.flag/1`` (Å, eV, e·Å): ``kind`` ("uncertain"), ``run_id``, ``step`` (index of
the force request since the driver connected, 0 = i-PI's initial configuration), ``species``
(symbols), ``numbers``, ``positions`` (N x 3, Å), ``energy`` (eV, committee mean),
``energy_std_per_atom`` (eV/atom), ``max_force_std`` (eV/Å), ``dipole_std`` (e·Å or null),
``criterion``, ``threshold``, ``upper_cap``, ``model_version``, ``time`` (Unix seconds).
"""
from __future__ import annotations

import ipaddress
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

SCHEMA = "nanosil.flag/1"


@dataclass(frozen=True)
class FlagConfig:
    """Thresholds and destination of flagged frames (one object, built from the command line)."""

    energy_threshold: float | None = None   # eV/atom, calibrated committee std
    force_threshold: float | None = None    # eV/Å, calibrated max per-atom force std; takes precedence
    upper_cap: float | None = None          # same unit as the measure in use; None: no cap
    endpoint: str | None = None             # ZMQ endpoint the PUSH socket connects to
    flag_file: str = "flagged.extxyz"       # used when there is no endpoint
    run_id: str = ""
    allow_remote: bool = False              # permit non-loopback tcp:// endpoints

    def __post_init__(self):
        for name in ("energy_threshold", "force_threshold", "upper_cap"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value}")
        threshold = self.threshold
        if self.upper_cap is not None and threshold is not None and self.upper_cap <= threshold:
            raise ValueError(f"upper-cap {self.upper_cap} must be above the {self.criterion} threshold {threshold}")
        if self.endpoint:
            check_endpoint(self.endpoint, self.allow_remote)
        if not self.run_id:
            object.__setattr__(self, "run_id", default_run_id())

    @property
    def criterion(self) -> str | None:
        """"force" (max force std, eV/Å), "energy" (energy std per atom, eV/atom) or None (no flagging)."""
        if self.force_threshold is not None:
            return "force"
        if self.energy_threshold is not None:
            return "energy"
        return None

    @property
    def threshold(self) -> float | None:
        return self.force_threshold if self.force_threshold is not None else self.energy_threshold

    @property
    def unit(self) -> str:
        return "eV/Å" if self.criterion == "force" else "eV/atom"

    def describe(self) -> str:
        cap = f", exploded at >= {self.upper_cap:g} {self.unit}" if self.upper_cap is not None else ""
        where = f"ZMQ {self.endpoint}" if self.endpoint else f"file {self.flag_file}"
        if self.criterion is None:
            return "flagging off (no threshold given)"
        measure = "max force std" if self.criterion == "force" else "energy std per atom"
        also = " (energy threshold ignored: the force criterion is set)" if (
            self.criterion == "force" and self.energy_threshold is not None) else ""
        return f"flagging {measure} > {self.threshold:g} {self.unit}{cap} -> {where}{also}"


def default_run_id() -> str:
    return f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class FlagDecision:
    uncertain: bool
    exploded: bool
    measure: float | None   # the value compared with the threshold (eV/atom or eV/Å)


def classify(energy_std_per_atom: float, max_force_std: float, config: FlagConfig) -> FlagDecision:
    """Uncertain if threshold < measure < cap; exploded if measure >= cap (or is not finite)."""
    criterion = config.criterion
    if criterion is None:
        return FlagDecision(False, False, None)
    measure = float(max_force_std if criterion == "force" else energy_std_per_atom)
    if not math.isfinite(measure):
        return FlagDecision(False, True, measure)
    exploded = config.upper_cap is not None and measure >= config.upper_cap
    return FlagDecision(not exploded and measure > config.threshold, exploded, measure)


# ---------------------------------------------------------------------- endpoints
def check_endpoint(endpoint: str, allow_remote: bool = False) -> str:
    """Accept ``ipc://PATH``, ``inproc://NAME`` and loopback ``tcp://HOST:PORT``; refuse anything that
    would reach (or listen on) the network unless ``allow_remote``."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not rest:
        raise ValueError(f"ZMQ endpoint {endpoint!r}: expected ipc://PATH or tcp://127.0.0.1:PORT")
    if scheme in ("ipc", "inproc"):
        return endpoint
    if scheme != "tcp":
        if allow_remote:
            return endpoint
        raise ValueError(f"ZMQ endpoint {endpoint!r}: transport {scheme} is not local; use ipc:// or "
                         f"tcp://127.0.0.1:PORT (or allow remote endpoints explicitly)")
    host, _, port = rest.rpartition(":")
    if not host or not port:
        raise ValueError(f"ZMQ endpoint {endpoint!r}: expected tcp://HOST:PORT")
    host = host.strip("[]")
    if host == "localhost":
        return endpoint
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a host name or an interface ("*", "eth0"): not provably local
    if not loopback and not allow_remote:
        raise ValueError(f"ZMQ endpoint {endpoint!r} is not on the loopback interface; flagged structures "
                         f"would leave this machine: use ipc:// or tcp://127.0.0.1:PORT, or allow remote "
                         f"endpoints explicitly")
    return endpoint


# ---------------------------------------------------------------------- sinks
class ZmqFlagSink:
    """PUSH socket connected to the manager's PULL socket. Messages wait in ZMQ's queue until the
    collector is there; a full queue never blocks MD: the frame then goes to the fallback file."""

    def __init__(self, endpoint: str, allow_remote: bool = False, linger_ms: int = 5000):
        import zmq

        check_endpoint(endpoint, allow_remote)
        self._zmq = zmq
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, linger_ms)  # deliver queued frames at exit, but never hang forever
        self.socket.setsockopt(zmq.SNDHWM, 10000)
        self.socket.connect(endpoint)
        self.endpoint = endpoint

    def send(self, message: dict) -> bool:
        try:
            self.socket.send(json.dumps(message).encode("utf-8"), flags=self._zmq.NOBLOCK)
            return True
        except self._zmq.Again:
            return False

    def close(self) -> None:
        self.socket.close()


class ExtxyzFlagSink:
    """Appends each flagged frame to an extxyz file (Å; the message's scalars in ``atoms.info``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def send(self, message: dict) -> bool:
        from io import StringIO

        from ase import Atoms
        from ase.io import write

        atoms = Atoms(numbers=message["numbers"], positions=message["positions"])
        for key, value in message.items():
            if key not in ("numbers", "positions", "species") and value is not None:
                atoms.info[key] = value
        buffer = StringIO()
        write(buffer, atoms, format="extxyz")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one write per frame, flushed to disk: a crash loses at most the frame being written
        with open(self.path, "a") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        return True

    def close(self) -> None:
        pass


class Flagger:
    """Classifies each evaluated frame and ships the uncertain ones; reports exploded ones on stderr."""

    def __init__(self, config: FlagConfig, numbers, model_version: str, log=sys.stderr):
        self.config = config
        self.numbers = [int(z) for z in numbers]
        self.species = [chemical_symbols[z] for z in self.numbers]
        self.model_version = model_version
        self.log = log
        self.sent = self.fallback = self.exploded = 0
        self.zmq = ZmqFlagSink(config.endpoint, config.allow_remote) if config.endpoint else None
        self.file = ExtxyzFlagSink(config.flag_file)

    def process(self, step: int, positions: np.ndarray, energy: float, energy_std_per_atom: float,
                max_force_std: float, dipole_std: float | None) -> FlagDecision:
        decision = classify(energy_std_per_atom, max_force_std, self.config)
        if decision.exploded:
            self.exploded += 1
            if self.exploded == 1 or self.exploded % 100 == 0:
                print(f"nanosil-driver: step {step}: structure exploded ({self.config.criterion} std "
                      f"{decision.measure:.4g} {self.config.unit} >= cap {self.config.upper_cap:g}); not sent "
                      f"for labelling ({self.exploded} exploded frames so far)", file=self.log, flush=True)
        if decision.uncertain:
            message = self.message(step, positions, energy, energy_std_per_atom, max_force_std, dipole_std)
            if self.zmq is not None and self.zmq.send(message):
                self.sent += 1
            else:
                if self.zmq is not None and self.fallback == 0:
                    print(f"nanosil-driver: ZMQ queue to {self.config.endpoint} is full; appending flagged "
                          f"frames to {self.config.flag_file}", file=self.log, flush=True)
                self.file.send(message)
                self.fallback += 1
        return decision

    def message(self, step, positions, energy, energy_std_per_atom, max_force_std, dipole_std) -> dict:
        return {
            "schema": SCHEMA, "kind": "uncertain", "run_id": self.config.run_id, "step": int(step),
            "species": self.species, "numbers": self.numbers,
            "positions": np.asarray(positions, dtype=float).tolist(),
            "energy": float(energy), "energy_std_per_atom": float(energy_std_per_atom),
            "max_force_std": float(max_force_std),
            "dipole_std": None if dipole_std is None else float(dipole_std),
            "criterion": self.config.criterion, "threshold": self.config.threshold,
            "upper_cap": self.config.upper_cap, "model_version": self.model_version, "time": time.time(),
        }

    def summary(self) -> str:
        where = f"{self.sent} sent to {self.config.endpoint}" if self.zmq is not None else ""
        parts = [p for p in (where, f"{self.fallback} written to {self.config.flag_file}" if self.fallback else "",
                             f"{self.exploded} exploded" if self.exploded else "") if p]
        return "flagged frames: " + (", ".join(parts) if parts else "none")

    def close(self) -> None:
        if self.zmq is not None:
            self.zmq.close()


class FlagCollector:
    """The receiving end (active-learning manager, tests): binds a PULL socket and decodes JSON."""

    def __init__(self, endpoint: str, allow_remote: bool = False):
        import zmq

        check_endpoint(endpoint, allow_remote)
        self._zmq = zmq
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        # the endpoint actually bound (tcp://127.0.0.1:* picks a free port): what drivers connect to
        self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.rejected = 0

    def receive(self, timeout_ms: int = 0) -> list[dict]:
        """Every message that arrives within ``timeout_ms`` of the last one (0: only what is queued)."""
        messages = []
        while self.socket.poll(timeout_ms):
            payload = self.socket.recv()
            try:
                message = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.rejected += 1  # not JSON (a pickle, garbage): dropped, never deserialised otherwise
                continue
            if not isinstance(message, dict) or message.get("schema") != SCHEMA:
                self.rejected += 1
                continue
            messages.append(message)
        return messages

    def close(self) -> None:
        self.socket.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
