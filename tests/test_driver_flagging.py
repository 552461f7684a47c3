"""driver.flagging: the uncertain/exploded decision, endpoint policy, and real ZMQ PUSH/PULL sockets."""
from __future__ import annotations

import io
import json
import pickle
import numpy as np
import pytest
import zmq
from ase.io import read

from driver.flagging import (SCHEMA, FlagCollector, FlagConfig, Flagger, check_endpoint, classify)


def test_energy_criterion_with_cap():
    cfg = FlagConfig(energy_threshold=0.01, trust_cap=0.5)
    assert cfg.criterion == "energy" and cfg.unit == "eV/atom"
    assert classify(0.005, 99.0, cfg) == classify(0.005, 0.0, cfg)  # forces ignored under the energy criterion
    assert not classify(0.005, 0.0, cfg).uncertain
    assert classify(0.02, 0.0, cfg).uncertain and not classify(0.02, 0.0, cfg).exploded
    boom = classify(0.5, 0.0, cfg)
    assert boom.exploded and not boom.uncertain          # at/above the cap: exploded, not for labelling
    assert classify(float("nan"), 0.0, cfg).exploded     # a NaN committee is an explosion too


def test_force_criterion_takes_precedence_and_no_threshold_flags_nothing():
    cfg = FlagConfig(energy_threshold=0.01, force_threshold=0.3, trust_cap=3.0)
    assert cfg.criterion == "force" and "energy threshold ignored" in cfg.describe()
    assert not classify(1.0, 0.2, cfg).uncertain        # energy std huge, force std small
    assert classify(0.0, 0.4, cfg).uncertain
    assert classify(0.0, 3.5, cfg).exploded
    none = FlagConfig()
    assert none.criterion is None and not classify(10.0, 10.0, none).uncertain
    assert "flagging off" in none.describe()


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="trust-cap"):
        FlagConfig(energy_threshold=0.1, trust_cap=0.05)
    with pytest.raises(ValueError, match="energy-threshold"):
        FlagConfig(energy_threshold=-1.0)
    assert FlagConfig().run_id.startswith("run-")  # generated when not given


@pytest.mark.parametrize("endpoint", ["ipc:///tmp/nanosil-flags", "inproc://flags", "tcp://127.0.0.1:5555",
                                      "tcp://localhost:5555", "tcp://[::1]:5555", "tcp://127.0.0.2:6000"])
def test_local_endpoints_accepted(endpoint):
    assert check_endpoint(endpoint) == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                      "tcp://collector.example.org:5555", "pgm://eth0;239.192.1.1:5555"])
def test_remote_endpoints_refused_unless_allowed(endpoint):
    with pytest.raises(ValueError, match="endpoint"):
        check_endpoint(endpoint)
    with pytest.raises(ValueError, match="endpoint"):
        FlagConfig(energy_threshold=0.1, endpoint=endpoint)
    assert check_endpoint(endpoint, allow_remote=True) == endpoint
    with pytest.raises(ValueError):
        check_endpoint("localhost:5555")  # not a ZMQ endpoint at all


def _frame(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [12, 14, 8, 8, 8][:n], rng.normal(size=(n, 3)) * 2


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_uncertain_frames_travel_as_json_over_real_zmq(tmp_path, transport):
    # tcp: bind to a free port the way the active-learning manager does, then connect to what was bound
    endpoint = f"ipc://{tmp_path}/flags" if transport == "ipc" else "tcp://127.0.0.1:*"
    numbers, pos = _frame()
    with FlagCollector(endpoint) as collector:
        endpoint = collector.endpoint
        assert "*" not in endpoint
        cfg = FlagConfig(energy_threshold=0.01, trust_cap=1.0, endpoint=endpoint, run_id="test-run",
                         flag_file=str(tmp_path / "unused.extxyz"))
        flagger = Flagger(cfg, numbers, "iter_007-abc", log=io.StringIO())
        decisions = [flagger.process(step, pos + step, -100.0, std, 0.2, 0.05)
                     for step, std in enumerate([0.001, 0.02, 0.5, 2.0, 0.03])]
        flagger.close()
        got = collector.receive(timeout_ms=1000)
    assert [d.uncertain for d in decisions] == [False, True, True, False, True]
    assert decisions[3].exploded
    assert [(m["kind"], m["step"]) for m in got] == [("uncertain", 1), ("uncertain", 2), ("exploded", 3),
                                                       ("uncertain", 4)]
    boom = got[2]   # the manager acts on this kind; it carries no structure, which is not for labelling
    assert boom["measure"] == 2.0 and boom["trust_cap"] == 1.0 and boom["count"] == 1 and "positions" not in boom
    m = got[0]
    assert m["schema"] == SCHEMA and m["kind"] == "uncertain" and m["run_id"] == "test-run"
    assert m["species"] == ["Mg", "Si", "O", "O", "O"] and m["numbers"] == numbers
    assert np.allclose(m["positions"], pos + 1)          # Å, as given
    assert m["energy_std_per_atom"] == 0.02 and m["max_force_std"] == 0.2 and m["dipole_std"] == 0.05
    assert m["model_version"] == "iter_007-abc" and m["criterion"] == "energy" and m["threshold"] == 0.01
    assert flagger.sent == 3 and flagger.exploded == 1
    assert not (tmp_path / "unused.extxyz").exists()


def test_collector_never_unpickles(tmp_path):
    """Anything but nanosil.flag/1 JSON is dropped with a log line; nothing crashes the collector."""
    endpoint = f"ipc://{tmp_path}/c"
    log = io.StringIO()
    with FlagCollector(endpoint, log=log) as collector:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(endpoint)

        class Boom:
            def __reduce__(self):
                return (exec, ("raise SystemExit('unpickled!')",))

        push.send(pickle.dumps(Boom()))
        push.send(json.dumps({"schema": "something-else"}).encode())
        push.send(b"\xff\xfe not utf-8")
        push.send(b"[" * 100_000)  # nested past Python's recursion limit
        push.send(json.dumps({"schema": SCHEMA, "kind": "uncertain", "step": 3}).encode())
        push.close()
        got = collector.receive(timeout_ms=1000)
    assert got == [{"schema": SCHEMA, "kind": "uncertain", "step": 3}]
    assert collector.rejected == 4
    assert "flag collector: dropped a message" in log.getvalue() and "not JSON" in log.getvalue()


def test_without_endpoint_frames_are_appended_to_extxyz(tmp_path):
    numbers, pos = _frame()
    log = io.StringIO()
    cfg = FlagConfig(force_threshold=0.1, trust_cap=5.0, flag_file=str(tmp_path / "out" / "flags.extxyz"),
                     run_id="r1")
    flagger = Flagger(cfg, numbers, "v1", log=log)
    for step, fstd in enumerate([0.05, 0.2, 7.0, 0.3]):
        flagger.process(step, pos * (1 + step), -50.0, 0.0, fstd, None)
    frames = read(tmp_path / "out" / "flags.extxyz", ":")
    assert [f.info["step"] for f in frames] == [1, 3]
    assert frames[0].get_chemical_symbols() == ["Mg", "Si", "O", "O", "O"]
    assert np.allclose(frames[1].positions, pos * 4)
    assert frames[0].info["run_id"] == "r1" and frames[0].info["max_force_std"] == pytest.approx(0.2)
    assert "step 2: structure exploded" in log.getvalue()   # reported, not written
    assert "2 written to" in flagger.summary() and "1 exploded" in flagger.summary()
