"""Where the work of a run goes: this machine (``mode = "local"``, the default) or a Parsl pool on a cluster.

The ``[execution]`` section, shared by the active-learning and the campaign configurations, is
:class:`ExecutionSettings`, read by :func:`build_execution` with the shared loader
(:mod:`al_manager.settings`)::

    [execution]
    mode = "parsl"                   # "local" (default: today's processes, Parsl is never imported) | "parsl"
    provider = "slurm"               # local | slurm | pbs: who starts the worker pools
    nodes = 2                        # nodes per job (Parsl block)
    max_blocks = 1                   # such jobs at once
    walltime = "02:00:00"            # HH:MM:SS of each job
    account = "proj123"              # charged account (slurm --account, pbs -A)
    partition = "cpu"                # slurm partition / pbs queue
    worker_init = "module load tblite; source /home/me/nanosil/.venv/bin/activate"
    max_workers_per_node = 32        # label tasks at once on a node (default: cores // cores_per_task)
    cores_per_node = 128             # cores requested per node (default: the whole node, exclusive)
    scheduler_options = ""           # extra lines for the job script ("#SBATCH --qos=normal")
    launcher = "auto"                # auto | single | srun | mpiexec: how a job starts one pool per node
    retries = 2                      # a task whose worker or node died is run again this many times
    address = "none"                 # address the workers reach the manager on (default: tried all)
    heartbeat_period = 30            # s between heartbeats of manager and worker pools
    heartbeat_threshold = 120        # s without a heartbeat before a pool (node) is declared lost
    max_idletime = 120               # s an idle job is kept before it is given back

    [execution.labelling]
    cores_per_task = 4               # OpenMP threads (xtb), PySCF threads, ORCA %pal nprocs of one label
    orca_command = "none"            # ORCA binary on the compute nodes (ORCA_COMMAND)

    [execution.sampling]
    pairs_per_node = 8               # i-PI + nanosil-driver pairs run at once on one node

    [execution.training]
    partition = "gpu"                # default: [execution] partition
    gpus_per_node = 4                # 0: CPU training
    members_per_node = 4             # committee members trained at once on one node (one task each)
    nodes = 1                        # nodes per training job
    walltime = "none"                # default: [execution] walltime

Run time (Parsl is imported only here, and only for ``mode = "parsl"``)::

    with session(settings, workdir / "parsl") as s:     # None for mode = "local"
        label_structures(frames, "xtb", db, executor="parsl", **labelling_arguments(settings, "xtb"))
        fut = s.executor("training").submit(train_member, ...)   # plain functions, JSON-able/numpy arguments

The active-learning loop sends its labels to the ``labelling`` pool, each sampling run (an i-PI +
``nanosil-driver`` pair on one node over a UNIX socket, :func:`al_manager.learning.sampling.run_pair`) to the
``sampling`` pool and its committee members (:func:`driver.training.train_committee` with ``executor=``) to
the ``training`` pool. Sampling drivers on other hosts send their flagged frames to the manager's collector
over CurveZMQ with the work directory's keys (``WORKDIR/zmq_keys``, made on first use, readable by the
user alone); with the local provider the collector stays on loopback.

Inside an open :func:`session`, ``label_structures(..., executor="parsl")`` sends its tasks to the session's
``labelling`` pool; outside one, it starts a private local HighThroughputExecutor with ``workers`` workers for
that call. Labels come back as results: the calling process (the manager) stays the only writer of the
database. A worker process that dies mid-task is restarted by its pool and the task is run again
(``retries``); a node that stops answering is declared lost after ``heartbeat_threshold`` and its tasks are
run again too. Traffic between manager, interchange and worker pools is encrypted (CurveZMQ, Parsl's
``encrypted=True``).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from al_manager.settings import Where, build, type_name

__all__ = ["PARSL_MISSING", "STAGES", "LabellingResources", "SamplingResources", "TrainingResources",
           "ExecutionSettings", "build_execution", "parsl_available", "require_parsl", "parsl_config",
           "ParslExecutor", "ParslSession", "session", "active_session", "parsl_executor",
           "labelling_arguments", "labelling_slots", "sampling_arguments"]

PARSL_MISSING = 'mode = "parsl" needs Parsl: pip install nanosil[hpc]'
STAGES = ("labelling", "sampling", "training")
_WALLTIME = re.compile(r"^\d+:[0-5]\d:[0-5]\d$")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: worker slots per node assumed when neither max_workers_per_node nor cores_per_node says it
_UNKNOWN_NODE_SLOTS = 64


def _positive(name: str, value, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _walltime(name: str, value: str | None) -> None:
    if value is not None and not _WALLTIME.match(value):
        raise ValueError(f'{name} must be HH:MM:SS (e.g. "02:00:00"), got {value!r}')


# ---------------------------------------------------------------------- the [execution] section
@dataclass(frozen=True)
class LabellingResources:
    """``[execution.labelling]``: one reference calculation per task."""
    cores_per_task: int = 1            # OpenMP threads (xtb) / PySCF threads / ORCA %pal nprocs
    orca_command: str | None = None    # ORCA binary on the compute nodes; exported as ORCA_COMMAND

    def __post_init__(self):
        _positive("cores_per_task", self.cores_per_task)
        if self.orca_command is not None and not self.orca_command.strip():
            raise ValueError('orca_command must be a path, got an empty string (use "none" for none)')


@dataclass(frozen=True)
class SamplingResources:
    """``[execution.sampling]``: one i-PI + nanosil-driver pair per task, on one node."""
    pairs_per_node: int = 1

    def __post_init__(self):
        _positive("pairs_per_node", self.pairs_per_node)


@dataclass(frozen=True)
class TrainingResources:
    """``[execution.training]``: one task per committee member, optionally on a GPU partition."""
    partition: str | None = None       # default: the [execution] partition
    gpus_per_node: int = 0             # 0: train on CPUs; else one member per GPU (CUDA_VISIBLE_DEVICES)
    members_per_node: int | None = None   # default: gpus_per_node, or 1 on CPUs
    nodes: int = 1                     # nodes per training job
    walltime: str | None = None        # default: the [execution] walltime

    def __post_init__(self):
        _positive("gpus_per_node", self.gpus_per_node, 0)
        _positive("members_per_node", self.members_per_node)
        _positive("nodes", self.nodes)
        _walltime("walltime", self.walltime)
        if self.gpus_per_node and self.members_per_node and self.members_per_node > self.gpus_per_node:
            raise ValueError(f"members_per_node ({self.members_per_node}) must not exceed gpus_per_node "
                             f"({self.gpus_per_node}): one GPU per member")

    @property
    def workers_per_node(self) -> int:
        return self.members_per_node or self.gpus_per_node or 1


@dataclass(frozen=True)
class ExecutionSettings:
    """``[execution]``: see the module docstring for the layout and :func:`parsl_config` for its use."""
    mode: Literal["local", "parsl"] = "local"
    provider: Literal["local", "slurm", "pbs"] = "local"
    nodes: int = 1
    max_blocks: int = 1
    walltime: str = "01:00:00"
    account: str | None = None
    partition: str | None = None
    worker_init: str = ""
    max_workers_per_node: int | None = None
    cores_per_node: int | None = None
    scheduler_options: str = ""
    launcher: Literal["auto", "single", "srun", "mpiexec"] = "auto"
    retries: int = 2
    address: str | None = None
    heartbeat_period: int = 30
    heartbeat_threshold: int = 120
    max_idletime: float = 120.0
    labelling: LabellingResources = field(default_factory=LabellingResources)
    sampling: SamplingResources = field(default_factory=SamplingResources)
    training: TrainingResources = field(default_factory=TrainingResources)

    def __post_init__(self):
        for name, cls in (("labelling", LabellingResources), ("sampling", SamplingResources),
                          ("training", TrainingResources)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type_name(getattr(self, name))}")
        if self.mode == "local":
            for f in dataclasses.fields(self):
                if f.name == "mode":
                    continue
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                if getattr(self, f.name) != default:
                    raise ValueError(f'{f.name} is set, but mode = "local" does not use it: set mode = "parsl" '
                                     f'(or remove {f.name})')
            return
        _positive("nodes", self.nodes)
        _positive("max_blocks", self.max_blocks)
        _walltime("walltime", self.walltime)
        _positive("max_workers_per_node", self.max_workers_per_node)
        _positive("cores_per_node", self.cores_per_node)
        _positive("retries", self.retries, 0)
        _positive("heartbeat_period", self.heartbeat_period)
        if self.heartbeat_threshold <= self.heartbeat_period:
            raise ValueError(f"heartbeat_threshold ({self.heartbeat_threshold}) must exceed heartbeat_period "
                             f"({self.heartbeat_period})")
        if not self.max_idletime > 0:
            raise ValueError(f"max_idletime must be > 0 s, got {self.max_idletime}")
        if self.provider == "local":
            for name in ("account", "partition"):
                if getattr(self, name) is not None:
                    raise ValueError(f'{name} has no meaning with provider = "local" (no scheduler)')
            if self.training.partition is not None:
                raise ValueError('training has a partition, which has no meaning with provider = "local"')
            if self.nodes != 1:
                raise ValueError(f'nodes must be 1 with provider = "local" (this machine), got {self.nodes}')
            if self.launcher in ("srun", "mpiexec"):
                raise ValueError(f'launcher = "{self.launcher}" needs a scheduler; provider = "local" uses "single"')
        if self.provider == "pbs" and self.launcher == "srun":
            raise ValueError('launcher = "srun" is SLURM\'s; with provider = "pbs" use "mpiexec" or "auto"')
        if self.cores_per_node and self.labelling.cores_per_task > self.cores_per_node:
            raise ValueError(f"labelling has cores_per_task {self.labelling.cores_per_task} > cores_per_node "
                             f"{self.cores_per_node}")
        if not parsl_available():
            raise ValueError(PARSL_MISSING)

    @property
    def uses_parsl(self) -> bool:
        return self.mode == "parsl"


def build_execution(table: dict, where: Where, section: str = "execution") -> ExecutionSettings:
    """:class:`ExecutionSettings` from the ``[execution]`` TOML table (with its ``labelling``, ``sampling``
    and ``training`` sub-tables); every problem is one :class:`~al_manager.settings.ConfigError` line
    naming the file and the key. Use: ``build_execution(table_of(data, "execution", where), where)``."""
    table = dict(table)
    subs = {}
    for name, cls in (("labelling", LabellingResources), ("sampling", SamplingResources),
                      ("training", TrainingResources)):
        if name in table:
            sub = table.pop(name)
            if not isinstance(sub, dict):
                where.fail(f"{section}.{name}", f"must be a table ([{section}.{name}]), got {type_name(sub)}")
            subs[name] = build(cls, sub, f"{section}.{name}", where)
    if table.get("mode", "local") == "local":
        for name, sub in subs.items():
            if sub != type(sub)():
                where.fail(f"{section}.{name}", 'is set, but mode = "local" does not use it: set mode = "parsl" '
                                                f'(or remove [{section}.{name}])')
    elif table.get("mode") == "parsl" and not parsl_available():
        where.fail("", f"[{section}] {PARSL_MISSING}")
    return build(ExecutionSettings, table, section, where, **subs)


def parsl_available() -> bool:
    return importlib.util.find_spec("parsl") is not None


def require_parsl() -> None:
    """ImportError with the one-line install hint when Parsl is missing."""
    if not parsl_available():
        raise ImportError(PARSL_MISSING)


# ---------------------------------------------------------------------- the Parsl configuration
def labelling_slots(settings: ExecutionSettings) -> int:
    """Label tasks that can run at once (all nodes of all blocks): the ``workers`` of label_structures."""
    if settings.max_workers_per_node:
        per_node = settings.max_workers_per_node
    elif settings.cores_per_node:
        per_node = max(1, settings.cores_per_node // settings.labelling.cores_per_task)
    elif settings.provider == "local":
        per_node = max(1, _cores() // settings.labelling.cores_per_task)
    else:
        per_node = _UNKNOWN_NODE_SLOTS
    return settings.nodes * settings.max_blocks * per_node


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _bin_script(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() else None


def _worker_init(settings: ExecutionSettings, threads: int, extra: dict | None = None) -> str:
    """The shell lines run before each worker pool: the user's ``worker_init``, the threads of one task and,
    on this machine, this Python's bin folder first on PATH."""
    lines = []
    if settings.provider == "local":
        lines.append(f'export PATH="{Path(sys.executable).parent}:$PATH"')
    if settings.worker_init.strip():
        lines.append(settings.worker_init.strip())
    lines.append(" ".join(f"export {v}={int(threads)};" for v in _THREAD_VARS).rstrip(";"))
    for key, value in (extra or {}).items():
        lines.append(f"export {key}={_shell_quote(value)}")
    return "\n".join(lines)


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(str(value))


