"""``nanosil-driver``: answer i-PI's force requests with the committee, over MPI ranks.

    mpirun -n K nanosil-driver --models MODELS_DIR --structure CLUSTER.xyz (--unix NAME | --inet HOST:PORT)
        [--flag-endpoint tcp://127.0.0.1:5555] [--energy-threshold X | --force-threshold Y] [--trust-cap Z]
        [--run-id ID] [--threads 1] [--device cpu|cuda|auto] [--dipole-every K] [--step-offset S]

Also works without mpirun (one rank). Rank 0 speaks the i-PI protocol (:mod:`driver.ipi.client`),
broadcasts positions and reduces the members' outputs (:mod:`driver.ipi.mpi_committee`); the reply and the
flagging are those of the i-PI PES class (:mod:`driver.ipi.pes`, :mod:`driver.flagging`). i-PI never sends
species: they come from ``--structure``, and every request's atom count is checked against it.

Exit status: 0 after i-PI's EXIT; 1 when the socket drops or i-PI cannot be reached; 2 for bad input
(missing model folder, unknown element, atom-count mismatch, bad option, ``--device cuda`` without CUDA),
always with a one-line message.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from driver.device import add_device_argument
from ipi_inputs.files import SOCKETS_PREFIX

PROG = "nanosil-driver"


class UsageError(Exception):
    """Bad input: one line on stderr, exit status 2."""


def _env_rank() -> int:
    """This process's MPI rank from the launcher's environment, before MPI is initialised."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def build_parser(rank: int = 0) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve i-PI with a committee of nanosil models (energy, forces, dipole, disagreement); "
                    "run under mpirun to spread the members over ranks.")
    if rank:  # one usage message per job, not one per rank
        parser.error = lambda message: sys.exit(2)  # type: ignore[method-assign]
    parser.add_argument("--models", required=True, help="committee folder (committee.json + weights)")
    parser.add_argument("--structure", required=True,
                        help="the cluster i-PI simulates (species and atom count; any ASE format, or an i-PI xyz)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME", help="i-PI UNIX socket name (i-PI listens on /tmp/ipi_NAME)")
    where.add_argument("--inet", metavar="HOST:PORT", help="i-PI TCP socket")
    parser.add_argument("--sockets-prefix", default=SOCKETS_PREFIX,
                        help=f"prefix of UNIX socket paths, as i-PI's <simulation sockets_prefix> (default {SOCKETS_PREFIX})")
    parser.add_argument("--connect-timeout", type=float, default=60.0,
                        help="seconds to wait for i-PI to start listening (default 60)")
    flags = parser.add_argument_group("flagging uncertain frames (driver.flagging)")
    flags.add_argument("--energy-threshold", type=float, metavar="EV_PER_ATOM",
                       help="flag frames whose calibrated energy std per atom exceeds this (eV/atom)")
    flags.add_argument("--force-threshold", type=float, metavar="EV_PER_A",
                       help="flag on the calibrated max force std instead (eV/Å); takes precedence")
    flags.add_argument("--trust-cap", type=float,
                       help="at or above this value of the flagging measure the structure counts as exploded: "
                            "reported, never sent for labelling")
    flags.add_argument("--flag-endpoint", metavar="ZMQ_ENDPOINT",
                       help="ZMQ endpoint of the collector's PULL socket (ipc://... or tcp://127.0.0.1:PORT); "
                            "without it, flagged frames are appended to --flag-file")
    flags.add_argument("--flag-file", default="flagged.extxyz", help="extxyz file for flagged frames without "
                       "an endpoint (default flagged.extxyz)")
    flags.add_argument("--allow-remote-flags", action="store_true",
                       help="allow a non-loopback tcp:// flag endpoint without --zmq-keys (structures leave "
                            "this machine unencrypted)")
    flags.add_argument("--zmq-keys", metavar="DIR",
                       help="CurveZMQ keys folder (WORKDIR/zmq_keys from `python -m driver.flagging make-keys "
                            "WORKDIR`): flagged frames are encrypted and authenticated, and the endpoint may be "
                            "on another host")
    flags.add_argument("--run-id", default="", help="identifies this run in flagged messages (default: generated)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (default 1: ranks x threads should not exceed the cores)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="model precision (default float32)")
    add_device_argument(parser, "the members (of every rank)")
    parser.add_argument("--dipole-every", type=int, default=1, metavar="K",
                        help="compute the dipole model only on MD steps that are multiples of K (default 1: every "
                             "step); other steps carry the last dipole in the extras. Give i-PI's dipole "
                             "trajectories stride K (or a multiple of it): only those steps are then written")
    parser.add_argument("--step-offset", type=int, default=0, metavar="S",
                        help="MD step of i-PI's first request, for a run restarted from a checkpoint at step S "
                             "(default 0); it places the dipole steps of --dipole-every")
    parser.add_argument("--log-every", type=int, default=1000,
                        help="print a progress line every this many steps (0: never)")
    return parser


def _setup(args):
    """Everything that can fail on bad input, done identically on every rank before MPI starts
    (cheap checks first: torch takes seconds to import)."""
    from driver.flagging import FlagConfig
    from ipi_inputs.files import SocketAddress, read_cluster

    if args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.dipole_every < 1:
        raise UsageError(f"--dipole-every must be at least 1, got {args.dipole_every}")
    if args.step_offset < 0:
        raise UsageError(f"--step-offset must be >= 0, got {args.step_offset}")
    if not os.path.isdir(args.models):
        raise UsageError(f"model folder {args.models} does not exist")
    atoms = read_cluster(args.structure)
    config = FlagConfig(energy_threshold=args.energy_threshold, force_threshold=args.force_threshold,
                        trust_cap=args.trust_cap, endpoint=args.flag_endpoint, flag_file=args.flag_file,
                        run_id=args.run_id, allow_remote=args.allow_remote_flags, zmq_keys=args.zmq_keys)
    if args.unix is not None:
        address = SocketAddress.unix(args.unix)
    else:
        address = SocketAddress.parse("inet:" + args.inet)

    import torch

    from driver.device import resolve_device
    from driver.models.committee import load_committee

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)  # DeviceError (a ValueError): one line, exit 2
    committee = load_committee(args.models, dtype=getattr(torch, args.dtype), device=device)
    committee.check_numbers(atoms.numbers, source=args.structure)
    return committee, atoms, config, address


