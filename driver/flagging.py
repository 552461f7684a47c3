"""Which MD frames the committee is unsure about, and where they go.

Decision (:func:`classify`): the measure is the calibrated max force std (eV/Å) when a force threshold is
set, otherwise the calibrated per-atom energy std (eV/atom). A frame is *uncertain* when
``threshold < measure < trust_cap``; at or above the cap the structure has *exploded* (atoms flying
apart or collapsing): it is reported as such and never sent for labelling. Without any threshold
nothing is flagged (the standard deviations are still reported in i-PI's extras).

Destinations (:class:`Flagger`): uncertain frames are pushed as JSON over a ZMQ PUSH socket (never
pickle) to an active-learning manager that binds a PULL socket (:class:`FlagCollector`); without an
endpoint they are appended to a local extxyz file. Endpoints must be ``ipc://``, ``inproc://`` or
loopback ``tcp://`` unless remote endpoints are explicitly allowed.

Across hosts (:func:`create_zmq_keys`, ``python -m driver.flagging make-keys WORKDIR``): the traffic is
authenticated and encrypted with CurveZMQ. The collector is the CURVE server and accepts only clients whose
public key is in ``zmq_keys/allowed_clients/``; a refused handshake is logged and delivers nothing. Without
keys the collector binds only to loopback, ``ipc://`` or ``inproc://``.

Message schema ``nanosil.flag/1`` (Å, eV, e·Å): ``kind`` ("uncertain"; "exploded" messages carry only
``run_id``, ``step``, ``criterion``, ``measure``, ``trust_cap`` and ``count``, no structure), ``run_id``, ``step`` (index of
the force request since the driver connected, 0 = i-PI's initial configuration), ``species``
(symbols), ``numbers``, ``positions`` (N x 3, Å), ``energy`` (eV, committee mean),
``energy_std_per_atom`` (eV/atom), ``max_force_std`` (eV/Å), ``dipole_std`` (e·Å or null),
``criterion``, ``threshold``, ``trust_cap``, ``model_version``, ``time`` (Unix seconds).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

SCHEMA = "nanosil.flag/1"


@dataclass(frozen=True)
class FlagConfig:
    """Thresholds and destination of flagged frames (one object, built from the command line)."""

    energy_threshold: float | None = None   # eV/atom, calibrated committee std
    force_threshold: float | None = None    # eV/Å, calibrated max per-atom force std; takes precedence
    trust_cap: float | None = None          # same unit as the measure in use; None: no cap
    endpoint: str | None = None             # ZMQ endpoint the PUSH socket connects to
    flag_file: str = "flagged.extxyz"       # used when there is no endpoint
    run_id: str = ""
    allow_remote: bool = False              # permit non-loopback tcp:// endpoints without keys
    zmq_keys: str | None = None             # CurveZMQ keys folder (create_zmq_keys): remote endpoints allowed

    def __post_init__(self):
        for name in ("energy_threshold", "force_threshold", "trust_cap"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name.replace('_', '-')} must be a positive number, got {value}")
        threshold = self.threshold
        if self.trust_cap is not None and threshold is not None and self.trust_cap <= threshold:
            raise ValueError(f"trust-cap {self.trust_cap} must be above the {self.criterion} threshold {threshold}")
        if self.zmq_keys and not self.endpoint:
            raise ValueError("zmq-keys needs a flag endpoint (without one, frames go to the flag file)")
        if self.endpoint:
            # encrypted and authenticated traffic may cross the network
            check_endpoint(self.endpoint, self.allow_remote or bool(self.zmq_keys))
        if self.zmq_keys:
            load_client_keys(self.zmq_keys)  # fail now, naming the file, rather than at the first flagged frame
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
        cap = f", exploded at >= {self.trust_cap:g} {self.unit}" if self.trust_cap is not None else ""
        where = f"ZMQ {self.endpoint}" if self.endpoint else f"file {self.flag_file}"
        if self.endpoint and self.zmq_keys:
            where += " (CurveZMQ)"
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
    exploded = config.trust_cap is not None and measure >= config.trust_cap
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


KEYS_DIRNAME = "zmq_keys"
ALLOWED_DIRNAME = "allowed_clients"   # public keys the collector accepts (one *.key file per client)
MAKE_KEYS = "python -m driver.flagging make-keys WORKDIR"


def check_bind_endpoint(endpoint: str, keyed: bool = False) -> str:
    """Where the collector may listen: anywhere with CurveZMQ keys; otherwise only loopback ``tcp://``,
    ``ipc://`` or ``inproc://`` (a keyless collector on the network would take frames from any host)."""
    check_endpoint(endpoint, allow_remote=True)  # well-formed
    if keyed:
        return endpoint
    try:
        return check_endpoint(endpoint)
    except ValueError:
        raise ValueError(
            f"refusing to bind the flag collector to {endpoint} without CurveZMQ keys: any host could send "
            f"frames and read the traffic; make keys with `{MAKE_KEYS}` (driver.flagging.create_zmq_keys) "
            f"and give the collector WORKDIR/{KEYS_DIRNAME}, or bind to tcp://127.0.0.1:PORT or ipc://PATH"
        ) from None


