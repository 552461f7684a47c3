"""Training a committee: the loop is separate from the models.

Energy members minimise the paper's loss (Eq. 3), per batch of structures::

    L = mean_n [ lambda_E (E_n - E_n^ref)^2 + lambda_F / (3 N_n) sum_i |F_ni - F_ni^ref|^2 ]

with lambda_E = 1 and lambda_F = 10 Å^2; dipole members minimise (1/3)|mu - mu^ref|^2 (Eq. 5). Adam, with a
learning rate decaying linearly to zero over ``epochs``, early stopping on the validation loss (the best
weights are kept) and optional warm start from an earlier committee. Every member has its own seed and its
own random subsample (or bootstrap) of the training split; members train in parallel processes, with torch
threads set so that processes x threads never exceeds the cores.

After training, calibration scales alpha_E and alpha_F are fitted on the validation split so that the
committee's standard deviations match its actual errors: alpha = sqrt(mean(err^2 / sigma^2)).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT_SEED, Frame, read_frames, split_train_validation
from .models.committee import (Committee, ModelConfig, _dipole_model, _energy_model, load_committee,
                               save_committee)
from .models.geometry import Batch, make_batch


@dataclass
class TrainConfig:
    committee: int = 3                 # K energy/force members (2-8; 1 allowed for tests)
    dipole_members: int = 1            # J dipole members (0: no dipole model)
    # Schedule (bench/training_schedule.py, 136 xTB structures, 1 member, 1 core): the paper's 12,000 epochs
    # (85 min here) return their best-validation weights at epoch ~4400; 2000 epochs reach the same force MAE
    # within 6% and a lower energy MAE in 0.17 of that time, so use ~2000 for a final model. 400 epochs (the
    # default, for active-learning retrains that warm-start from the previous iteration) reach ~1.5x the force
    # MAE in 0.03 of it. A patience shorter than ~200 epochs stops on the validation spikes of the
    # high-learning-rate phase.
    epochs: int = 400                  # upper bound; the learning rate decays to zero at the last epoch
    patience: int = 200                # early stopping: epochs without validation improvement
    batch_size: int = 8                # structures per step
    lr: float = 2e-3                   # energy/force members, Adam
    lr_dipole: float = 1e-3
    lambda_energy: float = 1.0
    lambda_forces: float = 10.0        # Å^2
    subsample: float = 0.9             # fraction of the training split each member sees (without replacement)
    bootstrap: bool = False            # sample with replacement instead
    seed: int = DEFAULT_SEED           # split seed; member k uses seed + 1 + k
    workers: int | None = None         # parallel processes (default: min(members, cores))
    warm_start: str | None = None      # an earlier committee folder: members start from its weights
    max_minutes: float | None = None   # wall-clock limit per member
    log_every: int = 20                # epochs between progress lines
    model: dict = field(default_factory=dict)  # ModelConfig fields (sizes, species, cutoffs)

    def __post_init__(self):
        if not 1 <= self.committee <= 8:
            raise ValueError(f"committee size must be 1-8, got {self.committee}")
        if self.dipole_members < 0:
            raise ValueError("dipole_members must be >= 0")


# ------------------------------------------------------------------ data as tensors
def _species_index(frames: list[Frame], species) -> list[np.ndarray]:
    from ase.data import atomic_numbers

    lookup = {atomic_numbers[s]: k for k, s in enumerate(species)}
    out = []
    for f in frames:
        try:
            out.append(np.array([lookup[int(z)] for z in f.numbers]))
        except KeyError as exc:
            from ase.data import chemical_symbols
            raise ValueError(f"element {chemical_symbols[exc.args[0]]} in frame {f.hash or '?'} "
                             f"({f.cluster or 'unnamed'}) is not in the model species {', '.join(species)}")
    return out


def fit_energy_shift(frames: list[Frame], n_species: int, index: list[np.ndarray], ridge: float = 1e-6) -> np.ndarray:
    """Per-species atomic energies (eV) from a ridge regression of the energies on composition."""
    counts = np.array([np.bincount(ix, minlength=n_species) for ix in index], dtype=float)
    energies = np.array([f.energy for f in frames])
    a = counts.T @ counts + ridge * np.eye(n_species) * max(1.0, np.trace(counts.T @ counts) / n_species)
    return np.linalg.solve(a, counts.T @ energies)


def _batches(items: list[int], sizes: list[int], batch_size: int, rng: np.random.Generator | None):
    """Indices grouped by atom count (no padding waste), shuffled when an rng is given."""
    groups: dict[int, list[int]] = {}
    for i in items:
        groups.setdefault(sizes[i], []).append(i)
    chunks = []
    for members in groups.values():
        members = list(rng.permutation(members)) if rng is not None else members
        chunks += [members[s: s + batch_size] for s in range(0, len(members), batch_size)]
    if rng is not None:
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return chunks


@dataclass
class _Tensors:
    index: list[np.ndarray]
    positions: list[np.ndarray]
    energy: np.ndarray        # shift removed, eV
    forces: list[np.ndarray]
    dipole: list[np.ndarray | None]

    def batch(self, ids, dtype=torch.float32):
        b = make_batch([self.index[i] for i in ids], [self.positions[i] for i in ids], dtype=dtype)
        n = b.species.shape[1]
        forces = torch.zeros(len(ids), n, 3, dtype=dtype)
        for k, i in enumerate(ids):
            forces[k, : len(self.index[i])] = torch.as_tensor(self.forces[i], dtype=dtype)
        energy = torch.as_tensor(self.energy[ids], dtype=dtype)
        dip = [self.dipole[i] for i in ids]
        dipole = torch.as_tensor(np.array(dip), dtype=dtype) if all(d is not None for d in dip) else None
        return b, energy, forces, dipole


def _tensors(frames, species, shift) -> _Tensors:
    index = _species_index(frames, species)
    energy = np.array([f.energy - shift[ix].sum() for f, ix in zip(frames, index)])
    return _Tensors(index, [f.positions for f in frames], energy, [f.forces for f in frames],
                    [f.dipole for f in frames])


# ------------------------------------------------------------------ one member
def _energy_loss(model, data: _Tensors, ids, cfg: TrainConfig, create_graph: bool):
    b, e_ref, f_ref, _ = data.batch(ids)
    pos = b.positions.requires_grad_(True)
    e = model(b)[0]
    (g,) = torch.autograd.grad(e.sum(), pos, create_graph=create_graph)
    n = b.mask.sum(-1)
    f_err = ((-g - f_ref) ** 2).sum((-1, -2)) / (3 * n)
    return (cfg.lambda_energy * (e - e_ref) ** 2 + cfg.lambda_forces * f_err).mean()


def _dipole_loss(model, data: _Tensors, ids, total_charge: float):
    b, _, _, mu_ref = data.batch(ids)
    mu = model(b, total_charge)[0]
    return ((mu - mu_ref) ** 2).mean()


def _train_member(task: dict) -> dict:
    """Train one member (runs in its own process)."""
    torch.set_num_threads(task["threads"])
    cfg: TrainConfig = task["cfg"]
    mcfg: ModelConfig = task["model_config"]
    kind, k = task["kind"], task["member"]
    torch.manual_seed(cfg.seed + 1 + k + (1000 if kind == "dipole" else 0))
    rng = np.random.default_rng(cfg.seed + 1 + k + (1000 if kind == "dipole" else 0))
    train, val = task["train"], task["val"]
    n_train = len(train.energy)
    n_pick = max(1, int(round(cfg.subsample * n_train)))
    pick = (rng.integers(0, n_train, n_train) if cfg.bootstrap
            else rng.permutation(n_train)[:n_pick]).tolist()
    sizes_t = [len(ix) for ix in train.index]
    sizes_v = [len(ix) for ix in val.index]
    if kind == "energy":
        model = _energy_model(mcfg, 1)
        lr0 = cfg.lr
        loss_fn = lambda ids, d, g: _energy_loss(model, d, ids, cfg, g)
    else:
        model = _dipole_model(mcfg, 1)
        lr0 = cfg.lr_dipole
        loss_fn = lambda ids, d, g: _dipole_loss(model, d, ids, mcfg.total_charge)
    if task.get("warm_state") is not None:
        model.load_state_dict(task["warm_state"])
    elif kind == "energy":
        model.fit_normalisation([train.batch(ids)[0] for ids in _batches(pick, sizes_t, 64, None)])
        rms_f = math.sqrt(np.mean([np.mean(f**2) for f in train.forces]))
        with torch.no_grad():
            model.atomic_scale.fill_(max(rms_f, 0.05))
    opt = torch.optim.Adam(model.parameters(), lr=lr0)
    val_batches = _batches(list(range(len(val.energy))), sizes_v, 32, None)

    def val_loss():
        if not val_batches:
            return float("nan")
        total, count = 0.0, 0
        for ids in val_batches:
            with torch.set_grad_enabled(kind == "energy"):
                total += float(loss_fn(ids, val, False).detach()) * len(ids)
            count += len(ids)
        return total / count

    best, best_state, best_epoch = math.inf, None, 0
    start = time.time()
    history = []
    parent = task.get("parent_pid")
    for epoch in range(cfg.epochs):
        if parent is not None and os.getppid() != parent:
            # The trainer that started us is gone (killed): do not live on as an orphan.
            raise SystemExit(f"[{kind} member {k}] parent process {parent} ended; stopping")
        lr = lr0 * (1.0 - epoch / cfg.epochs)
        for group in opt.param_groups:
            group["lr"] = lr
        train_total = 0.0
        for ids in _batches(pick, sizes_t, cfg.batch_size, rng):
            opt.zero_grad()
            loss = loss_fn(ids, train, True)
            loss.backward()
            opt.step()
            train_total += float(loss.detach()) * len(ids)
        v = val_loss()
        history.append((epoch, train_total / len(pick), v))
        if not (v >= best):  # also true for the first NaN-free value
            best, best_epoch = v, epoch
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        if epoch % cfg.log_every == 0 or epoch == cfg.epochs - 1:
            print(f"[{kind} member {k}] epoch {epoch:4d}/{cfg.epochs} train {train_total / len(pick):.3e} "
                  f"val {v:.3e} best {best:.3e}@{best_epoch} lr {lr:.1e}", flush=True)
        if epoch - best_epoch >= cfg.patience:
            print(f"[{kind} member {k}] early stop at epoch {epoch} (best {best:.3e} at {best_epoch})", flush=True)
            break
        if cfg.max_minutes and (time.time() - start) > 60 * cfg.max_minutes:
            print(f"[{kind} member {k}] time limit at epoch {epoch}", flush=True)
            break
    if best_state is None:
        best_state = model.state_dict()
    return {"kind": kind, "member": k, "state": best_state, "best_val": best, "best_epoch": best_epoch,
            "epochs_run": len(history), "seconds": time.time() - start}


# ------------------------------------------------------------------ the committee
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def train_committee(data, out_dir, cfg: TrainConfig | None = None) -> Committee:
    """Train K energy members (+ J dipole members) on ``data`` (a database path, a file ASE reads, or a
    list of :class:`Frame`) and write the committee to ``out_dir`` atomically. Returns the committee."""
    cfg = cfg or TrainConfig()
    frames = read_frames(data) if isinstance(data, (str, Path)) else list(data)
    if len(frames) < 2:
        raise ValueError(f"need at least 2 labelled structures to train, got {len(frames)}")
    warm = load_committee(cfg.warm_start) if cfg.warm_start else None
    mcfg = warm.config if warm is not None else ModelConfig(**cfg.model)
    train_frames, val_frames = split_train_validation(frames, cfg.seed)
    index = _species_index(train_frames, mcfg.species)
    shift = warm.energy_shift if warm is not None else fit_energy_shift(train_frames, len(mcfg.species), index)
    train, val = _tensors(train_frames, mcfg.species, shift), _tensors(val_frames, mcfg.species, shift)
    has_dipole = all(f.dipole is not None for f in frames)
    j = cfg.dipole_members if has_dipole else 0
    if cfg.dipole_members and not has_dipole:
        print("note: some structures have no dipole label: no dipole model is trained", flush=True)

    tasks = []
    for kind, n in (("energy", cfg.committee), ("dipole", j)):
        for k in range(n):
            warm_state = None
            if warm is not None:
                part = warm.subset([k] if kind == "energy" and k < warm.n_energy_members else [],
                                   [k] if kind == "dipole" and k < warm.n_dipole_members else [])
                model = part.energy_model if kind == "energy" else part.dipole_model
                warm_state = None if model is None else model.float().state_dict()
            tasks.append(dict(kind=kind, member=k, cfg=cfg, model_config=mcfg, train=train, val=val,
                              warm_state=warm_state))
    cores = _cores()
    workers = max(1, min(cfg.workers or cores, len(tasks)))
    threads = max(1, cores // workers)
    print(f"training {cfg.committee} energy/force member(s) and {j} dipole member(s) on "
          f"{len(train_frames)} structures (validation {len(val_frames)}), {workers} process(es) x "
          f"{threads} thread(s)", flush=True)
    t0 = time.time()
    results = _run_tasks(tasks, workers, threads)
    energy_states = sorted((r for r in results if r["kind"] == "energy"), key=lambda r: r["member"])
    dipole_states = sorted((r for r in results if r["kind"] == "dipole"), key=lambda r: r["member"])
    em, dm = _energy_model(mcfg, cfg.committee), _dipole_model(mcfg, j)
    em.load_state_dict(_stack([r["state"] for r in energy_states]))
    if dm is not None:
        dm.load_state_dict(_stack([r["state"] for r in dipole_states]))
    committee = Committee(mcfg, em.eval(), dm.eval() if dm is not None else None, np.asarray(shift, float))
    committee.calibration = calibrate(committee, val_frames)
    committee.metadata = {
        "n_train": len(train_frames), "n_validation": len(val_frames), "seconds": time.time() - t0,
        "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "members": [{k: r[k] for k in ("kind", "member", "best_val", "best_epoch", "epochs_run", "seconds")}
                    for r in results],
        "errors": {"train": error_table(committee, train_frames), "validation": error_table(committee, val_frames)},
    }
    committee.version = f"{Path(out_dir).name}"
    save_committee(committee, out_dir)
    print(f"committee written to {out_dir} ({time.time() - t0:.0f} s); calibration "
          f"alpha_E={committee.calibration['energy']:.2f} alpha_F={committee.calibration['forces']:.2f}", flush=True)
    return committee


def _run_tasks(tasks: list[dict], workers: int, threads: int) -> list[dict]:
    """Members train in child processes started as ``python -m driver.training TASK RESULT``: unlike a
    multiprocessing pool this never re-imports the caller's script, and task and result files hold only
    tensors and plain types (loaded with ``weights_only=True``)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nanosil-train-") as tmp:
        pending, running, results = list(enumerate(tasks)), [], []
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        try:
            while pending or running:
                while pending and len(running) < workers:
                    i, task = pending.pop(0)
                    task_file, result_file = Path(tmp) / f"task{i}.pt", Path(tmp) / f"result{i}.pt"
                    torch.save(_encode_task(task, threads), task_file)
                    proc = subprocess.Popen([sys.executable, "-m", "driver.training", str(task_file), str(result_file)],
                                            env=env)
                    running.append((proc, result_file, task))
                time.sleep(0.2)
                for item in list(running):
                    proc, result_file, task = item
                    if proc.poll() is None:
                        continue
                    running.remove(item)
                    if proc.returncode != 0 or not result_file.exists():
                        raise RuntimeError(f"training of {task['kind']} member {task['member']} failed "
                                           f"(exit code {proc.returncode}); see the messages above")
                    results.append(torch.load(result_file, weights_only=True))
        finally:
            for proc, _, _ in running:
                proc.kill()
    return results