def main(argv: list[str] | None = None) -> int:
    rank = _env_rank()
    args = build_parser(rank).parse_args(argv)

    def say(message: str) -> None:
        if rank == 0:
            print(f"{PROG}: {message}", file=sys.stderr, flush=True)

    try:
        committee, atoms, config, address = _setup(args)
    except (UsageError, ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2

    from driver.ipi.mpi_committee import MPICommittee

    mpi = MPICommittee(committee, atoms.numbers)
    if not mpi.is_leader:
        mpi.serve()
        return 0
    return _lead(args, mpi, committee, atoms, config, address, say)


def _lead(args, mpi, committee, atoms, config, address, say) -> int:
    from driver.flagging import Flagger
    from driver.ipi.client import IPIClient, IPIDisconnected, IPIProtocolError, connect
    from driver.ipi.pes import AtomCountMismatch, NanosilDriver

    flagger = client = None
    try:
        try:
            flagger = Flagger(config, atoms.numbers, committee.version)
        except Exception as exc:  # zmq.ZMQError for an endpoint ZMQ cannot use
            say(f"error: flag endpoint {config.endpoint}: {exc}")
            return 2
        pes = NanosilDriver.from_predictor(mpi.predict, atoms.numbers, flagger, source=args.structure,
                                           dipole_every=args.dipole_every, step_offset=args.step_offset)
        dipole_note = f"; dipole every {args.dipole_every} steps" if args.dipole_every > 1 else ""
        say(f"model {committee.version}: {committee.n_energy_members} energy + {committee.n_dipole_members} "
            f"dipole members{dipole_note} on {mpi.size} rank(s) x {args.threads} thread(s) ({committee.device}); "
            f"{len(atoms)} atoms "
            f"({atoms.get_chemical_formula()}) from {args.structure}; {config.describe()}; run id {config.run_id}")
        try:
            sock = connect(address.mode, address.address, address.port, args.sockets_prefix, args.connect_timeout)
        except ConnectionError as exc:
            say(f"error: {exc}")
            return 1
        client = IPIClient(sock)
        say(f"connected to i-PI at {address}")
        clock = {"start": time.perf_counter(), "first": None}

        def compute(cell, pos):
            reply = pes.compute_structure(cell, pos)
            n = pes.requests
            if n == 1:  # i-PI's initial evaluation (and torch's warm-up) is not an MD step
                clock["first"] = time.perf_counter()
            if args.log_every and n % args.log_every == 0:
                rate = (time.perf_counter() - clock["start"]) / n * 1e3
                say(f"step {n}: {rate:.2f} ms/step; {flagger.summary()}")
            return reply

        try:
            n = client.serve(compute)
        except IPIDisconnected as exc:
            say(f"error: {exc} after {client.requests} force evaluations")
            return 1
        except IPIProtocolError as exc:
            say(f"error: {exc}")
            return 1
        except AtomCountMismatch as exc:
            say(f"error: {exc}")
            return 2
        timing = ""
        if n > 1 and clock["first"] is not None:
            per_step = (time.perf_counter() - clock["first"]) / (n - 1) * 1e3
            timing = f" ({per_step:.3f} ms per MD step after the first)"
        say(f"i-PI sent EXIT after {n} force evaluations{timing}; {flagger.summary()}")
        return 0
    except (ValueError, FileNotFoundError) as exc:
        say(f"error: {exc}")
        return 2
    finally:
        if client is not None:
            client.close()
        if flagger is not None:
            flagger.close()
        mpi.stop()


if __name__ == "__main__":
    sys.exit(main())
