"""Training-schedule study (issue 2): which schedule reaches the validation error of a long, paper-like
schedule in a small fraction of its time?

One energy/force member (no dipole model) on one core (one process, one torch thread), trained with the
project's own ``driver.training.train_committee`` and scored with ``error_table`` on the fixed 9:1
validation split of an xTB-labelled database:

* the *reference*: a long schedule (default 2000 epochs, lr 2e-3 decaying linearly to 0, batch 8, no early
  stopping), the stand-in for the paper's 12,000 epochs. Its validation MAEs are also recorded every
  ``--monitor-every`` epochs (current weights, the time spent scoring is not counted as training time);
  for that one run the member trains in this process instead of a child process so the monitor can see it.
* short schedules (100-800 epochs, lr 2e-3 / 5e-3, batch 8 / 16 / 32, early stopping patience 80, as in
  ``TrainConfig``), each in the ordinary child process.

A schedule qualifies when both its validation energy MAE (meV/atom) and force MAE (eV/Å) are within
``--tolerance`` (10 %) of the reference's; the chosen schedule is the qualifying one with the least training
time (time fractions compare the members' training-loop seconds, the part that scales with data and epochs).
The paper-schedule estimate scales the reference's seconds per epoch to 12,000 epochs on 3458 structures
(by the number of structures; a second figure also scales by atoms per structure: the paper's set averages
~43 atoms, from its recipe of 1 + 3 N_atoms normal-mode structures per cluster P1-P10/O1-O10).

    OMP_NUM_THREADS=1 .venv/bin/python bench/training_schedule.py --db DATA.db [--quick] [--json out.json]

The default --db is the database of ``bench/label_efficiency.py --quick``, which grows with every iteration:
the study reported for issue 2 used its first 136 labels (iterations 0-3: P1, O1, P2, O2).

The paper-length comparison of issue 2 (a 12,000-epoch reference, ~85 min, against the schedules above):
``--max-frames 136 --reference-epochs 12000 --monitor-every 500 --resume RESULTS.json --only none``.

``--quick``: a 400-epoch reference and four short schedules (~6 min); the full study takes ~35 min on one
core. ``--extra 1000:2e-3:8:0`` adds schedules (EPOCHS:LR:BATCH[:PATIENCE], 0 = no early stopping) and
``--resume OLD.json`` keeps an earlier run's reference and schedules, running only the new ones.
JSON keys: ``schedules`` (list of {name, epochs, lr, batch_size, wall_s, val_energy_mae_meV_per_atom,
val_force_mae_eV_per_A, ...}), ``reference_schedule``, ``chosen_schedule``,
``chosen_time_fraction_of_reference``, ``paper_schedule_hours_estimate``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Child training processes (python -m driver.training) must import this same tree.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

import driver.training as training  # noqa: E402
from driver.data import read_frames, split_train_validation  # noqa: E402
from driver.models.committee import Committee, ModelConfig, _energy_model  # noqa: E402

DEFAULT_DB = REPO / "bench" / "results" / "label_efficiency_quick" / "data.db"
PAPER_EPOCHS = 12_000
PAPER_STRUCTURES = 3458
PAPER_MEAN_ATOMS = 86130 / 2000   # sum over P1-P10, O1-O10 of (1 + 3 n) n atoms / 2000 structures


def schedules(quick: bool) -> tuple[dict, list[dict]]:
    """(reference, short schedules): epochs, lr, batch size, patience (None: no early stopping)."""
    if quick:
        ref = dict(name="reference", epochs=400, lr=2e-3, batch_size=8, patience=None)
        grid = [(50, 2e-3, 8), (100, 2e-3, 8), (100, 5e-3, 8), (100, 5e-3, 16)]
    else:
        ref = dict(name="reference", epochs=2000, lr=2e-3, batch_size=8, patience=None)
        grid = [(100, 2e-3, 8), (200, 2e-3, 8), (400, 2e-3, 8), (800, 2e-3, 8),
                (100, 5e-3, 8), (200, 5e-3, 8), (400, 5e-3, 8),
                (200, 5e-3, 16), (400, 5e-3, 16), (400, 5e-3, 32)]
    short = [dict(name=f"e{e}_lr{lr:g}_b{b}", epochs=e, lr=lr, batch_size=b, patience=80) for e, lr, b in grid]
    return ref, short


class Monitor:
    """Scores the member being trained every ``every`` epochs with ``error_table``. It wraps
    ``driver.training._energy_loss``: training calls it with create_graph=True, the per-epoch validation
    pass with create_graph=False, so the first validation call marks the end of an epoch's training."""

    def __init__(self, every: int, mcfg: ModelConfig, shift, val_frames, epochs: int, t0: float):
        self.every, self.mcfg, self.shift, self.val_frames, self.epochs = every, mcfg, shift, val_frames, epochs
        self.epoch, self.in_train, self.spent, self.t0 = -1, False, 0.0, t0
        self.points: list[dict] = []
        self._loss = training._energy_loss

    def __call__(self, model, data, ids, cfg, create_graph):
        if create_graph:
            self.in_train = True
        elif self.in_train:
            self.in_train = False
            self.epoch += 1
            if self.epoch % self.every == self.every - 1 or self.epoch == self.epochs - 1:
                self.score(model)
        return self._loss(model, data, ids, cfg, create_graph)

    def score(self, model):
        t = time.time()
        trained_s = t - self.t0 - self.spent   # scoring time so far is not training time
        member = _energy_model(self.mcfg, 1)
        member.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
        table = training.error_table(Committee(self.mcfg, member.eval(), None, self.shift), self.val_frames)
        self.spent += time.time() - t
        self.points.append(dict(epoch=self.epoch + 1, train_s=round(trained_s, 2),
                                val_energy_mae_meV_per_atom=table["energy_mae_meV_per_atom"],
                                val_force_mae_eV_per_A=table["force_mae_eV_per_A"]))
        p = self.points[-1]
        print(f"  [monitor] epoch {p['epoch']:5d}  {p['train_s']:8.1f} s  E {p['val_energy_mae_meV_per_atom']:7.3f} "
              f"meV/atom  F {p['val_force_mae_eV_per_A']:.4f} eV/A", flush=True)


