"""The active-learning loop (the paper's Fig. 2), resumable from its work directory at any moment.

Steps, each recorded in ``WORKDIR/state.json`` (:mod:`al_manager.learning.state`) before the next begins:

iteration 0 (``nanosil al init``)
    ``initial_data``: normal-mode sampling + farthest point sampling for every structure
    (:func:`al_manager.learning.initial_data.make_initial_data`), kept in ``WORKDIR/initial/NAME.extxyz``;
    ``initial_label``: labelled with the reference backend into ``WORKDIR/data.db``;
    ``initial_train``: the first committee, ``WORKDIR/models/iter_000``; ``measure``.
iteration k = 1, 2, ...
    ``sampling``: one i-PI run per (structure, temperature) (:mod:`al_manager.learning.sampling`);
    ``labelling``: the flagged frames, in parallel, into ``data.db``;
    ``training``: warm start from ``models/iter_{k-1}`` into ``models/iter_k``;
    ``measure``: harmonic-frequency MAE/RMSE against the reference (:mod:`al_manager.learning.measure`), validation
    errors, label counts; a row of ``report.csv`` and ``learning_curve.png`` (:mod:`al_manager.learning.report`).
It stops when the harmonic MAE has not improved for ``patience`` iterations, after ``max_iterations`` or once
``max_labels`` are spent. With ``[stopping] final_epochs`` one more step follows:
``final``: the committee trained from scratch on every label for that many epochs into ``WORKDIR/models/final``,
    measured like an iteration (the row ``final`` of ``report.csv``); it is the loop's result.

Durability: labels are written one transaction each and never computed twice (the dataset's structure
hash); models are written atomically; the state file after every step, every flagged frame and every
run's end. A manager killed at any moment (SIGKILL included) is resumed by running the same command: the
processes it left are ended first (:func:`al_manager.processes.end_orphans`), then the interrupted step is
redone from its recorded inputs. ``WORKDIR/al.log`` (and stdout) gets one line per step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from spectra.atomic import write_text, write_with

from .sampling import Sampler, SamplingFailed, frames_as_atoms, plan_runs, summarize
from al_manager.processes import OWNER_ENV, end_orphans

from .state import State, WorkdirLock

if TYPE_CHECKING:
    from .config import ALConfig

DB_NAME = "data.db"
LOG_NAME = "al.log"
REPORT_NAME = "report.csv"
CURVE_NAME = "learning_curve.png"


# ---------------------------------------------------------------------- log
class StepLog:
    """One line per step, to stdout and ``WORKDIR/al.log`` (appended, flushed at once)."""

    def __init__(self, workdir: Path, stream=None):
        self.path = Path(workdir) / LOG_NAME
        self.stream = sys.stdout if stream is None else stream

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.stream is not None:
            print(line, file=self.stream, flush=True)


class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the manager: children are ended, the state stays resumable. A
    BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (a reference backend
    wrapping its failures, a plot that may fail) mistakes the signal for an error of its own."""