def _encode_task(task: dict, threads: int) -> dict:
    def tensors(d: _Tensors) -> dict:
        return {"index": [torch.as_tensor(x) for x in d.index],
                "positions": [torch.as_tensor(x) for x in d.positions],
                "energy": torch.as_tensor(d.energy), "forces": [torch.as_tensor(x) for x in d.forces],
                "dipole": [None if x is None else torch.as_tensor(x) for x in d.dipole]}

    return {"kind": task["kind"], "member": task["member"], "threads": threads, "parent_pid": os.getpid(),
            "cfg": dataclasses.asdict(task["cfg"]), "model_config": dataclasses.asdict(task["model_config"]),
            "train": tensors(task["train"]), "val": tensors(task["val"]), "warm_state": task["warm_state"]}


def _decode_task(raw: dict) -> dict:
    def data(d: dict) -> _Tensors:
        return _Tensors([x.numpy() for x in d["index"]], [x.numpy() for x in d["positions"]], d["energy"].numpy(),
                        [x.numpy() for x in d["forces"]], [None if x is None else x.numpy() for x in d["dipole"]])

    return dict(raw, cfg=TrainConfig(**raw["cfg"]), model_config=ModelConfig(**raw["model_config"]),
                train=data(raw["train"]), val=data(raw["val"]))