# ---------------------------------------------------------------------- CurveZMQ keys


@dataclass(frozen=True)
class ServerKeys:
    """The collector's key pair (z85) and the folder of client public keys it accepts."""

    public: bytes
    secret: bytes = field(repr=False)
    allowed_dir: Path


@dataclass(frozen=True)
class ClientKeys:
    """A driver's key pair and the collector's public key (z85)."""

    public: bytes
    secret: bytes = field(repr=False)
    server_public: bytes


def create_zmq_keys(workdir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Make ``WORKDIR/zmq_keys/`` (mode 0700): ``server.key`` + ``server.key_secret``, ``client.key`` +
    ``client.key_secret``, and ``allowed_clients/client.key``; every file 0600. Returns the folder, which
    is what the collector and ``nanosil-driver --zmq-keys`` take. Complete existing keys are kept unless
    ``overwrite``: running drivers hold them."""
    import zmq.auth

    keys = Path(workdir) / KEYS_DIRNAME
    allowed = keys / ALLOWED_DIRNAME
    pairs = [keys / f"{name}.{ext}" for name in ("server", "client") for ext in ("key", "key_secret")]
    if not overwrite and all(p.is_file() for p in pairs) and (allowed / "client.key").is_file():
        return keys
    for folder in (keys, allowed):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask and ignored for an existing folder
    # pyzmq writes the files with the umask's mode; nobody else can enter the folder meanwhile
    for name in ("server", "client"):
        zmq.auth.create_certificates(keys, name)
    shutil.copyfile(keys / "client.key", allowed / "client.key")
    for path in [*pairs, allowed / "client.key"]:
        os.chmod(path, 0o600)
    return keys


def _load_key_file(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        raise FileNotFoundError(f"CurveZMQ key {path} not found; make keys with `{MAKE_KEYS}`")
    mode = path.stat().st_mode & 0o777
    if secret and mode & 0o077:  # as ssh does: a secret others can read is no longer a secret
        raise ValueError(f"CurveZMQ secret key {path} is readable by other users (mode {mode:o}); chmod 600 it")
    public, secret_key = zmq.auth.load_certificate(path)
    if secret and not secret_key:
        raise ValueError(f"{path} holds no CurveZMQ secret key")
    return public, secret_key


def load_server_keys(keys_dir: str | os.PathLike) -> ServerKeys:
    """The collector's side of :func:`create_zmq_keys`'s folder."""
    keys = Path(keys_dir)
    public, secret = _load_key_file(keys / "server.key_secret", secret=True)
    allowed = keys / ALLOWED_DIRNAME
    if not allowed.is_dir() or not any(allowed.glob("*.key")):
        raise FileNotFoundError(f"no client public keys in {allowed}: the collector would refuse every driver; "
                                f"make keys with `{MAKE_KEYS}`")
    return ServerKeys(public, secret, allowed)


def load_client_keys(keys_dir: str | os.PathLike, name: str = "client") -> ClientKeys:
    """A driver's side: ``NAME.key_secret`` and the collector's ``server.key``."""
    keys = Path(keys_dir)
    public, secret = _load_key_file(keys / f"{name}.key_secret", secret=True)
    server_public, _ = _load_key_file(keys / "server.key", secret=False)
    return ClientKeys(public, secret, server_public)


# ---------------------------------------------------------------------- sinks
class ZmqFlagSink:
    """PUSH socket connected to the manager's PULL socket (a CurveZMQ client with ``keys``). Messages wait
    in ZMQ's queue until the collector is there; a full queue never blocks MD: the frame then goes to the
    fallback file."""

    def __init__(self, endpoint: str, allow_remote: bool = False, linger_ms: int = 5000,
                 keys: ClientKeys | None = None):
        import zmq

        check_endpoint(endpoint, allow_remote or keys is not None)
        self._zmq = zmq
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, linger_ms)  # deliver queued frames at exit, but never hang forever
        self.socket.setsockopt(zmq.SNDHWM, 10000)
        if keys is not None:  # CURVE client: must be set before connect
            self.socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
            self.socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
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
        keys = load_client_keys(config.zmq_keys) if config.zmq_keys else None
        self.zmq = ZmqFlagSink(config.endpoint, config.allow_remote, keys=keys) if config.endpoint else None
        self.file = ExtxyzFlagSink(config.flag_file)

    def process(self, step: int, positions: np.ndarray, energy: float, energy_std_per_atom: float,
                max_force_std: float, dipole_std: float | None) -> FlagDecision:
        decision = classify(energy_std_per_atom, max_force_std, self.config)
        if decision.exploded:
            self.exploded += 1
            if self.exploded == 1 or self.exploded % 100 == 0:
                print(f"nanosil-driver: step {step}: structure exploded ({self.config.criterion} std "
                      f"{decision.measure:.4g} {self.config.unit} >= trust cap {self.config.trust_cap:g}); not "
                      f"sent for labelling ({self.exploded} exploded frames so far)", file=self.log, flush=True)
                if self.zmq is not None:  # the manager acts on the message kind, never on log text
                    self.zmq.send({"schema": SCHEMA, "kind": "exploded", "run_id": self.config.run_id,
                                   "step": int(step), "criterion": self.config.criterion,
                                   "measure": float(decision.measure), "trust_cap": self.config.trust_cap,
                                   "count": self.exploded, "model_version": self.model_version,
                                   "time": time.time()})
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
            "trust_cap": self.config.trust_cap, "model_version": self.model_version, "time": time.time(),
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
    """The receiving end (active-learning manager, tests): binds a PULL socket and decodes JSON, never
    anything else. With ``keys_dir`` (:func:`create_zmq_keys`) it is a CurveZMQ server that accepts only
    the public keys in ``allowed_clients/``; refused handshakes and dropped messages are logged on ``log``
    (a file or a function taking a line)."""

    def __init__(self, endpoint: str, keys_dir: str | os.PathLike | None = None, log=sys.stderr):
        import zmq

        check_bind_endpoint(endpoint, keyed=keys_dir is not None)  # before any socket exists
        keys = load_server_keys(keys_dir) if keys_dir is not None else None
        self._zmq = zmq
        self.log = log
        self.rejected = 0   # messages dropped as not JSON / not nanosil.flag/1
        self.refused = 0    # handshakes refused (unknown key, no key, wrong server key)
        self._lock = threading.Lock()
        self._auth = self._watcher = None
        self._stop = threading.Event()
        self._closed = False
        # keyed: a context of its own, so that its ZAP handler guards this socket only and ends with it
        self.context = zmq.Context.instance() if keys is None else zmq.Context()
        self.socket = self.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if keys is not None:
                self._start_curve(keys)
            self.socket.bind(endpoint)
        except Exception:
            self.close()
            raise
        # the endpoint actually bound (tcp://127.0.0.1:* picks a free port): what drivers connect to
        self.endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()

    def _start_curve(self, keys: ServerKeys) -> None:
        import zmq
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        allowed = frozenset(zmq.auth.load_certificates(keys.allowed_dir))
        collector = self

        class AllowedKeys:  # pyzmq's credentials provider: decides, and logs what it refuses
            def callback(self, domain, client_key):
                if client_key in allowed:
                    return True
                collector._refuse(f"unknown CurveZMQ client key {client_key.decode()} "
                                  f"(not in {keys.allowed_dir})")
                return False

        # the ZAP handler must run before the socket accepts anyone: without one libzmq lets every key in
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=AllowedKeys())
        self.socket.setsockopt(zmq.CURVE_SERVER, 1)
        self.socket.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
        self.socket.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
        # clients that fail before ZAP (no CURVE at all, wrong server key) show up only as socket events
        monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                 | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._watcher = threading.Thread(target=self._watch, args=(monitor,), name="flag-collector-monitor",
                                         daemon=True)
        self._watcher.start()

    def _watch(self, monitor) -> None:
        """Monitor thread: the only user of ``monitor``; polls so that close() stops it within 0.1 s."""
        from zmq.utils.monitor import recv_monitor_message

        try:
            while not self._stop.is_set():
                if monitor.poll(100):
                    recv_monitor_message(monitor)
                    self._refuse("a client without CurveZMQ keys, or with the wrong server key")
        finally:
            monitor.close(linger=0)

    def _say(self, line: str) -> None:
        line = f"flag collector: {line}"
        if hasattr(self.log, "write"):
            print(line, file=self.log, flush=True)
        else:
            self.log(line)

    def _refuse(self, why: str) -> None:
        with self._lock:  # called from the ZAP and monitor threads
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:  # a client retries every 0.1 s: no flood
                self._say(f"refused the handshake of {why}; nothing received from it "
                          f"({self.refused} refused so far)")

    def _reject(self, why: str) -> None:
        self.rejected += 1
        if self.rejected == 1 or self.rejected % 100 == 0:
            self._say(f"dropped a message: {why} ({self.rejected} dropped so far)")

    def receive(self, timeout_ms: int = 0) -> list[dict]:
        """Every message that arrives within ``timeout_ms`` of the last one (0: only what is queued)."""
        messages = []
        while self.socket.poll(timeout_ms):
            payload = self.socket.recv()
            try:
                message = json.loads(payload.decode("utf-8"))
            except (ValueError, RecursionError):  # bad UTF-8, not JSON, or nested past Python's stack
                self._reject(f"{len(payload)} bytes that are not JSON (never deserialised otherwise)")
                continue
            if not isinstance(message, dict) or message.get("schema") != SCHEMA:
                self._reject(f"JSON that is not a {SCHEMA} message")
                continue
            messages.append(message)
        return messages

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join()
        self.socket.close()
        if self._auth is not None:
            self._auth.stop()
        if self.context is not self._zmq.Context.instance():
            self.context.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m driver.flagging make-keys WORKDIR``."""
    parser = argparse.ArgumentParser(prog="python -m driver.flagging",
                                     description="CurveZMQ keys for flagged frames that cross the network")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-keys", help=f"create WORKDIR/{KEYS_DIRNAME}/ (user-only permissions)")
    make.add_argument("workdir")
    make.add_argument("--overwrite", action="store_true", help="replace existing keys (connected drivers "
                      "then need the new ones)")
    args = parser.parse_args(argv)
    keys = create_zmq_keys(args.workdir, overwrite=args.overwrite)
    print(f"CurveZMQ keys in {keys}: the collector takes this folder and accepts the public keys in "
          f"{keys / ALLOWED_DIRNAME}/; drivers use `nanosil-driver --zmq-keys {keys}` (they need client.key_secret "
          f"and server.key only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
