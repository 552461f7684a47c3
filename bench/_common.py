"""What several benches share: their child processes (i-PI, nanosil-driver) and their JSON output.

The benches run as ``python bench/NAME.py``, which puts this folder first on ``sys.path``: ``import _common``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def child_env() -> dict:
    """One thread per child process (the benches time one-thread runs) and this venv's tools on PATH."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s: the end of a child that is still running."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def ipi_server(xml: Path, log: Path, socket: str):
    """i-PI on ``xml`` (run in its folder, output to ``log``); on leaving, i-PI is ended and its UNIX socket
    file /tmp/ipi_``socket`` removed, also when the run failed."""
    ipi = subprocess.Popen([str(BIN / "i-pi"), xml.name], cwd=xml.parent, stdout=open(log, "w"),
                           stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    try:
        yield ipi
    finally:
        stop(ipi)
        if os.path.exists(f"/tmp/ipi_{socket}"):
            os.unlink(f"/tmp/ipi_{socket}")


def run_ipi_with_driver(xml: Path, socket: str, driver: list[str], ipi_log: Path, driver_log: Path,
                        timeout: float) -> None:
    """i-PI on ``xml`` served by the ``driver`` command (stderr to ``driver_log``) until i-PI's EXIT; a failed
    driver raises with the end of its log."""
    with ipi_server(xml, ipi_log, socket) as ipi:
        drv = subprocess.Popen(driver, cwd=xml.parent, stderr=open(driver_log, "w"), env=child_env(),
                               start_new_session=True)
        try:
            if drv.wait(timeout=timeout) != 0:
                raise RuntimeError(f"nanosil-driver failed:\n{driver_log.read_text()[-2000:]}")
            ipi.wait(timeout=120)
        finally:
            stop(drv)


def write_json(path: str, figures: dict) -> None:
    """``figures`` as indented JSON, atomically (:mod:`spectra.atomic`): a reader never sees half a file."""
    from spectra.atomic import write_json as _write

    _write(path, figures, indent=2)


def accumulated_wall(workdir: Path, seconds: float) -> float:
    """Wall seconds over every invocation on this work directory (a killed run resumes; its time counts)."""
    import json

    from spectra.atomic import write_json as _write

    path = Path(workdir) / "bench_wall.json"
    before = json.loads(path.read_text()).get("seconds", 0.0) if path.is_file() else 0.0
    _write(path, {"seconds": before + seconds})
    return before + seconds


def per_structure_mae(state: dict, iteration) -> dict:
    """Harmonic MAE (cm^-1) per structure at ``iteration`` (a number, or ``"final"`` for the long final
    training) of an active-learning state (state.json)."""
    if str(iteration) == "final":
        holder = state.get("final") or {}
    else:
        holder = state["initial"] if int(iteration) == 0 else state["iterations"].get(str(iteration), {})
    measured = (holder.get("measured") or {}).get("harmonic", {}).get("structures", {})
    return {n: float(v["mae_cm-1"]) for n, v in measured.items()}


def learning_curve(workdir: Path):
    """(report rows, labels, harmonic MAE, harmonic RMSE in cm^-1, state) of an active-learning work directory."""
    import json

    from al_manager.learning.report import read_report_csv

    rows = read_report_csv(Path(workdir) / "report.csv")
    labels = [int(r["labels"]) for r in rows]
    mae = [float(r["harmonic_mae_cm-1"]) for r in rows]
    rmse = [float(r["harmonic_rmse_cm-1"]) for r in rows]
    return rows, labels, mae, rmse, json.loads((Path(workdir) / "state.json").read_text())


def short_campaign(models: Path, output: Path, clusters: dict[str, Path], temperature: float, seeds: int,
                   production_ps: float, md: dict, run: dict, **sections) -> dict:
    """The TOML-equivalent dict of a short NVT campaign for a benchmark (``config_from_dict`` checks it):
    ``md`` adds to the [md] section, ``run`` is [run], ``sections`` are the others (e.g. ``trust``). The
    discarded start (a quarter, at most 1 ps) and the correlation depth (a quarter of what is left, at most
    2048 fs) follow the production length, so that short slices validate too; no harmonic spectra."""
    discard = min(1.0, production_ps / 4)
    return {"models": str(models), "output": str(output), "temperatures": [temperature], "seeds": seeds,
            "ensemble": "nvt",
            "md": {"production_ps": production_ps, "discard_ps": discard, **md}, "run": run,
            "spectra": {"harmonic": False, "correlation_depth_fs": min(2048.0, 250.0 * (production_ps - discard))},
            "clusters": {name: str(path) for name, path in clusters.items()}, **sections}