def _launcher(settings: ExecutionSettings, nodes: int):
    from parsl.launchers import MpiExecLauncher, SingleNodeLauncher, SrunLauncher

    kind = settings.launcher
    if kind == "auto":
        kind = "single" if nodes == 1 or settings.provider == "local" else (
            "srun" if settings.provider == "slurm" else "mpiexec")
    if kind == "srun":
        return SrunLauncher()
    if kind == "mpiexec":
        # one process_worker_pool per node of the (deduplicated) $PBS_NODEFILE
        return MpiExecLauncher()
    return SingleNodeLauncher()


def _provider(settings: ExecutionSettings, *, nodes: int, walltime: str, partition: str | None,
              worker_init: str, init_blocks: int, gpus_per_node: int = 0):
    blocks = dict(init_blocks=min(init_blocks, settings.max_blocks), min_blocks=0, max_blocks=settings.max_blocks)
    launcher = _launcher(settings, nodes)
    if settings.provider == "local":
        from parsl.providers import LocalProvider

        return LocalProvider(nodes_per_block=1, launcher=launcher, worker_init=worker_init, **blocks)
    if settings.provider == "slurm":
        from parsl.providers import SlurmProvider

        return SlurmProvider(partition=partition, account=settings.account, nodes_per_block=nodes,
                             cores_per_node=settings.cores_per_node, gpus_per_node=gpus_per_node or None,
                             walltime=walltime, scheduler_options=settings.scheduler_options,
                             worker_init=worker_init, exclusive=settings.cores_per_node is None,
                             launcher=launcher, **blocks)
    from parsl.providers import PBSProProvider

    select = f"ngpus={gpus_per_node}" if gpus_per_node else ""
    return PBSProProvider(account=settings.account, queue=partition, nodes_per_block=nodes,
                          cpus_per_node=settings.cores_per_node or 1, select_options=select,
                          walltime=walltime, scheduler_options=settings.scheduler_options,
                          worker_init=worker_init, launcher=launcher, **blocks)


