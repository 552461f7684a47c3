"""The active-learning report a user opens: ``report.csv`` (one row per iteration, iteration 0 being the
initial committee trained on normal-mode data, and a last row ``final`` for the long final training of
``[stopping] final_epochs``) and ``learning_curve.png`` (like the paper's Fig. 3 a:
harmonic-frequency MAE and RMSE against the iteration and against the number of labels, with the
validation errors of energy and forces).

Both are rebuilt from the rows kept in the state file, and written atomically: a killed manager never
leaves a half-written report, and a resumed one never duplicates a row.
"""
from __future__ import annotations

import csv
import io
import math
import os

COLUMNS = ("iteration", "labels", "new_labels", "failed_labels", "flagged_frames", "runs", "runs_done",
           "runs_crashed", "runs_exploded", "md_ps", "harmonic_mae_cm-1", "harmonic_rmse_cm-1",
           "val_energy_mae_meV_per_atom", "val_force_mae_eV_per_A", "val_dipole_mae_D", "model", "seconds")


def write_report_csv(path: str | os.PathLike, rows: list[dict]) -> None:
    from spectra.atomic import write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=_order):
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    write_text(path, buffer.getvalue())


def _order(row: dict) -> float:
    """Iterations in order, the row ``final`` (the long final training, after the last iteration) last."""
    return math.inf if str(row["iteration"]) == "final" else int(row["iteration"])


def read_report_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return value


def plot_learning_curve(path: str | os.PathLike, rows: list[dict], title: str = "") -> None:
    """Harmonic-frequency MAE/RMSE vs iteration and vs labels; validation errors vs iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    final = [r for r in rows if str(r["iteration"]) == "final"]
    rows = sorted((r for r in rows if str(r["iteration"]) != "final"), key=_order)
    it = [int(r["iteration"]) for r in rows]
    labels = [int(r.get("labels") or 0) for r in rows]
    mae = [_num(r.get("harmonic_mae_cm-1")) for r in rows]
    rmse = [_num(r.get("harmonic_rmse_cm-1")) for r in rows]
    e_val = [_num(r.get("val_energy_mae_meV_per_atom")) for r in rows]
    f_val = [_num(r.get("val_force_mae_eV_per_A")) for r in rows]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(it, mae, "o-", label="MAE")
    ax.plot(it, rmse, "s--", label="RMSE")
    ax.set_xlabel("iteration")
    ax.set_ylabel("harmonic frequency error (cm$^{-1}$)")
    ax.set_title("(a) harmonic frequencies vs iteration")
    ax.legend()
    ax = axes[1]
    ax.plot(labels, mae, "o-", label="MAE")
    ax.plot(labels, rmse, "s--", label="RMSE")
    if final:  # the long from-scratch training on every label, drawn after the last iteration
        f = final[0]
        x = (max(it) if it else 0) + 1
        axes[0].plot([x], [_num(f.get("harmonic_mae_cm-1"))], "*", ms=12, color="tab:red", label="final MAE")
        axes[0].plot([x], [_num(f.get("harmonic_rmse_cm-1"))], "*", ms=12, color="tab:purple", label="final RMSE")
        axes[0].legend()
        ax.plot([int(f.get("labels") or 0)], [_num(f.get("harmonic_mae_cm-1"))], "*", ms=12, color="tab:red",
                label="final (long training)")
    ax.set_xlabel("labelled structures")
    ax.set_ylabel("harmonic frequency error (cm$^{-1}$)")
    ax.set_title("(b) vs number of labels")
    ax.legend()
    ax = axes[2]
    ax.plot(it, e_val, "o-", color="tab:green", label="energy (meV/atom)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation energy MAE (meV/atom)", color="tab:green")
    twin = ax.twinx()
    twin.plot(it, f_val, "s--", color="tab:red", label="forces (eV/Å)")
    twin.set_ylabel("validation force MAE (eV/Å)", color="tab:red")
    ax.set_title("(c) validation errors")
    for a in axes:
        a.grid(alpha=0.3)
    if it and max(it) < 12:
        for a in (axes[0], axes[2]):
            a.set_xticks(it)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from spectra.atomic import write_with

    try:
        write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    finally:
        plt.close(fig)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")