@contextlib.contextmanager
def _signals_raise():
    """SIGTERM/SIGINT/SIGHUP become an exception, so every ``finally`` ends its children."""
    def handler(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _owner_tag(token: str):
    """Children (i-PI, MPI ranks, label and training workers) inherit the work directory's tag."""
    before = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = token
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = before


# ---------------------------------------------------------------------- the manager
class Manager:
    """Runs the steps of :mod:`al_manager.learning.loop` for one configuration (:class:`ALConfig`, as loaded)."""

    def __init__(self, config: "ALConfig", state: State, log: Callable[[str], None],
                 make_initial: Callable | None = None):
        self.config = config
        self.state = state
        self.log = log
        self.workdir = config.workdir
        self.db = self.workdir / DB_NAME
        self.make_initial = make_initial
        self._references = None

    # -- paths ----------------------------------------------------------------------------------
    def model_dir(self, iteration: int) -> Path:
        return self.workdir / "models" / f"iter_{iteration:03d}"

    def iter_dir(self, iteration: int) -> Path:
        return self.workdir / "iterations" / f"iter_{iteration:03d}"

    def n_labels(self, **selection) -> int:
        """Labelled structures in the dataset (optionally only those with given key-value pairs)."""
        if not self.db.exists():
            return 0
        from driver.data import connect

        return connect(self.db).count(**selection)

    def n_failed(self, origin: str) -> int:
        from al_manager.reference.labelling import read_failures

        return sum(1 for r in read_failures(self.db) if (r.get("metadata") or {}).get("origin") == origin)

    # -- the state machine -----------------------------------------------------------------------
    def run(self, init_only: bool = False) -> int:
        steps = {"initial_data": self.initial_data, "initial_label": self.initial_label,
                 "initial_train": self.initial_train, "sampling": self.sampling, "labelling": self.labelling,
                 "training": self.training, "measure": self.measure, "final": self.final}
        self._maybe_reopen()
        if self.state["initial"].get("measured"):   # a resumed run: its rows and today's yardstick agree
            self._remeasure_if_the_yardstick_changed()
        while True:
            phase, k = self.state.phase, self.state.iteration
            if phase == "done":
                self.log(f"finished: {self.state.get('stop_reason')}; report {self.workdir / REPORT_NAME}, "
                         f"models {self.result_model()}")
                return 0
            if init_only and k >= 1:
                self.log(f"initial committee ready: {self.model_dir(0)} ({self.n_labels()} labels); "
                         f"continue with `nanosil al run`")
                return 0
            if phase not in steps:
                raise ValueError(f"{self.workdir / 'state.json'}: unknown phase {phase!r}")
            steps[phase]()

    def _remeasure_if_the_yardstick_changed(self) -> None:
        """Committees measured against another yardstick (an older reference analysis, e.g. another
        finite-difference stencil) are measured again against today's, so that every row of the report
        compares with the same reference frequencies; the best iteration and the patience count follow."""
        from .measure import harmonic_errors, yardstick

        current = yardstick(self.references())
        holders = [self.state["initial"]] + [r for _, r in sorted(self.state["iterations"].items(),
                                                                  key=lambda kv: int(kv[0]))]
        holders.append(self.state.get("final") or {})
        stale = [h for h in holders if h.get("measured") and h["measured"]["harmonic"].get("yardstick") != current
                 and (self.workdir / h["row"]["model"] / "committee.json").is_file()]
        for h in stale:
            errors = harmonic_errors(self.workdir / h["row"]["model"], self.references())
            before = h["row"]["harmonic_mae_cm-1"]
            h["measured"]["harmonic"] = errors
            h["row"].update({"harmonic_mae_cm-1": errors["mae_cm-1"], "harmonic_rmse_cm-1": errors["rmse_cm-1"]})
            self.log(f"re-measured {h['row']['model']} against {current}: harmonic MAE {before:.2f} -> "
                     f"{errors['mae_cm-1']:.2f} cm^-1, RMSE {errors['rmse_cm-1']:.2f} cm^-1")
        if stale:
            rows = [(int(h["row"]["iteration"]), h["row"]["harmonic_mae_cm-1"]) for h in holders[:-1] if h.get("row")
                    and not math.isnan(h["row"]["harmonic_mae_cm-1"])]
            if rows:
                best_k, best = min(rows, key=lambda r: r[1])
                self.state["best_mae"], self.state["best_iteration"] = best, best_k
                self.state["since_best"] = max(k for k, _ in rows) - best_k
            self._write_report()
            self.state.save()

    def final_iteration(self) -> int:
        done = [int(k) for k, r in self.state["iterations"].items() if r.get("measured")]
        return max(done, default=0)

    def result_model(self) -> Path:
        """The loop's result: the long final training when there is one, else the last iteration's committee."""
        if (self.state.get("final") or {}).get("row"):
            return self.workdir / self.state["final"]["row"]["model"]
        return self._model_of(self.final_iteration())

    def _maybe_reopen(self) -> None:
        """A finished work directory whose stopping rule no longer holds (max_iterations raised in the
        configuration) goes on with the next iteration; one that now asks for a final training (or a
        longer one) gets it."""
        if self.state.phase != "done":
            return
        k = self.final_iteration()
        stopping = self.config.stopping
        if (self.state.get("stop_reason") or "").startswith("max_iterations") and k < stopping.max_iterations \
                and self.state.get("since_best", 0) < stopping.patience:
            self.log(f"max_iterations raised to {stopping.max_iterations}: continuing after iteration {k}")
            self._retire_final(k)
            self.state["stop_reason"] = None
            self.state.set_phase("sampling", k + 1)
        elif stopping.final_epochs and _final_recipe(self.state.get("final") or {}, self.config.train.subsample) \
                != _final_recipe(self._final_plan()):
            self._retire_final(k)
            self.state.set_phase("final", k)

    # -- iteration 0 -------------------------------------------------------------------------------
    def initial_data(self) -> None:
        from ase.io import read, write

        folder = self.workdir / "initial"
        folder.mkdir(parents=True, exist_ok=True)
        # the reference harmonic analysis first: the initial data start from the same relaxed minimum and
        # reuse its displaced calculations (the expensive part with a DFT backend)
        references = self.references()
        total = 0
        for name, path in self.config.structure_files.items():
            out = folder / f"{name}.extxyz"
            if out.exists():
                total += len(read(str(out), index=":"))
                continue
            t0 = time.time()
            if self.make_initial is not None:
                frames = self.make_initial(name, str(path))
            else:
                frames = self._make_initial(name, references[name].atoms)
            for atoms in frames:
                atoms.info.setdefault("cluster", name)
            write_with(out, lambda tmp, frames=frames: write(str(tmp), frames, format="extxyz"))
            total += len(frames)
            self.log(f"initial data: {name}: {len(frames)} structures (normal modes + FPS) "
                     f"in {time.time() - t0:.0f} s -> {out.relative_to(self.workdir)}")
        self.state["initial"]["n_frames"] = total
        self.state.set_phase("initial_label", 0)

    def _make_initial(self, name: str, minimum):
        from .initial_data import make_initial_data

        from .measure import STENCIL, clear_interrupted_cache

        backend = self.config.backend()
        displacements = self.workdir / "reference" / f"{name}_displacements"
        clear_interrupted_cache(displacements)
        # the yardstick's stencil: its displaced calculations (done first, on the same minimum) are reused
        return make_initial_data(minimum, backend, self.config.initial_data, name=name, workdir=displacements,
                                 log=lambda m: self.log(f"initial data: {m}"), stencil=STENCIL)

    def initial_label(self) -> None:
        from ase.io import read

        frames = []
        for name in self.config.structure_files:
            frames += read(str(self.workdir / "initial" / f"{name}.extxyz"), index=":")
        self._label(frames, origin_default="normal_modes", source="initial data")
        self.state["initial"].update(labelled=self.n_labels(), failed=len(frames) - self.n_labels())
        self.state.set_phase("initial_train", 0)

    def initial_train(self) -> None:
        pretrained = self.config.train.pretrained   # [train] pretrained: fine-tune it instead of from scratch
        if pretrained and not (self.model_dir(0) / "committee.json").is_file():
            self.log(f"iteration 0: fine-tuning the pretrained committee {pretrained} (its per-element energy "
                     f"shift refitted on the {self.config.reference.backend} labels)")
        self._train(0, warm_start=None)
        self.state.set_phase("measure", 0)

    # -- iteration k ------------------------------------------------------------------------------
    def sampling(self) -> None:
        k = self.state.iteration
        specs = plan_runs(self.start_structures(), self.config.temperatures)
        self.state.iteration_record(k)
        self.state.save()
        model = self._model_of(k - 1)
        from al_manager.execution import sampling_arguments

        placement = sampling_arguments(self.config.execution, self.workdir)  # {} here, a Parsl pool with [execution]
        where = (f"{placement['slots']} at a time as tasks of ParslExecutor sampling" if placement else
                 f"{self.config.sampling.parallel_runs} at a time")
        self.log(f"iteration {k}: sampling {len(specs)} run(s) ({len(self.config.structures)} structure(s) x "
                 f"{len(self.config.temperatures)} temperature(s)), {where}, model {model.name}")
        t0 = time.time()
        settings = self.sampling_settings(k, model)
        record = Sampler(self.state, k, specs, model, self.iter_dir(k), settings,
                         previous_iter_dir=self.iter_dir(k - 1) if k > 1 else None, log=self.log,
                         **placement).run()
        s = summarize(record)
        record["sampling_seconds"] = round(record.get("sampling_seconds", 0.0) + time.time() - t0, 1)
        if s["runs"] and s["crashed"] == s["runs"]:
            # a broken installation or model, not bad luck: stop with the reason rather than count an
            # iteration without frames towards the patience
            name, run = next(iter(record["runs"].items()))
            record["runs"] = {}   # the rerun, once fixed, starts every run again
            self.state.save()
            raise SamplingFailed(f"iteration {k}: every sampling run crashed, e.g. {name}: {run['reason']} "
                                 f"(logs under {self.iter_dir(k) / 'runs'}); rerun the same command once fixed")
        self.log(f"iteration {k}: sampling done: {s['frames']} uncertain frame(s) from {s['runs']} run(s) "
                 f"({s['done']} done, {s['crashed']} crashed, {s['exploded']} exploded; {s['md_ps']} ps of MD)")
        self.state.set_phase("labelling", k)

    def sampling_settings(self, k: int, model: Path):
        """``[sampling]`` with this iteration's threshold: the adaptive one (see ``adaptive_factor``) is
        computed once per iteration from the committee's uncertainty on its training data and recorded, so
        a resumed iteration samples with the same threshold."""
        from .measure import training_uncertainty

        s = self.config.sampling
        if s.adaptive_factor is None:
            return s
        record = self.state.iteration_record(k)
        criterion, floor, unit = s.criterion
        if "threshold" not in record:
            u = training_uncertainty(model, self.db, criterion, seed=self.config.seed + k)
            median = float(np.median(u)) if len(u) else 0.0
            record["threshold"] = {"criterion": criterion, "value": max(floor, s.adaptive_factor * median),
                                   "training_median": median, "training_p90": float(np.percentile(u, 90)) if len(u) else 0.0,
                                   "floor": floor, "factor": s.adaptive_factor}
            self.state.save()
        th = record["threshold"]
        self.log(f"iteration {k}: adaptive threshold {th['value']:.4g} {unit} = max({floor:g}, "
                 f"{s.adaptive_factor:g} x {th['training_median']:.4g}, the committee's median {criterion} std on "
                 f"its training data; 90th percentile {th['training_p90']:.4g})")
        return s.with_threshold(th["value"])

    def labelling(self) -> None:
        k = self.state.iteration
        record = self.state.iteration_record(k)
        frames = frames_as_atoms(record)
        budget = self.config.stopping.max_labels
        if budget is not None and frames and "budget_kept" not in record:
            left = max(0, budget - self.n_labels())
            if len(frames) > left:
                # the most uncertain frames first (the measure the driver flagged them by)
                order = sorted(range(len(frames)), key=lambda i: -_flag_measure(record["frames"][i]))
                record["budget_kept"] = sorted(order[:left])
                self.log(f"iteration {k}: label budget {budget}: {left} of {len(frames)} flagged frame(s) "
                         f"labelled (the most uncertain)")
            else:
                record["budget_kept"] = list(range(len(frames)))
            self.state.save()
        if "budget_kept" in record:
            frames = [frames[i] for i in record["budget_kept"]]
        if frames:
            origin = f"al_iter_{k:03d}"
            report = self._label(frames, origin_default=origin, source=f"iteration {k}")
            # counted from the database, so a labelling step resumed after a kill counts every label once
            record.update(new_labels=self.n_labels(origin=origin), failed_labels=self.n_failed(origin))
            record["failures"] = [{"frame": f.frame, "reason": f.reason} for f in report.failures]
        else:
            record.update(new_labels=0, failed_labels=0)
            self.log(f"iteration {k}: no uncertain frame: nothing to label")
        record["label_done"] = True
        self.state.set_phase("training", k)

    def training(self) -> None:
        k = self.state.iteration
        record = self.state.iteration_record(k)
        previous = self._model_of(k - 1)
        if not record.get("new_labels"):
            # no new data: the committee of the previous iteration stays in use
            record["model"] = str(previous.relative_to(self.workdir))
            record["trained"] = False
            self.log(f"iteration {k}: no new labels: keeping {previous.name}")
        else:
            self._train(k, warm_start=previous)
            record["model"] = str(self.model_dir(k).relative_to(self.workdir))
            record["trained"] = True
        self.state.set_phase("measure", k)

    def start_structures(self) -> dict[str, str]:
        """Where sampling starts: each structure's minimum relaxed with the reference method (the minimum
        the initial data were built around), or its file when it was not relaxed."""
        out = {}
        for name, path in self.config.structure_files.items():
            relaxed = self.workdir / "reference" / f"{name}_relaxed.extxyz"
            out[name] = str(relaxed) if self.config.initial_data.relax and relaxed.is_file() else str(path)
        return out

    def _model_of(self, k: int) -> Path:
        if k == 0:
            return self.model_dir(0)
        model = self.state["iterations"].get(str(k), {}).get("model")
        return self.workdir / model if model else self.model_dir(k)

    # -- measure, report, stop ----------------------------------------------------------------------
    def references(self):
        from .measure import reference_harmonics

        if self._references is None:
            ref = self.config.reference
            self._references = reference_harmonics(self.config.structure_files, ref.backend,
                                                    self.workdir / "reference", ref.options,
                                                    relax=self.config.initial_data.relax, log=self.log,
                                                    workers=ref.workers)
        return self._references

    def _measure_model(self, model: Path, iteration) -> tuple[dict, dict, dict, str]:
        """``model``'s harmonic errors against the reference and its validation errors, its report row (the
        step's own counts and seconds are added by the caller) and a per-structure summary for the log."""
        from .measure import harmonic_errors, validation_errors

        errors = harmonic_errors(model, self.references())
        val = validation_errors(model)
        per = ", ".join(f"{n} {e['mae_cm-1']:.2f}" if not math.isnan(e["mae_cm-1"])
                        else f"{n} n/a (committee relaxation failed: {e.get('error', 'not converged')})"
                        for n, e in errors["structures"].items())
        row = {"iteration": iteration, "labels": self.n_labels(), "harmonic_mae_cm-1": errors["mae_cm-1"],
               "harmonic_rmse_cm-1": errors["rmse_cm-1"], "model": str(model.relative_to(self.workdir)),
               "val_energy_mae_meV_per_atom": val.get("energy_mae_meV_per_atom"),
               "val_force_mae_eV_per_A": val.get("force_mae_eV_per_A"), "val_dipole_mae_D": val.get("dipole_mae_D")}
        return errors, val, row, per

    def measure(self) -> None:
        k = self.state.iteration
        model = self._model_of(k)
        t0 = time.time()
        errors, val, row, per = self._measure_model(model, k)
        if k == 0:
            init = self.state["initial"]
            row.update(new_labels=init.get("labelled", 0), failed_labels=init.get("failed", 0))
            holder = init
        else:
            rec = self.state.iteration_record(k)
            s = summarize(rec)
            row.update(new_labels=rec.get("new_labels", 0), failed_labels=rec.get("failed_labels", 0),
                       flagged_frames=s["frames"], runs=s["runs"], runs_done=s["done"], runs_crashed=s["crashed"],
                       runs_exploded=s["exploded"], md_ps=s["md_ps"])
            holder = rec
        holder["measured"] = {"harmonic": errors, "validation": val}
        holder["row"] = row
        row["seconds"] = round(time.time() - self.state.get("started_iteration", time.time()), 1)
        self._write_report()
        mae = errors["mae_cm-1"]
        best = self.state.get("best_mae")
        improved = not math.isnan(mae) and (best is None or mae < best)
        if improved:
            self.state["best_mae"], self.state["best_iteration"], self.state["since_best"] = mae, k, 0
        elif k > 0:
            self.state["since_best"] = self.state.get("since_best", 0) + 1
        trend = "best so far" if improved else f"no improvement for {self.state.get('since_best', 0)} iteration(s)"
        self.log(f"iteration {k}: harmonic MAE {mae:.2f} cm^-1, RMSE {errors['rmse_cm-1']:.2f} cm^-1 "
                 f"({per}); validation {_fmt_val(val)}; {row['labels']} labels; {trend} [{time.time() - t0:.0f} s]")
        stop = None
        stopping = self.config.stopping
        if k >= 1 and self.state.get("since_best", 0) >= stopping.patience:
            stop = (f"patience: the harmonic MAE has not improved for {stopping.patience} iteration(s) "
                    f"(best {self.state['best_mae']:.2f} cm^-1 at iteration {self.state['best_iteration']})")
        elif k >= stopping.max_iterations:
            stop = f"max_iterations ({stopping.max_iterations}) reached"
        elif stopping.max_labels is not None and int(row["labels"]) >= stopping.max_labels:
            stop = f"max_labels: {row['labels']} labels >= the budget of {stopping.max_labels}"
        self.state["started_iteration"] = time.time()
        if stop:
            self.state["stop_reason"] = stop
            self.state.set_phase("final" if stopping.final_epochs else "done", k)
        else:
            self.state.set_phase("sampling", k + 1)

    def final(self) -> None:
        """The final training on every label (``[stopping] final_epochs``: from scratch, or with
        ``final_from = "last"`` from the last iteration's committee), then its measure."""
        import dataclasses

        k = self.state.iteration
        stopping = self.config.stopping
        epochs = stopping.final_epochs
        out = self.workdir / "models" / "final"
        start = self._model_of(k) if stopping.final_from == "last" else None
        cfg = self.config.train_config(warm_start=start)
        lr = stopping.final_lr or cfg.lr
        # no early stopping: the best-validation weights of the whole decaying schedule are kept
        plan = self._final_plan()
        cfg = dataclasses.replace(cfg, epochs=epochs, patience=epochs, lr=lr, lr_dipole=cfg.lr_dipole * lr / cfg.lr,
                                  hold_out=plan["hold_out"], subsample=plan["subsample"],
                                  bootstrap=cfg.bootstrap and plan["hold_out"])
        how = f"from {start.name}" if start is not None else "from scratch"
        labels = "every label" if plan["hold_out"] else "every label for every member (the validation tenth too)"
        self.log(f"final: {self.state.get('stop_reason')}; training the committee {how} on {labels} for "
                 f"{epochs} epochs at lr {lr:g} (no early stopping) -> {out.relative_to(self.workdir)}")
        self._train(k, warm_start=start, out=out, cfg=cfg, name="final")
        t0 = time.time()
        errors, val, row, per = self._measure_model(out, "final")
        row.update(new_labels=0, seconds=round(time.time() - self.state.get("started_iteration", time.time()), 1))
        self.state["final"] = {"after_iteration": k, **plan, "row": row,
                               "measured": {"harmonic": errors, "validation": val}}
        self._write_report()
        last = self.state["iterations"].get(str(k), {}).get("row") or self.state["initial"].get("row") or {}
        before = f" (iteration {k}: {last['harmonic_mae_cm-1']:.2f})" if last.get("harmonic_mae_cm-1") else ""
        self.log(f"final: harmonic MAE {errors['mae_cm-1']:.2f} cm^-1{before}, RMSE {errors['rmse_cm-1']:.2f} cm^-1 "
                 f"({per}); validation {_fmt_val(val)}; {row['labels']} labels [{time.time() - t0:.0f} s]")
        self.state.set_phase("done", k)

    def _final_plan(self) -> dict:
        """The recipe of the configured final training. ``final_hold_out = false``: every label trains every
        member (no validation tenth, no [train] subsample)."""
        stopping = self.config.stopping
        return {"epochs": stopping.final_epochs, "from": stopping.final_from, "lr": stopping.final_lr,
                "hold_out": stopping.final_hold_out,
                "subsample": self.config.train.subsample if stopping.final_hold_out else 1.0}

    def _retire_final(self, k: int) -> None:
        """A reopened loop trains a new final committee later; the old one is kept under another name."""
        final = self.state.get("final") or {}
        folder = self.workdir / "models" / "final"
        if folder.is_dir():
            kept = folder.with_name(f"final_after_iter_{final.get('after_iteration', k):03d}"
                                    f"_{final.get('epochs', 'unfinished')}_epochs")
            if kept.exists():
                shutil.rmtree(kept)  # the same final training again: the newer copy replaces it
            folder.rename(kept)
            self.log(f"the earlier final committee is kept as {kept.relative_to(self.workdir)}")
        self.state["final"] = None

    def _write_report(self) -> None:
        from .report import plot_learning_curve, write_report_csv

        rows = [self.state["initial"]["row"]] if self.state["initial"].get("row") else []
        rows += [r["row"] for _, r in sorted(self.state["iterations"].items(), key=lambda kv: int(kv[0]))
                 if r.get("row")]
        if (self.state.get("final") or {}).get("row"):
            rows.append(self.state["final"]["row"])
        write_report_csv(self.workdir / REPORT_NAME, rows)
        try:
            plot_learning_curve(self.workdir / CURVE_NAME, rows,
                                title=f"{', '.join(self.config.structure_files)} ({self.config.reference.backend})")
        except Exception as exc:  # a plotting problem must not stop the learning
            self.log(f"warning: learning curve not drawn: {exc}")

    # -- shared steps ---------------------------------------------------------------------------------
    def _label(self, frames, origin_default: str, source: str):
        from al_manager.reference.labelling import label_structures

        metadata = []
        for atoms in frames:
            meta = {"origin": atoms.info.get("origin") or origin_default}
            if atoms.info.get("cluster"):
                meta["cluster"] = str(atoms.info["cluster"])
            if atoms.info.get("temperature") is not None:
                meta["temperature"] = float(atoms.info["temperature"])
            metadata.append(meta)
        from al_manager.execution import labelling_arguments

        ref = self.config.reference
        t0 = time.time()
        placement = labelling_arguments(self.config.execution, ref.backend, ref.workers, ref.options or None)
        report = label_structures(frames, ref.backend, self.db, metadata=metadata, source=source, progress=False,
                                  **placement)
        self.log(f"{source}: labelled {len(frames)} frame(s) with {ref.backend}: {report.summary()}; "
                 f"{self.n_labels()} labels in {self.db.name} [{time.time() - t0:.0f} s]")
        for failure in report.failures[:5]:
            self.log(f"{source}: label failed: {failure.frame}: {failure.reason}")
        return report

    def _train(self, k: int, warm_start: Path | None, out: Path | None = None, cfg=None,
               name: str | None = None) -> None:
        from driver.training import train_committee

        out = out or self.model_dir(k)
        name = name or f"iteration {k}"
        if (out / "committee.json").is_file():
            self.log(f"{name}: {out.relative_to(self.workdir)} already trained")
            return
        cfg = cfg or self.config.train_config(warm_start=warm_start)
        t0 = time.time()
        self.log(f"{name}: training {cfg.committee} + {cfg.dipole_members} member(s) on {self.n_labels()} "
                 f"labels{f' (warm start from {Path(warm_start).name})' if warm_start else ''}")
        from al_manager.execution import active_session

        pool = active_session()   # [execution] mode = "parsl": one task per member on the training pool
        committee = train_committee(self.db, out, cfg,
                                    executor=pool.executor("training") if pool is not None else None)
        val = (committee.metadata or {}).get("errors", {}).get("validation", {})
        self.log(f"{name}: committee {committee.version} -> {out.relative_to(self.workdir)} "
                 f"[{time.time() - t0:.0f} s]; validation {_fmt_val(val)}")


def _final_recipe(record: dict, subsample: float | None = None) -> tuple:
    """(epochs, from, lr, hold_out, subsample) of the final training a state record (or a plan) describes:
    a ``[stopping]`` that asks for another trains anew. Records from before a field was kept were from
    scratch at [train] lr, holding out, with ``subsample`` (the [train] subsample)."""
    return (record.get("epochs"), record.get("from") or "scratch", record.get("lr"), record.get("hold_out", True),
            record.get("subsample", subsample))


def _fmt_val(val: dict) -> str:
    if not val:
        return "n/a"
    parts = [f"E {val.get('energy_mae_meV_per_atom', float('nan')):.2f} meV/atom",
             f"F {val.get('force_mae_eV_per_A', float('nan')):.3f} eV/Å"]
    if val.get("dipole_mae_D") is not None:
        parts.append(f"μ {val['dipole_mae_D']:.3f} D")
    return ", ".join(parts) + " (MAE)"


# ---------------------------------------------------------------------- entry point
def run_loop(config: "ALConfig", *, init_only: bool = False, make_initial: Callable | None = None,
             stream=None, config_text: str | None = None) -> int:
    """Run (or resume) active learning in ``config.workdir`` (``config``: from
    :func:`al_manager.learning.config.load_config` or ``parse_config``). Returns 0 when finished (or, with
    ``init_only``, once the initial committee is measured)."""
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    with WorkdirLock(workdir):
        state = State.load(workdir, create=True)
        log = StepLog(workdir, stream)
        here = str(workdir.resolve())
        if state.get("workdir") not in (None, here):
            # a copied or moved work directory: processes tagged with the old token belong to the original
            state["token"] = secrets.token_hex(8)
            state["children"] = []
            log(f"work directory moved or copied from {state['workdir']}: new owner tag")
        state["workdir"] = here
        state.save()
        _check_same_structures(state, config)
        if config_text is not None and not (workdir / "config.toml").exists():
            write_text(workdir / "config.toml", config_text)
        found = end_orphans(state)
        if found:
            log(f"resume: ended {len(found)} process(es) left by an interrupted manager (PIDs "
                f"{', '.join(map(str, found))})")
        if state.phase != "initial_data" or state.iteration:
            log(f"resume: phase {state.phase}, iteration {state.iteration}, {Manager(config, state, log).n_labels()} labels")
        else:
            names = list(config.structure_files)
            log(f"start: {len(names)} structure(s) ({', '.join(names)}), temperatures "
                f"{', '.join(f'{t:g}' for t in config.temperatures)} K, backend {config.reference.backend}, "
                f"work directory {workdir}")
        if "started_iteration" not in state.data:
            state["started_iteration"] = time.time()
        manager = Manager(config, state, log, make_initial=make_initial)
        from al_manager.execution import session

        with _owner_tag(state.token), _signals_raise():
            try:
                # labels and trainings go where [execution] says (local processes by default; Parsl workers
                # on a cluster), the manager alone writes labels and state; the session's workers carry the
                # owner tag, like every child
                with session(config.execution, workdir / "parsl"):
                    return manager.run(init_only=init_only)
            except Interrupted as exc:
                log(f"interrupted by {exc} during {state.phase} (iteration {state.iteration}); rerun the same "
                    f"command to resume")
                return 130
            finally:
                left = end_orphans(state, grace=3.0)
                if left:
                    log(f"ended {len(left)} leftover child process(es)")


def _flag_measure(frame: dict) -> float:
    value = frame.get("max_force_std") if frame.get("criterion") == "force" else frame.get("energy_std_per_atom")
    return float(value) if isinstance(value, (int, float)) else 0.0


def _check_same_structures(state: State, config: "ALConfig") -> None:
    """A work directory belongs to one set of structures and temperatures: resuming it with others would
    mix runs. (Thresholds, sizes and limits may change between resumes.)"""
    from driver.data import structure_hash
    from ipi_inputs import read_cluster

    def identity(path: str) -> str:  # the structure itself, not where its file lives
        atoms = read_cluster(path)
        return structure_hash(atoms.numbers, atoms.positions)

    key = {"structures": {n: identity(p) for n, p in config.structure_files.items()},
           "temperatures": [float(t) for t in config.temperatures], "backend": config.reference.backend}
    recorded = state.get("identity")
    if recorded is None:
        state["identity"] = key
        state.save()
        return
    for field_name in ("structures", "temperatures", "backend"):
        if recorded.get(field_name) != key[field_name]:
            if field_name == "structures":
                was, now = sorted(recorded["structures"]), sorted(key["structures"])
                detail = (f"structures {', '.join(was)}" if was != now else "other atoms under the same names")
            else:
                detail = f"{field_name} = {json.dumps(recorded.get(field_name))}"
            raise ValueError(f"{field_name}: work directory {config.workdir} was started with {detail}; "
                             f"use a new work directory for this configuration")