def _htex(settings: ExecutionSettings, label: str, provider, *, workers_per_node: int | None,
          cores_per_worker: float, accelerators: int = 0):
    from parsl.executors import HighThroughputExecutor

    kwargs = {}
    pool = _bin_script("process_worker_pool.py")
    if settings.provider == "local" and pool:
        # this very Python, whatever PATH says (on a cluster, worker_init puts the environment on PATH)
        from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD

        kwargs["launch_cmd"] = DEFAULT_LAUNCH_CMD.replace("process_worker_pool.py", f"{sys.executable} {pool}", 1)
    interchange = _bin_script("interchange.py")
    if interchange:
        kwargs["interchange_launch_cmd"] = [sys.executable, interchange]
    if settings.address:
        kwargs["address"] = settings.address
    elif settings.provider == "local":
        kwargs["address"] = "127.0.0.1"
    if accelerators:
        kwargs["available_accelerators"] = accelerators
    return HighThroughputExecutor(label=label, provider=provider, max_workers_per_node=workers_per_node,
                                  cores_per_worker=cores_per_worker, heartbeat_period=settings.heartbeat_period,
                                  heartbeat_threshold=settings.heartbeat_threshold, encrypted=True,
                                  poll_period=10, **kwargs)


def parsl_config(settings: ExecutionSettings, run_dir: str | Path = "runinfo", *,
                 stages: tuple[str, ...] = STAGES, workers: int | None = None):
    """A :class:`parsl.config.Config` with one HighThroughputExecutor per stage, labelled ``labelling``,
    ``sampling``, ``training`` (``stages`` chooses which), each with its provider (LocalProvider,
    SlurmProvider, PBSProProvider), ``worker_init`` and launcher; ``retries`` from the settings. The
    labelling pool starts a block at once; the others when their first task arrives. ``workers``: label
    workers per node, overriding ``max_workers_per_node`` (a private local pool)."""
    require_parsl()
    from parsl.config import Config

    if settings.mode != "parsl":
        raise ValueError('parsl_config needs mode = "parsl"')
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"stages must be among {', '.join(STAGES)}, got {list(stages)}")
    lab = settings.labelling
    executors = []
    if "labelling" in stages:
        extra = {"ORCA_COMMAND": lab.orca_command} if lab.orca_command else {}
        provider = _provider(settings, nodes=settings.nodes, walltime=settings.walltime,
                             partition=settings.partition, worker_init=_worker_init(settings, lab.cores_per_task, extra),
                             init_blocks=1)
        executors.append(_htex(settings, "labelling", provider,
                               workers_per_node=workers or settings.max_workers_per_node,
                               cores_per_worker=lab.cores_per_task))
    if "sampling" in stages:
        pairs = settings.sampling.pairs_per_node
        cores = settings.cores_per_node or (_cores() if settings.provider == "local" else None)
        provider = _provider(settings, nodes=settings.nodes, walltime=settings.walltime,
                             partition=settings.partition, worker_init=_worker_init(settings, 1), init_blocks=0)
        executors.append(_htex(settings, "sampling", provider, workers_per_node=pairs,
                               cores_per_worker=max(1, cores // pairs) if cores else 1))
    if "training" in stages:
        tr = settings.training
        provider = _provider(settings, nodes=tr.nodes, walltime=tr.walltime or settings.walltime,
                             partition=tr.partition or settings.partition, worker_init=_worker_init(settings, 1),
                             init_blocks=0, gpus_per_node=tr.gpus_per_node)
        executors.append(_htex(settings, "training", provider, workers_per_node=tr.workers_per_node,
                               cores_per_worker=1, accelerators=tr.gpus_per_node))
    # strategy_period: the first block goes out 1 s after the start (scheduler queries keep their own
    # providers' polling intervals)
    return Config(executors=executors, retries=settings.retries, run_dir=str(run_dir), strategy="simple",
                  strategy_period=1, max_idletime=settings.max_idletime, usage_tracking=0)


# ---------------------------------------------------------------------- the executor adapter
class ParslExecutor(cf.Executor):
    """A :class:`concurrent.futures.Executor` that runs plain functions on one executor (stage) of a Parsl
    DataFlowKernel; its futures are Parsl AppFutures (concurrent.futures.Future subclasses, so
    ``concurrent.futures.wait`` works). Parsl cannot cancel a running task: ``cancel_futures`` only drops
    results. With ``owned``, :meth:`shutdown` ends the DataFlowKernel (interchange and worker pools); without
    (a :func:`session`'s), it does nothing.

    ``retried``: tasks of this executor that needed more than one try (a worker died, a node was lost)."""

    def __init__(self, dfk, stage: str = "labelling", *, owned: bool = False, cleanup_dir: str | None = None):
        self._dfk = dfk
        self.stage = stage
        self._owned = owned
        self._cleanup_dir = cleanup_dir
        self._apps: dict = {}
        self._lock = threading.Lock()
        self.retried = 0
        self.submitted = 0

    @property
    def dfk(self):
        return self._dfk

    def _app(self, fn):
        app = self._apps.get(fn)
        if app is None:
            from parsl.app.python import PythonApp

            app = self._apps[fn] = PythonApp(fn, data_flow_kernel=self._dfk, executors=[self.stage])
        return app

    def submit(self, fn, /, *args, **kwargs):
        if self._dfk is None:
            raise RuntimeError("ParslExecutor has been shut down")
        fut = self._app(fn)(*args, **kwargs)
        self.submitted += 1
        fut.add_done_callback(self._count_retries)
        return fut

    def _count_retries(self, fut) -> None:
        try:
            tries = int(fut.task_record["fail_count"])
        except Exception:  # pragma: no cover - Parsl internals changed
            return
        if tries:
            with self._lock:
                self.retried += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Owned: end the DataFlowKernel (after its tasks, with ``wait`` and not ``cancel_futures``). A
        session's executor is not ended here (label_structures shuts down what it used): the session owns
        it, and the next call uses it again."""
        if not self._owned:
            return
        dfk, self._dfk = self._dfk, None
        if dfk is None:
            return
        try:
            if wait and not cancel_futures:
                dfk.wait_for_current_tasks()
            dfk.cleanup()
        finally:
            if self._cleanup_dir:
                shutil.rmtree(self._cleanup_dir, ignore_errors=True)


class ParslSession:
    """A loaded Parsl DataFlowKernel with one executor per stage (see :func:`session`)."""

    def __init__(self, dfk, settings: ExecutionSettings, stages: tuple[str, ...]):
        self.dfk = dfk
        self.settings = settings
        self.stages = stages
        self._executors: dict[str, ParslExecutor] = {}

    def executor(self, stage: str = "labelling") -> ParslExecutor:
        """The concurrent.futures-style executor of ``stage`` (labelling | sampling | training)."""
        if stage not in self.stages:
            raise ValueError(f"stage {stage!r} is not in this session (stages: {', '.join(self.stages)})")
        if stage not in self._executors:
            self._executors[stage] = ParslExecutor(self.dfk, stage)
        return self._executors[stage]


_ACTIVE: list[ParslSession] = []


def active_session() -> ParslSession | None:
    """The innermost open :func:`session` with Parsl, or None."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def session(settings: ExecutionSettings, run_dir: str | Path = "runinfo", *, stages: tuple[str, ...] = STAGES):
    """Load Parsl for the block (``parsl.load``) and clean it up on the way out (``dfk.cleanup``: the
    interchange ends and the worker pools' jobs are cancelled), also after an error or SystemExit. Yields a
    :class:`ParslSession`, or None with ``mode = "local"`` (Parsl is not imported then)."""
    if settings.mode != "parsl":
        yield None
        return
    require_parsl()
    import parsl

    from al_manager.processes import end_processes, parsl_interchanges

    # the interchanges of an earlier manager of this run folder that was killed (the caller holds its lock)
    end_processes(parsl_interchanges(run_dir), grace=5.0)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    dfk = parsl.load(parsl_config(settings, run_dir, stages=stages))
    s = ParslSession(dfk, settings, tuple(stages))
    _ACTIVE.append(s)
    try:
        yield s
    finally:
        _ACTIVE.remove(s)
        try:
            dfk.cleanup()
        finally:
            parsl.clear()


def parsl_executor(workers: int | None = None, threads: int | None = None) -> ParslExecutor:
    """The executor of ``label_structures(..., executor="parsl")``: the ``labelling`` pool of the open
    :func:`session` when there is one, else a private local HighThroughputExecutor with ``workers`` workers
    of ``threads`` threads, ended at ``shutdown`` (its Parsl run folder is a temporary one)."""
    s = active_session()
    if s is not None:
        return s.executor("labelling")
    require_parsl()
    from parsl.dataflow.dflow import DataFlowKernel

    threads = int(threads or 1)
    settings = ExecutionSettings(mode="parsl", provider="local", labelling=LabellingResources(cores_per_task=threads))
    run_dir = tempfile.mkdtemp(prefix="nanosil-parsl-")
    workers = int(workers or max(1, _cores() // threads))
    config = parsl_config(settings, run_dir, stages=("labelling",), workers=workers)
    try:
        dfk = DataFlowKernel(config)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return ParslExecutor(dfk, "labelling", owned=True, cleanup_dir=run_dir)


def labelling_arguments(settings: ExecutionSettings, backend: str, workers: int = 1,
                        options: dict | None = None) -> dict:
    """The ``executor``, ``workers`` and ``backend_options`` keywords of
    :func:`al_manager.reference.labelling.label_structures` for these settings. Local: today's choice
    (``serial`` for one worker, else a process pool of ``workers``). Parsl: the session's labelling pool,
    as many tasks in flight as it has slots, and ``cores_per_task`` as the backend's threads (xtb, pyscf)
    or ``nprocs`` (orca), ``orca_command`` as its ``command``."""
    options = dict(options or {})
    if settings.mode != "parsl":
        return {"executor": "serial" if workers == 1 else "process", "workers": workers,
                "backend_options": options or None}
    lab = settings.labelling
    if backend in ("xtb", "pyscf"):
        options["threads"] = lab.cores_per_task
    elif backend == "orca":
        options["nprocs"] = lab.cores_per_task
        if lab.orca_command:
            options["command"] = lab.orca_command
    return {"executor": "parsl", "workers": labelling_slots(settings), "backend_options": options or None}


def sampling_arguments(settings: ExecutionSettings, workdir: str | Path) -> dict:
    """The placement keywords of :class:`al_manager.learning.sampling.Sampler` (``executor``, ``slots``,
    ``collector_keys``, ``collector_host``): none locally; with Parsl, the session's ``sampling`` pool with
    ``pairs_per_node`` x nodes x blocks runs at once and, for pools on other hosts (slurm, pbs), a CurveZMQ
    collector reachable at ``address`` (default this host's name) with the keys of ``WORKDIR/zmq_keys``."""
    s = active_session()
    if settings.mode != "parsl" or s is None:
        return {}
    out = {"executor": s.executor("sampling"),
           "slots": settings.sampling.pairs_per_node * settings.nodes * settings.max_blocks}
    if settings.provider != "local":
        import socket

        from driver.flagging import create_zmq_keys

        out["collector_keys"] = create_zmq_keys(workdir)
        out["collector_host"] = settings.address or socket.getfqdn()
    return out