def _worker_main(task_file: str, result_file: str) -> None:
    task = _decode_task(torch.load(task_file, weights_only=True))
    result = _train_member(task)
    tmp = result_file + ".tmp"
    torch.save(result, tmp)
    os.replace(tmp, result_file)


def _stack(states: list[dict]) -> dict:
    keys_unstacked = {"descriptor.basis.centres", "rbf.centres", "masses"}
    return {key: (states[0][key] if key in keys_unstacked else torch.cat([s[key] for s in states]))
            for key in states[0]}


# ------------------------------------------------------------------ calibration and errors
def calibrate(committee: Committee, frames: list[Frame]) -> dict:
    """alpha = sqrt(mean(err^2 / sigma^2)) for energies (per structure) and force components."""
    if committee.n_energy_members < 2 or not frames:
        return {"energy": 1.0, "forces": 1.0}
    committee.calibration = {"energy": 1.0, "forces": 1.0}
    e_ratio, f_ratio = [], []
    for p, f in zip(_predict_all(committee, frames), frames):
        sigma_e = np.std(p.member_energies, ddof=1)
        e_ratio.append((p.energy - f.energy) ** 2 / max(sigma_e, 1e-8) ** 2)
        sigma_f = np.std(p.member_forces, axis=0, ddof=1)
        f_ratio.append(((p.forces - f.forces) ** 2 / np.maximum(sigma_f, 1e-6) ** 2).ravel())
    return {"energy": float(math.sqrt(np.mean(e_ratio))), "forces": float(math.sqrt(np.mean(np.concatenate(f_ratio))))}


