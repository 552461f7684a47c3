"""driver.flagging over CurveZMQ: key files, the bind policy, and real sockets on tcp://127.0.0.1 only."""
from __future__ import annotations

import io
import os
import stat
import time

import numpy as np
import pytest
import zmq

from driver.flagging import (SCHEMA, FlagCollector, FlagConfig, Flagger, ZmqFlagSink, check_bind_endpoint,
                             create_zmq_keys, load_client_keys, load_server_keys, main)

pytestmark = pytest.mark.timeout(60)

WAIT_MS = 1500  # how long a dropped frame is given to (not) arrive


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _message(step: int) -> dict:
    return {"schema": SCHEMA, "kind": "uncertain", "step": step}


def _wait_for(predicate, seconds: float = 3.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def keys(tmp_path):
    return create_zmq_keys(tmp_path / "work")


def test_keys_are_readable_by_the_user_alone(tmp_path, keys):
    assert keys == tmp_path / "work" / "zmq_keys"
    assert _mode(keys) == 0o700 and _mode(keys / "allowed_clients") == 0o700
    files = sorted(p.relative_to(keys).as_posix() for p in keys.rglob("*") if p.is_file())
    assert files == ["allowed_clients/client.key", "client.key", "client.key_secret", "server.key",
                     "server.key_secret"]
    assert all(_mode(keys / f) == 0o600 for f in files)
    server, client = load_server_keys(keys), load_client_keys(keys)
    assert client.server_public == server.public and len(client.secret) == 40
    assert client.secret.decode() not in repr(client) and server.secret.decode() not in repr(server)
    assert create_zmq_keys(tmp_path / "work") == keys and load_client_keys(keys) == client  # kept, not replaced
    assert load_client_keys(create_zmq_keys(tmp_path / "work", overwrite=True)) != client


def test_loaders_refuse_a_secret_others_can_read_and_say_how_to_make_keys(tmp_path, keys):
    os.chmod(keys / "client.key_secret", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_client_keys(keys)
    with pytest.raises(FileNotFoundError, match="make-keys"):
        load_server_keys(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="make-keys"):
        FlagConfig(energy_threshold=0.1, endpoint="tcp://127.0.0.1:5555", zmq_keys=str(tmp_path / "nowhere"))


def test_make_keys_command(tmp_path, capsys):
    assert main(["make-keys", str(tmp_path)]) == 0
    assert "--zmq-keys" in capsys.readouterr().out
    assert _mode(tmp_path / "zmq_keys" / "server.key_secret") == 0o600


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                      "tcp://collector.example.org:5555"])
def test_non_loopback_bind_without_keys_is_refused_before_binding(monkeypatch, endpoint):
    def no_bind(*args, **kwargs):
        raise AssertionError("bind attempted")

    monkeypatch.setattr(zmq.Socket, "bind", no_bind)
    with pytest.raises(ValueError, match="without CurveZMQ keys") as refused:
        FlagCollector(endpoint)
    message = str(refused.value)
    assert "\n" not in message and "python -m driver.flagging make-keys WORKDIR" in message
    assert "create_zmq_keys" in message
    assert check_bind_endpoint(endpoint, keyed=True) == endpoint  # with keys the address is allowed
    for local in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555", "ipc:///tmp/x",
                  "inproc://x"):
        assert check_bind_endpoint(local) == local  # keyless by default, as before


def test_remote_driver_endpoint_is_allowed_with_keys_only(keys):
    cfg = FlagConfig(energy_threshold=0.1, endpoint="tcp://10.1.2.3:5555", zmq_keys=str(keys))
    assert "(CurveZMQ)" in cfg.describe()
    with pytest.raises(ValueError, match="loopback"):
        FlagConfig(energy_threshold=0.1, endpoint="tcp://10.1.2.3:5555")
    with pytest.raises(ValueError, match="needs a flag endpoint"):
        FlagConfig(energy_threshold=0.1, zmq_keys=str(keys))


def test_frame_from_the_allowed_key_is_accepted(tmp_path, keys):
    """End to end through the driver's own path: FlagConfig(zmq_keys=...) -> Flagger -> CURVE PUSH."""
    log = io.StringIO()
    with FlagCollector("tcp://127.0.0.1:*", keys_dir=keys, log=log) as collector:
        cfg = FlagConfig(energy_threshold=0.01, endpoint=collector.endpoint, zmq_keys=str(keys), run_id="curve",
                         flag_file=str(tmp_path / "unused.extxyz"))
        flagger = Flagger(cfg, [12, 8], "v1", log=io.StringIO())
        flagger.process(3, np.zeros((2, 3)), -1.0, 0.5, 0.1, None)
        flagger.close()
        got = collector.receive(timeout_ms=WAIT_MS)
    assert [(m["run_id"], m["step"]) for m in got] == [("curve", 3)]
    assert collector.refused == 0 and log.getvalue() == ""
    assert not (tmp_path / "unused.extxyz").exists()


def _push(endpoint: str, public=None, secret=None, server=None):
    socket = zmq.Context.instance().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    if public is not None:
        socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
        socket.setsockopt(zmq.CURVE_SERVERKEY, server)
    socket.connect(endpoint)
    return socket


@pytest.mark.parametrize("client", ["unknown key", "no key", "wrong server key"])
def test_frames_from_unknown_or_missing_keys_are_dropped_and_logged(keys, client):
    good = load_client_keys(keys)
    stranger_public, stranger_secret = zmq.curve_keypair()
    log = io.StringIO()
    with FlagCollector("tcp://127.0.0.1:*", keys_dir=keys, log=log) as collector:
        if client == "unknown key":
            push = _push(collector.endpoint, stranger_public, stranger_secret, good.server_public)
        elif client == "no key":
            push = _push(collector.endpoint)
        else:  # an allowed client that talks to an impostor's key
            push = _push(collector.endpoint, good.public, good.secret, stranger_public)
        push.send(b'{"schema": "%s", "kind": "uncertain", "step": 1}' % SCHEMA.encode())
        got = collector.receive(timeout_ms=WAIT_MS)
        push.close()
        assert _wait_for(lambda: collector.refused > 0)
        # the collector still serves the allowed key afterwards
        sink = ZmqFlagSink(collector.endpoint, keys=good, linger_ms=1000)
        assert sink.send(_message(2))
        after = collector.receive(timeout_ms=WAIT_MS)
        sink.close()
    assert got == []
    assert [m["step"] for m in after] == [2]
    text = log.getvalue()
    assert "refused the handshake" in text and text.count("\n") >= 1
    if client == "unknown key":
        assert stranger_public.decode() in text  # the refused key is named
    else:
        assert "without CurveZMQ keys, or with the wrong server key" in text


def test_driver_command_line_takes_the_keys_folder(keys):
    from driver.main import build_parser

    args = build_parser().parse_args(["--models", "m", "--structure", "s.xyz", "--unix", "x",
                                      "--flag-endpoint", "tcp://10.1.2.3:5555", "--zmq-keys", str(keys)])
    assert args.zmq_keys == str(keys)
    assert build_parser().parse_args(["--models", "m", "--structure", "s.xyz", "--unix", "x"]).zmq_keys is None
