"""The paper's level: the active-learning loop against PySCF PBE0/def2-SVP on P1, O1 and P2, within a label
budget, and what a committee pretrained on cheap xTB labels saves (transfer learning).

The same loop as ``bench/label_efficiency.py`` (``al_manager.learning.loop``: normal-mode + FPS initial data,
parallel i-PI sampling, warm-started retraining, a dipole committee) with the ``pyscf`` backend
(PBE0/def2-SVP, RI-JK with def2-universal-jkfit by default, ``grid_response`` forces) and
``[stopping] max_labels`` as the PBE0 label budget (default 300). The reference frequencies are PySCF's
(``WORKDIR/reference/harmonic.json``: relaxation, then finite differences of analytic gradients).

    OMP_NUM_THREADS=1 .venv/bin/python bench/pbe0_efficiency.py [--pretrained DIR] [--transfer] [--json out.json]

Resumable: the work directory under ``bench/results/`` is the state. A killed run, or one stopped at the end
of a session, continues where it was when the same command is given again (labels are never computed twice,
the reference Hessian's displaced calculations are cached, each transfer-study committee is kept); the wall
time adds up over invocations (``WORKDIR/bench_wall.json``). ``--fresh`` starts over.

``--pretrained DIR``: iteration 0 fine-tunes this committee (``[train] pretrained``; e.g. the ``final_models``
of ``bench/label_efficiency.py``, trained on GFN2-xTB labels) instead of training from scratch; the
committee's sizes and model are used. Its own work directory (``pbe0_efficiency_pretrained``).

``--transfer`` (needs ``--pretrained``): on the labels of this run, for a few label counts n (``--transfer-n``,
default 25 50 100 200), train from scratch on the first n PBE0 labels and fine-tune the pretrained committee on
the same n, and measure both against the PBE0 frequencies. "The first n" are the run's labels in the order
they were acquired (the initial normal-mode data, in FPS order, then each iteration's), taken in turn from each
cluster so that every cluster has its share. Both arms use the pretrained committee's architecture and the
loop's schedule and train energy members only (frequencies need no dipole model). The key
``pbe0_labels_ratio_transfer_vs_scratch`` is the n at which fine-tuning reaches 2.0 cm^-1 over the n at which
training from scratch does, each interpolated linearly between the two label counts that bracket 2.0; NaN,
with the reason in ``..._reason``, when a curve never gets there.

Keys (``--json``): ``pbe0_labels``, ``final_harmonic_mae_cm-1``, ``final_harmonic_rmse_cm-1``, ``final_models``,
``wall_hours``, ``pbe0_vs_orca_P2_frequency_mae_cm-1`` (the loop's PySCF P2 reference frequencies against the
paper's ORCA 5 run in ``../shared/data/orca_P2/``, vibrational modes only, sorted), and with ``--transfer``
``pbe0_labels_ratio_transfer_vs_scratch``, ``transfer_labels``, ``transfer_scratch_harmonic_mae_cm-1``,
``transfer_finetune_harmonic_mae_cm-1``, and ``pbe0_labels_ratio_transfer_vs_scratch_at_scratch_best``: the same
ratio at the best MAE that training from scratch reaches (``transfer_scratch_best_cm-1``, with
``transfer_n_scratch_best`` labels), for when it never gets to 2.0 within the run's labels; plus the learning curve (``labels``, ``harmonic_mae_cm-1``, ...).

``--smoke``: the plumbing only, ~6.5 min here: P1, no reference relaxation (the structure file's geometry), 2
labels per step (the minimum + 1 normal-mode structure; 2 temperatures x 1 frame), 1 iteration, tiny training;
its ``--transfer`` uses n = 2, 4.

Cost of the full setting on this 2-core machine, from measured PBE0 (RI-JK) times per label on one core (busy
machine): P1 10 s, O1 16 s, P2 38 s. The reference relaxations and finite-difference Hessians (12N + 1 gradients
each on the yardstick's 4-point stencil, al_manager.learning.measure.STENCIL; one core, in the manager) ~2.4 h,
P2 most of it (a work directory whose reference was computed on the older 2-point stencil recomputes it on
resume, and re-measures its committees against it); 300 labels on 2 workers ~1 h; 9 trainings of 3 + 1
members (500 epochs) ~1 h; the final polish on every label (800 epochs, as in label_efficiency) ~0.2 h;
sampling and measuring ~0.5 h: about 5 h, over several sessions if need be.
``--transfer`` adds 8 trainings of energy members, ~0.5 h.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
DATA = SHARED / "structures"
ORCA_P2 = SHARED / "orca_P2" / "orca.out"
sys.path.insert(0, str(REPO))

CLUSTERS = {"P1": "pyroxene_N01_GM.xyz", "O1": "olivine_N01_GM.xyz", "P2": "pyroxene_N02_GM.xyz"}
TARGET_CM = 2.0          # the target: harmonic MAE <= 2.0 cm^-1 against PBE0
TRANSFER_N = (25, 50, 100, 200)


sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common, also when imported by a test
from _common import accumulated_wall, learning_curve, per_structure_mae  # noqa: E402


def settings(workdir: Path, *, smoke: bool, budget: int, n_select: int, density_fit: str,
             pretrained: Path | None = None, iterations: int | None = None) -> dict:
    """The TOML-equivalent configuration (validated by al_manager.learning.config like any user file)."""
    clusters = {"P1": CLUSTERS["P1"]} if smoke else CLUSTERS
    cfg = {
        "workdir": str(workdir), "seed": 1,
        "structures": {name: str((DATA / f).resolve()) for name, f in clusters.items()},
        # one thread per PySCF process, two labelling processes: the 2 cores
        "reference": {"backend": "pyscf", "workers": 2,
                      "options": {"threads": 1, "density_fit": density_fit}},
    }
    train = {"committee": 3, "dipole_members": 1}
    if smoke:
        train.update(committee=2, dipole_members=1, epochs=5, patience=5,
                     model={"hidden": [16, 16], "dipole_features": 16, "dipole_interactions": 1,
                            "dipole_gaussians": 8})
        cfg.update(temperatures=[400.0, 800.0],
                   initial_data={"relax": False, "n_select": 1, "n_random": 4},
                   sampling={"energy_threshold": 0.0001, "max_md_ps": 0.05, "parallel_runs": 2, "mpi_ranks": 1,
                             "frames_per_run": 1},
                   stopping={"patience": 1, "max_iterations": 1, "max_labels": budget})
    else:
        train.update(epochs=500, patience=200)
        cfg.update(temperatures=[100.0, 400.0, 800.0, 1200.0],
                   # the full setting of label_efficiency: dense normal modes, then runs that travel before
                   # they flag (adaptive threshold), 2 frames per run, within the PBE0 label budget
                   initial_data={"n_select": n_select, "n_random": 2 * n_select},
                   sampling={"energy_threshold": 0.002, "max_md_ps": 2.0, "parallel_runs": 2, "mpi_ranks": 1,
                             "frames_per_run": 2, "adaptive_factor": 3.0},
                   # and the same final step: a polish of the last committee on every label
                   stopping={"patience": 3, "max_iterations": 12, "max_labels": budget,
                             "final_epochs": 800, "final_from": "last", "final_lr": 5e-4, "final_hold_out": False})
    if iterations is not None:
        cfg["stopping"]["max_iterations"] = iterations
    if pretrained is not None:
        # the fine-tune keeps the pretrained committee's members and model
        from driver.models.committee import load_committee

        c = load_committee(pretrained)
        train = {k: v for k, v in train.items() if k != "model"}
        train.update(committee=c.n_energy_members, dipole_members=c.n_dipole_members, pretrained=str(pretrained))
    cfg["train"] = train
    return cfg


# ---------------------------------------------------------------------- the ORCA cross-check
def orca_p2_check(workdir: Path) -> dict:
    """The loop's PySCF P2 reference frequencies against the paper's ORCA ones (vibrational, sorted)."""
    from al_manager.reference.orca import read_orca_frequencies
    from spectra.harmonic import vibrational

    nan = float("nan")
    cache = workdir / "reference" / "harmonic.json"
    entry = json.loads(cache.read_text()).get("P2") if cache.is_file() else None
    if entry is None:
        return {"pbe0_vs_orca_P2_frequency_mae_cm-1": nan,
                "pbe0_vs_orca_P2_reason": "P2 is not (yet) among this run's reference structures"}
    if not ORCA_P2.is_file():
        return {"pbe0_vs_orca_P2_frequency_mae_cm-1": nan, "pbe0_vs_orca_P2_reason": f"{ORCA_P2} not available"}
    ours = vibrational(entry["frequencies_cm-1"])
    theirs = vibrational(read_orca_frequencies(ORCA_P2)[0])
    if len(ours) != len(theirs):
        return {"pbe0_vs_orca_P2_frequency_mae_cm-1": nan,
                "pbe0_vs_orca_P2_reason": f"{len(ours)} PySCF modes against {len(theirs)} ORCA modes"}
    d = ours - theirs
    return {"pbe0_vs_orca_P2_frequency_mae_cm-1": float(abs(d).mean()),
            "pbe0_vs_orca_P2_frequency_max_abs_cm-1": float(abs(d).max()),
            "pbe0_vs_orca_P2_frequency_mean_signed_cm-1": float(d.mean()),
            "pbe0_vs_orca_P2_method": entry["method"]}


# ---------------------------------------------------------------------- the transfer study
def first_labels(frames, n: int):
    """The first ``n`` labels in acquisition order (database rows), taken in turn from each cluster."""
    queues: dict[str, list] = {}
    for f in frames:
        queues.setdefault(f.cluster, []).append(f)
    out, k = [], 0
    while len(out) < n and any(k < len(q) for q in queues.values()):
        out += [q[k] for q in queues.values() if k < len(q)]
        k += 1
    return out[:n]


def labels_to_reach(ns, maes, target: float = TARGET_CM) -> tuple[float, str]:
    """The label count at which a curve (n ascending) first reaches ``target``, linearly interpolated between
    the bracketing points; NaN and the reason when it never does."""
    for i, (n, m) in enumerate(zip(ns, maes)):
        if m <= target:  # NaN (a failed committee relaxation) never counts
            if i == 0:
                return float(n), f"already {m:.2f} cm^-1 at the smallest n={n}: an upper bound"
            n0, m0 = ns[i - 1], maes[i - 1]
            if not math.isfinite(m0):
                return float(n), f"reached at n={n} (no finite point before it)"
            return n0 + (m0 - target) / (m0 - m) * (n - n0), f"interpolated between n={n0} and n={n}"
    finite = [(m, n) for n, m in zip(ns, maes) if math.isfinite(m)]
    best = f"best {min(finite)[0]:.2f} cm^-1 at n={min(finite)[1]}" if finite else "no finite MAE"
    return float("nan"), f"never reaches {target:g} cm^-1 up to n={max(ns)} ({best})"


def common_level(ns, scratch, tuned) -> tuple[float, float, float, float]:
    """The same ratio at an accuracy both arms reach, for when training from scratch never gets to the
    target within the run's labels: the scratch curve's best MAE, the n where it got there, the n at which
    fine-tuning first reaches it (interpolated as in :func:`labels_to_reach`), and their ratio (NaN when
    there is no finite scratch point)."""
    finite = [(m, n) for n, m in zip(ns, scratch) if math.isfinite(m)]
    if not finite:
        return (float("nan"),) * 4
    level, n_level = min(finite)
    n_tuned, _ = labels_to_reach(ns, tuned, level)
    return float(level), float(n_level), n_tuned, n_tuned / n_level


def transfer_study(workdir: Path, cfg, pretrained: Path, counts, epochs: int | None) -> dict:
    """Scratch vs fine-tune on the first n labels, for each n; committees and results cached in WORKDIR/transfer."""
    import dataclasses

    from al_manager.learning.measure import harmonic_errors, reference_harmonics
    from driver.data import read_frames
    from driver.models.committee import load_committee
    from driver.training import train_committee
    from spectra.atomic import write_json

    folder = workdir / "transfer"
    folder.mkdir(parents=True, exist_ok=True)
    cache_file = folder / "results.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    refs = reference_harmonics(cfg.structure_files, cfg.reference.backend, workdir / "reference",
                               cfg.reference.options, relax=cfg.initial_data.relax, log=lambda m: None)
    frames = read_frames(workdir / "data.db")
    ns = sorted({min(int(n), len(frames)) for n in counts if int(n) >= 2})
    model = dataclasses.asdict(load_committee(pretrained).config)
    base = dataclasses.replace(cfg.train, warm_start=None, pretrained=None, dipole_members=0, model=model,
                               epochs=epochs or cfg.train.epochs)
    arms = {"scratch": base, "finetune": dataclasses.replace(base, pretrained=str(pretrained))}
    curves: dict[str, list[float]] = {arm: [] for arm in arms}
    for n in ns:
        subset = first_labels(frames, n)
        for arm, tc in arms.items():
            key = f"{arm}:{n}"
            out = folder / f"{arm}_{n:04d}"
            if key not in cache:
                t0 = time.time()
                if not (out / "committee.json").is_file():
                    train_committee(subset, out, tc)
                errors = harmonic_errors(out, refs)
                cache[key] = {"n": n, "mae_cm-1": errors["mae_cm-1"], "rmse_cm-1": errors["rmse_cm-1"],
                              "per_structure_mae_cm-1": {s: e["mae_cm-1"] for s, e in errors["structures"].items()},
                              "clusters": {c: sum(f.cluster == c for f in subset) for c in cfg.structure_files},
                              "seconds": round(time.time() - t0, 1)}
                write_json(cache_file, cache)
            curves[arm].append(float(cache[key]["mae_cm-1"]))
            print(f"transfer: {arm:>8} n={n:>4}: harmonic MAE {cache[key]['mae_cm-1']:.2f} cm^-1", flush=True)
    n_scratch, why_scratch = labels_to_reach(ns, curves["scratch"])
    n_tuned, why_tuned = labels_to_reach(ns, curves["finetune"])
    ratio, reason = n_tuned / n_scratch, f"fine-tune: {why_tuned}; scratch: {why_scratch}"
    if math.isnan(n_scratch) or math.isnan(n_tuned):
        ratio = float("nan")
        if math.isnan(n_scratch) and not math.isnan(n_tuned):
            reason += f"; the ratio is below {n_tuned / max(ns):.2f}"
    level, n_level, n_level_tuned, level_ratio = common_level(ns, curves["scratch"], curves["finetune"])
    return {"transfer_labels": ns, "transfer_scratch_harmonic_mae_cm-1": curves["scratch"],
            "transfer_finetune_harmonic_mae_cm-1": curves["finetune"],
            "transfer_n_to_target_scratch": n_scratch, "transfer_n_to_target_finetune": n_tuned,
            "transfer_target_cm-1": TARGET_CM, "transfer_epochs": base.epochs,
            "pbe0_labels_ratio_transfer_vs_scratch": ratio, "pbe0_labels_ratio_transfer_vs_scratch_reason": reason,
            "pbe0_labels_ratio_transfer_vs_scratch_at_scratch_best": level_ratio,
            "transfer_scratch_best_cm-1": level, "transfer_n_scratch_best": n_level,
            "transfer_n_finetune_to_scratch_best": n_level_tuned,
            "transfer_pretrained": str(pretrained), "transfer_details": cache}


# ---------------------------------------------------------------------- bookkeeping
def _same_run(workdir: Path, identity: dict) -> None:
    """A work directory belongs to one setting (mode, pretrained committee): a rerun with another is refused."""
    from spectra.atomic import write_json

    path = workdir / "bench_settings.json"
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            diff = ", ".join(f"{k}: {recorded.get(k)!r} -> {v!r}" for k, v in identity.items() if recorded.get(k) != v)
            raise SystemExit(f"pbe0_efficiency: {workdir} was started with other settings ({diff}); use --workdir "
                             f"for a new run or --fresh to start over")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        write_json(path, identity)


def _f(value, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the keys (see the module docstring)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="work directory (default bench/results/pbe0_efficiency[_pretrained][_smoke])")
    p.add_argument("--fresh", action="store_true", help="delete the work directory first")
    p.add_argument("--pretrained", type=Path, default=None, metavar="DIR",
                   help="fine-tune this committee (e.g. xTB-trained final_models of label_efficiency) at iteration 0")
    p.add_argument("--transfer", action="store_true",
                   help="also the transfer study: scratch vs fine-tuning --pretrained on the first n PBE0 labels")
    p.add_argument("--transfer-n", type=int, nargs="+", default=None, metavar="N",
                   help=f"label counts of the transfer study (default {' '.join(map(str, TRANSFER_N))}; smoke 2 4)")
    p.add_argument("--transfer-epochs", type=int, default=None, help="epochs of each transfer training (default: the loop's)")
    p.add_argument("--budget", type=int, default=None, help="PBE0 label budget, [stopping] max_labels (default 300; smoke 4)")
    p.add_argument("--initial", type=int, default=40, metavar="N",
                   help="normal-mode structures per cluster in the initial data, [initial_data] n_select (default 40)")
    p.add_argument("--iterations", type=int, default=None, metavar="N",
                   help="maximum iterations (default 12; smoke 1); raising it continues a finished run")
    p.add_argument("--density-fit", choices=("rijk", "rij"), default="rijk",
                   help="PySCF density fitting: rijk (Coulomb and exchange fitted, def2-universal-jkfit; ~1.6x "
                        "faster) or rij (fitted Coulomb, exact exchange). Default rijk")
    p.add_argument("--smoke", action="store_true", help="plumbing check: P1, 2 labels per step, 1 iteration, tiny training")
    args = p.parse_args(argv)

    if args.transfer and args.pretrained is None:
        p.error("--transfer needs --pretrained DIR (the committee to fine-tune)")
    clusters = ["P1"] if args.smoke else list(CLUSTERS)
    missing = [CLUSTERS[c] for c in clusters if not (DATA / CLUSTERS[c]).is_file()]
    if missing:
        print(f"pbe0_efficiency: reference structures not available ({DATA}/{missing[0]}): skipped", file=sys.stderr)
        return 2
    try:
        import pyscf  # noqa: F401
    except ImportError:
        print("pbe0_efficiency: PySCF is not installed (pip install pyscf): skipped", file=sys.stderr)
        return 2
    pretrained = args.pretrained.resolve() if args.pretrained else None
    name = "pbe0_efficiency" + ("_pretrained" if pretrained else "") + ("_smoke" if args.smoke else "")
    workdir = (args.workdir or REPO / "bench" / "results" / name).resolve()
    if args.fresh and workdir.exists():
        shutil.rmtree(workdir)
    budget = args.budget or (4 if args.smoke else 300)
    _same_run(workdir, {"smoke": args.smoke, "pretrained": str(pretrained) if pretrained else None,
                        "density_fit": args.density_fit})

    from al_manager.learning.config import parse_config
    from al_manager.learning.loop import run_loop

    raw = settings(workdir, smoke=args.smoke, budget=budget, n_select=args.initial, density_fit=args.density_fit,
                   pretrained=pretrained, iterations=args.iterations)
    cfg = parse_config(raw, base_dir=REPO)
    t0 = time.time()
    try:
        rc = run_loop(cfg)
        if rc != 0:
            print(f"pbe0_efficiency: the active-learning loop stopped with status {rc}; rerun to resume",
                  file=sys.stderr)
            return rc
        rows, labels, mae, rmse, state = learning_curve(workdir)
        final_models = (workdir / rows[-1]["model"]).resolve()
        orca = orca_p2_check(workdir)
        transfer = (transfer_study(workdir, cfg, pretrained, args.transfer_n or ((2, 4) if args.smoke else TRANSFER_N),
                                   args.transfer_epochs) if args.transfer else {})
    finally:
        wall_hours = accumulated_wall(workdir, time.time() - t0) / 3600.0

    start = f"fine-tuned from {pretrained}" if pretrained else "from scratch"
    print(f"\nPBE0/def2-SVP (PySCF, {args.density_fit}) active learning on {', '.join(cfg.structure_files)}, "
          f"iteration 0 {start}{' (smoke)' if args.smoke else ''}; {time.time() - t0:.0f} s this invocation, "
          f"{wall_hours:.2f} h in all")
    print(f"{'iter':>4} {'labels':>7} {'new':>4} {'MAE cm-1':>9} {'RMSE cm-1':>10} {'val E meV/at':>13} "
          f"{'val F eV/A':>11} {'val mu D':>9}")
    for r, lab, m, s in zip(rows, labels, mae, rmse):
        print(f"{r['iteration']:>4} {lab:>7} {r['new_labels'] or '-':>4} {m:>9.2f} {s:>10.2f} "
              f"{_f(r['val_energy_mae_meV_per_atom'], 2):>13} {_f(r['val_force_mae_eV_per_A']):>11} "
              f"{_f(r['val_dipole_mae_D']):>9}")
    per_final = per_structure_mae(state, rows[-1]["iteration"])
    print("per structure, final MAE cm-1: " + ", ".join(f"{n} {v:.2f}" for n, v in per_final.items()))
    print(f"target: MAE <= {TARGET_CM:g} cm^-1 with <= 300 PBE0 labels: {mae[-1]:.2f} cm^-1 with {labels[-1]} labels "
          f"({'met' if mae[-1] <= TARGET_CM and labels[-1] <= 300 else 'not met'}); stopped: {state.get('stop_reason')}")
    v = orca["pbe0_vs_orca_P2_frequency_mae_cm-1"]
    print("P2 reference frequencies, PySCF vs the paper's ORCA: " + (
        f"MAE {v:.2f} cm^-1 (max {orca['pbe0_vs_orca_P2_frequency_max_abs_cm-1']:.2f}, mean signed "
        f"{orca['pbe0_vs_orca_P2_frequency_mean_signed_cm-1']:+.2f})" if math.isfinite(v)
        else f"n/a ({orca['pbe0_vs_orca_P2_reason']})"))
    if transfer:
        print(f"\ntransfer from {pretrained} ({transfer['transfer_epochs']} epochs each, energy members only)")
        print(f"{'n':>6} {'scratch MAE':>12} {'fine-tune MAE':>14}")
        for n, a, b in zip(transfer["transfer_labels"], transfer["transfer_scratch_harmonic_mae_cm-1"],
                           transfer["transfer_finetune_harmonic_mae_cm-1"]):
            print(f"{n:>6} {a:>12.2f} {b:>14.2f}")
        ratio = transfer["pbe0_labels_ratio_transfer_vs_scratch"]
        print(f"labels to reach {TARGET_CM:g} cm^-1: fine-tune {_f(transfer['transfer_n_to_target_finetune'], 1)}, "
              f"scratch {_f(transfer['transfer_n_to_target_scratch'], 1)}; ratio "
              f"{_f(ratio, 3) if math.isfinite(ratio) else 'NaN'} (target <= 0.5): "
              f"{transfer['pbe0_labels_ratio_transfer_vs_scratch_reason']}")
        level = transfer["transfer_scratch_best_cm-1"]
        if math.isfinite(level):
            upper = transfer["transfer_n_finetune_to_scratch_best"] == min(transfer["transfer_labels"])
            print(f"at the best level scratch reaches ({level:.2f} cm^-1 with n={transfer['transfer_n_scratch_best']:g}): "
                  f"fine-tune needs n={transfer['transfer_n_finetune_to_scratch_best']:.1f}, ratio "
                  f"{'<= ' if upper else ''}{transfer['pbe0_labels_ratio_transfer_vs_scratch_at_scratch_best']:.3f}")
    print(f"report: {workdir / 'report.csv'}; learning curve: {workdir / 'learning_curve.png'}; models: {final_models}")

    if args.json:
        out = {"pbe0_labels": labels[-1], "final_harmonic_mae_cm-1": mae[-1], "final_harmonic_rmse_cm-1": rmse[-1],
               "final_models": str(final_models), "wall_hours": wall_hours, **orca,
               "labels": labels, "harmonic_mae_cm-1": mae, "harmonic_rmse_cm-1": rmse,
               "per_structure_final_mae_cm-1": per_final, "label_budget": budget,
               "reference": cfg.backend().method + f" ({args.density_fit})", "pretrained": str(pretrained) if pretrained else None,
               "mode": "smoke" if args.smoke else "full", "structures": list(cfg.structure_files),
               "stop_reason": state.get("stop_reason"), "workdir": str(workdir), **transfer}
        from spectra.atomic import write_json

        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
