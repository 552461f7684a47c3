"""The client side of the i-PI socket protocol (UNIX or TCP), in atomic units.

i-PI 3.3 ships its Python client loop only inside the ``i-pi-py_driver`` script, not as an importable
module, and that loop spins forever on a socket the server has closed; so this module keeps the small
protocol itself (12-byte headers STATUS/INIT/POSDATA/GETFORCE/EXIT, native-endian int32/float64
payloads). It is tested against the real ``i-pi`` server.

:meth:`IPIClient.serve` answers requests with a ``compute(cell, positions)`` callable that takes and
returns atomic units (cell and positions in Bohr; energy in Hartree, forces in Hartree/Bohr, virial in
Hartree, plus the extras string), exactly like an i-PI PES's ``compute_structure``.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Callable

import numpy as np

from ipi_inputs.files import SOCKETS_PREFIX

HDRLEN = 12

Compute = Callable[[np.ndarray, np.ndarray], "tuple[float, np.ndarray, np.ndarray, str]"]


def _header(text: str) -> bytes:
    return text.upper().ljust(HDRLEN).encode()


STATUS, READY, HAVEDATA, NEEDINIT = _header("status"), _header("ready"), _header("havedata"), _header("needinit")
INIT, POSDATA, GETFORCE, FORCEREADY, EXIT = (_header("init"), _header("posdata"), _header("getforce"),
                                             _header("forceready"), _header("exit"))


class IPIDisconnected(ConnectionError):
    """i-PI closed the socket without sending EXIT (it crashed, was killed or timed the driver out)."""


class IPIProtocolError(RuntimeError):
    """i-PI sent something this client does not speak (e.g. batched requests)."""


def connect(mode: str, address: str, port: int = 0, sockets_prefix: str = SOCKETS_PREFIX,
            wait: float = 60.0) -> socket.socket:
    """Connect to i-PI, retrying for ``wait`` seconds while the server is not listening yet (a driver and
    i-PI are usually started together). ``mode`` is "unix" (``address`` = socket name, the path is
    ``sockets_prefix + address`` as in i-PI) or "inet" (``address`` = host, ``port``)."""
    if mode == "unix":
        target, where = sockets_prefix + address, f"UNIX socket {sockets_prefix + address}"
    elif mode == "inet":
        target, where = (address, int(port)), f"{address}:{port}"
    else:
        raise ValueError(f"socket mode must be 'unix' or 'inet', got {mode!r}")
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX if mode == "unix" else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(target)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                raise ConnectionError(f"no i-PI server at {where} after {wait:g} s ({exc.strerror})") from None
            time.sleep(0.2)
            continue
        except OSError as exc:
            sock.close()
            raise ConnectionError(f"cannot connect to i-PI at {where}: {exc.strerror or exc}") from None
        if mode == "inet":
            # the protocol is many small messages: Nagle's algorithm would add ~40 ms per step
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class IPIClient:
    """One driver connection to i-PI. ``requests`` counts the force evaluations served so far; the
    first (index 0) is i-PI's initial configuration, then one per MD step."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._pending = b""  # bytes read ahead of the message being parsed
        self.requests = 0
        self.init_string = ""
        self.replica_id = -1

    # ------------------------------------------------------------------ raw I/O
    def _recv_exact(self, nbytes: int) -> bytes:
        if self._pending:
            head, self._pending = self._pending[:nbytes], self._pending[nbytes:]
            if len(head) == nbytes:
                return head
            return head + self._recv_exact(nbytes - len(head))
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            try:
                n = self.sock.recv_into(view[got:], nbytes - got)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise IPIDisconnected(f"i-PI closed the connection ({exc.strerror})") from None
            if n == 0:
                raise IPIDisconnected("i-PI closed the connection without sending EXIT")
            got += n
        return bytes(buf)

    def _recv_array(self, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self._recv_exact(dtype.itemsize * count), dtype=dtype).copy()

    def _read_ahead(self) -> None:
        """Move whatever i-PI has already sent (usually the GETFORCE that follows POSDATA in the same
        write) out of the kernel buffer before a long computation. A process killed with unread bytes
        makes the kernel reset the connection, and i-PI 3.3's polling thread dies on that reset instead
        of treating it as a disconnect (so it would hang); an empty buffer gives a clean end of stream."""
        while True:
            try:
                chunk = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # a real error shows up at the next blocking read
            if not chunk:
                return
            self._pending += chunk

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise IPIDisconnected(f"i-PI closed the connection ({exc.strerror})") from None

    # ------------------------------------------------------------------ protocol
    def serve(self, compute: Compute) -> int:
        """Answer i-PI until it sends EXIT; returns the number of force evaluations.

        Raises :class:`IPIDisconnected` when the socket drops, :class:`IPIProtocolError` on a message
        this client cannot handle; exceptions from ``compute`` propagate (the socket is then closed by
        the caller, which makes i-PI stop when ``exit_on_disconnect`` is set)."""
        initialised, result = False, None
        while True:
            header = self._recv_exact(HDRLEN)
            if header == STATUS:
                self._send(NEEDINIT if not initialised else HAVEDATA if result is not None else READY)
            elif header == INIT:
                self.replica_id = int(self._recv_array(np.int32, 1)[0])
                length = int(self._recv_array(np.int32, 1)[0])
                self.init_string = self._recv_exact(length).decode("utf-8", errors="replace")
                for token in self.init_string.replace(" ", ",").split(","):
                    key, sep, value = token.partition(":")
                    if sep and key.strip() == "batch_size" and value.strip() not in ("", "1"):
                        raise IPIProtocolError("i-PI asks for batched requests (batch_size in <ffsocket>); "
                                               "this driver answers one structure at a time: remove batch_size")
                initialised = True
            elif header == POSDATA:
                cell = self._recv_array(np.float64, 9).reshape(3, 3)
                self._recv_array(np.float64, 9)  # inverse cell: not needed
                natoms = int(self._recv_array(np.int32, 1)[0])
                positions = self._recv_array(np.float64, 3 * natoms).reshape(natoms, 3)
                self._read_ahead()
                energy, forces, virial, extras = compute(cell, positions)
                forces = np.ascontiguousarray(forces, dtype=np.float64).reshape(-1)
                virial = np.ascontiguousarray(virial, dtype=np.float64).reshape(9)
                if forces.size != 3 * natoms:
                    raise ValueError(f"compute returned {forces.size // 3} forces for {natoms} atoms")
                payload = extras.encode("utf-8") if isinstance(extras, str) else bytes(extras or b"")
                result = b"".join([FORCEREADY, np.float64(energy).tobytes(), np.int32(natoms).tobytes(),
                                   forces.tobytes(), virial.tobytes(), np.int32(len(payload)).tobytes(), payload])
                self.requests += 1
            elif header == GETFORCE:
                if result is None:
                    raise IPIProtocolError("i-PI asked for forces before sending positions")
                self._send(result)
                result = None
            elif header == EXIT:
                return self.requests
            else:
                raise IPIProtocolError(f"unexpected message {header!r} from i-PI")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def unix_socket_path(name: str, sockets_prefix: str = SOCKETS_PREFIX) -> str:
    """Where i-PI puts the UNIX socket NAME (``<simulation sockets_prefix=...>``, default /tmp/ipi_)."""
    return os.fspath(sockets_prefix + name)