def _in_process(tasks, workers, threads):
    return [training._train_member(dict(task, threads=threads)) for task in tasks]


def run_schedule(frames, sched: dict, seed: int, monitor_every: int | None = None) -> dict:
    cfg = training.TrainConfig(committee=1, dipole_members=0, workers=1, seed=seed, epochs=sched["epochs"],
                               lr=sched["lr"], batch_size=sched["batch_size"],
                               patience=sched["patience"] or sched["epochs"] + 1,
                               log_every=max(50, sched["epochs"] // 10))
    monitor = None
    saved = training._energy_loss, training._run_tasks
    t0 = time.time()
    if monitor_every:
        train_frames, val_frames = split_train_validation(frames, seed)
        mcfg = ModelConfig(**cfg.model)
        shift = training.fit_energy_shift(train_frames, len(mcfg.species),
                                          training._species_index(train_frames, mcfg.species))
        monitor = Monitor(monitor_every, mcfg, shift, val_frames, cfg.epochs, t0)
        training._energy_loss, training._run_tasks = monitor, _in_process
    try:
        with tempfile.TemporaryDirectory(prefix="nanosil-sched-") as tmp:
            committee = training.train_committee(frames, Path(tmp) / "m", cfg)
    finally:
        training._energy_loss, training._run_tasks = saved
    wall = time.time() - t0
    member = committee.metadata["members"][0]
    val = committee.metadata["errors"]["validation"]
    spent = monitor.spent if monitor else 0.0
    out = dict(sched, patience=sched["patience"], wall_s=round(wall - spent, 2),
               train_s=round(member["seconds"] - spent, 2), epochs_run=member["epochs_run"],
               best_epoch=member["best_epoch"],
               s_per_epoch=round((member["seconds"] - spent) / member["epochs_run"], 4),
               val_energy_mae_meV_per_atom=val["energy_mae_meV_per_atom"],
               val_force_mae_eV_per_A=val["force_mae_eV_per_A"],
               val_energy_rmse_meV_per_atom=val["energy_rmse_meV_per_atom"],
               val_force_rmse_eV_per_A=val["force_rmse_eV_per_A"],
               n_train=committee.metadata["n_train"], n_validation=committee.metadata["n_validation"])
    if monitor:
        out["curve"] = monitor.points
    return out


def qualifies(s: dict, ref: dict, tol: float) -> bool:
    return (s["val_energy_mae_meV_per_atom"] <= (1 + tol) * ref["val_energy_mae_meV_per_atom"]
            and s["val_force_mae_eV_per_A"] <= (1 + tol) * ref["val_force_mae_eV_per_A"])


def ratio(s: dict, ref: dict) -> float:
    return max(s["val_energy_mae_meV_per_atom"] / ref["val_energy_mae_meV_per_atom"],
               s["val_force_mae_eV_per_A"] / ref["val_force_mae_eV_per_A"])


def summarize(ref: dict, short: list[dict], tol: float, n_frames: int, mean_atoms: float) -> dict:
    ok = [s for s in short if qualifies(s, ref, tol)]
    chosen = min(ok, key=lambda s: s["train_s"]) if ok else min(short, key=lambda s: ratio(s, ref)) if short else None
    # Structures processed per epoch: the member's subsample of the training split plus the validation pass;
    # the paper's single model would see its whole 9:1 split of 3458.
    per_structure_epoch = ref["s_per_epoch"] / (round(0.9 * ref["n_train"]) + ref["n_validation"])
    hours = per_structure_epoch * PAPER_STRUCTURES * PAPER_EPOCHS / 3600
    out = {"schedules": short, "reference_schedule": ref,
           "chosen_schedule": chosen, "chosen_qualifies": bool(ok),
           "tolerance": tol,
           "chosen_time_fraction_of_reference": chosen["train_s"] / ref["train_s"] if chosen else None,
           "chosen_wall_fraction_of_reference": chosen["wall_s"] / ref["wall_s"] if chosen else None,
           "paper_schedule_hours_estimate": hours,
           "paper_schedule_hours_estimate_atom_scaled": hours * PAPER_MEAN_ATOMS / mean_atoms,
           "db_structures": n_frames, "db_mean_atoms": mean_atoms, "threads": torch.get_num_threads()}
    if chosen:
        out["chosen_time_fraction_of_paper_estimate"] = chosen["train_s"] / 3600 / hours
        out["chosen_time_fraction_of_paper_estimate_atom_scaled"] = (
            chosen["train_s"] / 3600 / out["paper_schedule_hours_estimate_atom_scaled"])
    curve = ref.get("curve") or []
    hit = next((p for p in curve if qualifies(p, ref, tol)), None)
    out["reference_epochs_to_target"] = hit and {"epoch": hit["epoch"], "train_s": hit["train_s"]}
    return out


def table(result: dict) -> str:
    ref = result["reference_schedule"]
    rows = [ref] + result["schedules"]
    lines = [f"{'schedule':22s} {'epochs':>6s} {'run':>5s} {'best':>5s} {'lr':>7s} {'batch':>5s} {'pat':>4s} {'train s':>8s} "
             f"{'wall s':>8s} {'t/t_ref':>7s} {'E MAE meV/at':>12s} {'F MAE eV/A':>10s} {'err/ref':>7s}"]
    for s in rows:
        mark = " *" if result.get("chosen_schedule") and s["name"] == result["chosen_schedule"]["name"] else ""
        lines.append(f"{s['name']:22s} {s['epochs']:6d} {s['epochs_run']:5d} {s['best_epoch']:5d} {s['lr']:7.0e} "
                     f"{s['batch_size']:5d} {str(s['patience'] or '-'):>4s} {s['train_s']:8.1f} {s['wall_s']:8.1f} {s['train_s'] / ref['train_s']:7.3f} "
                     f"{s['val_energy_mae_meV_per_atom']:12.3f} {s['val_force_mae_eV_per_A']:10.4f} "
                     f"{ratio(s, ref):7.2f}{mark}")
    return "\n".join(lines)


def write_json(path: str, payload: dict) -> None:
    from spectra.atomic import write_json as _write

    _write(path, payload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default=str(DEFAULT_DB), help="labelled ASE database (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="400-epoch reference and 4 short schedules")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--seed", type=int, default=training.TrainConfig.seed)
    ap.add_argument("--tolerance", type=float, default=0.10, help="relative error margin to the reference")
    ap.add_argument("--monitor-every", type=int, default=None, help="epochs between reference scores")
    ap.add_argument("--only", nargs="*", help="run only these short schedules (names)")
    ap.add_argument("--reference-epochs", type=int, help="override the reference's epochs")
    ap.add_argument("--extra", nargs="*", default=[], metavar="EPOCHS:LR:BATCH[:PATIENCE]",
                    help="more short schedules, e.g. 800:5e-3:16 (patience 80) or 800:5e-3:16:0 (no early stopping)")
    ap.add_argument("--resume", metavar="JSON", help="an earlier result of this script on the same --db: its "
                    "reference and schedules are kept, only schedules not in it are run; with a different "
                    "--reference-epochs, a new reference is trained and the old one joins the schedules")
    ap.add_argument("--max-frames", type=int, help="use only the first N structures of --db (the database of "
                    "bench/label_efficiency.py grows with every iteration)")
    args = ap.parse_args(argv)
    if not Path(args.db).is_file():
        print(f"error: database {args.db} not found (label one first, e.g. with bench/label_efficiency.py --quick)")
        return 2
    torch.set_num_threads(1)
    training._cores = lambda: 1   # one core: one process with one torch thread, whatever the machine has
    frames = read_frames(args.db)[:args.max_frames]
    if len(frames) < 20:
        print(f"error: {args.db} has {len(frames)} labelled structures; the study needs at least 20")
        return 2
    mean_atoms = sum(len(f.numbers) for f in frames) / len(frames)
    ref_sched, short_scheds = schedules(args.quick)
    if args.reference_epochs:
        ref_sched["epochs"] = args.reference_epochs
    for spec in args.extra:
        try:
            e, lr, b, *pat = spec.split(":")
            p = int(pat[0]) if pat else 80
            short_scheds.append(dict(name=f"e{int(e)}_lr{float(lr):g}_b{int(b)}" + ("" if p == 80 else f"_p{p}"),
                                     epochs=int(e), lr=float(lr), batch_size=int(b), patience=p or None))
        except ValueError:
            print(f"error: --extra {spec!r} is not EPOCHS:LR:BATCH[:PATIENCE] (e.g. 800:5e-3:16, or 800:5e-3:16:0 "
                  f"for no early stopping)")
            return 2
    if args.only:
        short_scheds = [s for s in short_scheds if s["name"] in args.only]
    done = json.loads(Path(args.resume).read_text()) if args.resume else None
    print(f"{len(frames)} structures ({mean_atoms:.1f} atoms on average) from {args.db}; reference "
          f"{ref_sched['epochs']} epochs and {len(short_scheds)} short schedules, 1 member, 1 thread", flush=True)
    every = args.monitor_every or max(1, ref_sched["epochs"] // 25)
    if done and done["reference_schedule"]["epochs"] != ref_sched["epochs"]:
        old = dict(done["reference_schedule"])
        old.pop("curve", None)
        old["name"] = f"e{old['epochs']}_lr{old['lr']:g}_b{old['batch_size']}_p0"
        short = list(done["schedules"]) + [old]
        print(f"{len(short)} schedules taken from {args.resume} (its reference among them); new reference:",
              flush=True)
        ref = run_schedule(frames, ref_sched, args.seed, monitor_every=every)
    elif done:
        ref, short = done["reference_schedule"], list(done["schedules"])
        print(f"reference and {len(short)} schedules taken from {args.resume}", flush=True)
    else:
        ref, short = run_schedule(frames, ref_sched, args.seed, monitor_every=every), []
    for sched in short_scheds:
        if any(s["name"] == sched["name"] for s in short):
            continue
        print(f"--- {sched['name']}", flush=True)
        short.append(run_schedule(frames, sched, args.seed))
        result = summarize(ref, short, args.tolerance, len(frames), mean_atoms)
        if args.json:
            write_json(args.json, result)
    result = summarize(ref, short, args.tolerance, len(frames), mean_atoms)
    print()
    print(table(result))
    c = result["chosen_schedule"]
    print(f"\nreference: {ref['epochs']} epochs, {ref['s_per_epoch']:.3f} s/epoch on {ref['n_train']} + "
          f"{ref['n_validation']} structures; paper schedule ({PAPER_EPOCHS} epochs, {PAPER_STRUCTURES} structures) "
          f"~{result['paper_schedule_hours_estimate']:.0f} h per model on one core (scaled by structures), "
          f"~{result['paper_schedule_hours_estimate_atom_scaled']:.0f} h scaled by atoms")
    if result["reference_epochs_to_target"]:
        r = result["reference_epochs_to_target"]
        print(f"the reference itself first scored within {args.tolerance:.0%} at epoch {r['epoch']} ({r['train_s']:.0f} s)")
    if c:
        print(f"chosen: {c['name']} ({'within' if result['chosen_qualifies'] else 'NOT within'} {args.tolerance:.0%} "
              f"of the reference), {result['chosen_time_fraction_of_reference']:.3f} of the reference's training "
              f"time, {result['chosen_time_fraction_of_paper_estimate']:.2e} of the paper-schedule estimate")
    if args.json:
        write_json(args.json, result)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