def _predict_all(committee: Committee, frames: list[Frame], chunk: int = 16):
    out = []
    sizes = [len(f.numbers) for f in frames]
    order = _batches(list(range(len(frames))), sizes, chunk, None)
    preds: dict[int, object] = {}
    for ids in order:
        for i, p in zip(ids, committee.predict_batch([frames[i].numbers for i in ids],
                                                     [frames[i].positions for i in ids])):
            preds[i] = p
    return [preds[i] for i in range(len(frames))]


DEBYE_PER_E_A = 1.0 / 0.20819434  # 1 e·Å = 4.8032 D


def error_table(committee: Committee, frames: list[Frame]) -> dict:
    """MAE and RMSE of energy per atom (meV/atom), force components (eV/Å) and dipole components (Debye)."""
    if not frames:
        return {}
    preds = _predict_all(committee, frames)
    de = np.array([(p.energy - f.energy) / len(f.numbers) * 1000 for p, f in zip(preds, frames)])
    df = np.concatenate([(p.forces - f.forces).ravel() for p, f in zip(preds, frames)])
    table = {"n": len(frames),
             "energy_mae_meV_per_atom": float(np.abs(de).mean()), "energy_rmse_meV_per_atom": float(np.sqrt((de**2).mean())),
             "force_mae_eV_per_A": float(np.abs(df).mean()), "force_rmse_eV_per_A": float(np.sqrt((df**2).mean()))}
    if committee.dipole_model is not None and all(f.dipole is not None for f in frames):
        dd = np.concatenate([(p.dipole - f.dipole) for p, f in zip(preds, frames)]) * DEBYE_PER_E_A
        table.update(dipole_mae_D=float(np.abs(dd).mean()), dipole_rmse_D=float(np.sqrt((dd**2).mean())))
    return table


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])
