"""Training a committee: the loop is separate from the models.

Energy members minimise the paper's loss (Eq. 3), per batch of structures::

    L = mean_n [ lambda_E (E_n - E_n^ref)^2 + lambda_F / (3 N_n) sum_i |F_ni - F_ni^ref|^2 ]

with lambda_E = 1 and lambda_F = 10 Å^2; dipole members minimise (1/3)|mu - mu^ref|^2 (Eq. 5). Adam, with a
learning rate decaying linearly to zero over ``epochs``, early stopping on the validation loss (the best
weights are kept) and optional warm start from an earlier committee. Every member has its own seed and its
own random subsample (or bootstrap) of the training split; members train in parallel processes, with torch
threads set so that processes x threads never exceeds the cores. Each member reports its progress (epoch,
losses, validation errors, elapsed time and ETA) on stderr, see ``TrainConfig.log_every``.

A training step costs a few times the GEMMs of the atomic network (``bench/model_speed.py`` measures both):
the forces and their weight gradients are computed without autograd's generic double backward where it is
costly (:func:`_energy_and_forces`), and the data are stacked once per member (:class:`_Packed`).

After training, calibration scales alpha_E and alpha_F are fitted on the validation split so that the
committee's standard deviations match its actual errors: alpha = sqrt(mean(err^2 / sigma^2)).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import DEFAULT_SEED, Frame, read_frames, split_train_validation, structure_hash
from .models.committee import (Committee, ModelConfig, _dipole_model, _energy_model, load_committee,
                               save_committee)
from .models.energy_model import EnergyModel
from .models.gaussian_moments import MomentForces, pair_terms
from .models.geometry import Batch


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
    # False: the validation tenth trains too, for a last committee on a fixed label budget (every label
    # counts). Its validation errors are then training errors, and its calibration factors come from the
    # warm-start committee, which held those frames out (on seen frames they would be optimistic).
    hold_out: bool = True
    bootstrap: bool = False            # sample with replacement instead
    seed: int = DEFAULT_SEED           # split seed; member k uses seed + 1 + k
    workers: int | None = None         # parallel processes (default: min(members, cores))
    device: str = "cpu"                # where members train: cpu, cuda or auto (driver.device)
    warm_start: str | None = None      # an earlier committee folder: members start from its weights
    # a committee trained on another reference method (e.g. cheap xTB labels): members start from its
    # weights and its per-element energy shift is refitted on these labels (fit_pretrained_shift)
    pretrained: str | None = None
    max_minutes: float | None = None   # wall-clock limit per member
    # Progress: one line per member every log_every epochs (0: every ~10 % of the epochs) or every
    # log_seconds, whichever comes first, to "stderr", "stdout" or "off".
    log_every: int = 0
    log_seconds: float = 30.0
    progress: str = "stderr"
    model: dict = field(default_factory=dict)  # ModelConfig fields (sizes, species, cutoffs)

    def __post_init__(self):
        if not 1 <= self.committee <= 8:
            raise ValueError(f"committee size must be 1-8, got {self.committee}")
        if self.dipole_members < 0:
            raise ValueError("dipole_members must be >= 0")
        if self.progress not in ("stderr", "stdout", "off"):
            raise ValueError(f"progress must be 'stderr', 'stdout' or 'off', got {self.progress!r}")
        from .device import check_name

        self.device = check_name(self.device)  # the name only: CUDA is asked for when training starts
        if self.warm_start and self.pretrained:
            raise ValueError("pretrained and warm_start exclude each other: a warm start continues a committee of "
                             "the same reference method, a pretrained one starts another method's")


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


def fit_pretrained_shift(committee: Committee, frames: list[Frame], index: list[np.ndarray],
                         ridge: float = 1e-6) -> tuple[np.ndarray, dict]:
    """The per-element energy shift (eV) for fine-tuning ``committee``, trained on another reference method,
    on ``frames``, and a record of it. Two methods' total energies differ mostly by per-element constants
    (for xTB and PBE0 thousands of eV per atom), which the shift holds: the new shift is the pretrained one
    plus a ridge fit (:func:`fit_energy_shift`) of the residuals E_ref - E_pretrained on composition. The
    atomic networks are kept as they are, so the committee's energies move by exactly those per-element
    constants (the shift is added in float64 outside the networks) and the fine-tune starts from the
    pretrained surface rather than with an energy error the size of the constants."""
    sizes = [len(ix) for ix in index]
    predicted = np.empty(len(frames))
    for ids in _batches(list(range(len(frames))), sizes, 32, None):
        preds = committee.predict_batch([frames[i].numbers for i in ids], [frames[i].positions for i in ids],
                                        member_forces=False, dipoles=False)
        predicted[ids] = [p.energy for p in preds]
    residual = [dataclasses.replace(f, energy=f.energy - e) for f, e in zip(frames, predicted)]
    delta = fit_energy_shift(residual, len(committee.species), index, ridge)
    shift = np.asarray(committee.energy_shift, float) + delta
    n_atoms = np.array(sizes, float)
    before = np.array([f.energy for f in residual]) / n_atoms
    after = before - np.array([delta[ix].sum() for ix in index]) / n_atoms
    species = list(committee.species)
    return shift, {"energy_shift_before_eV": dict(zip(species, map(float, committee.energy_shift))),
                   "energy_shift_eV": dict(zip(species, map(float, shift))),
                   "train_energy_mae_meV_per_atom_before": float(np.abs(before).mean() * 1000),
                   "train_energy_mae_meV_per_atom_after": float(np.abs(after).mean() * 1000),
                   "n_frames": len(frames)}


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
    """A data split as arrays (what travels to a member process)."""
    index: list[np.ndarray]
    positions: list[np.ndarray]
    energy: np.ndarray        # shift removed, eV
    forces: list[np.ndarray]
    dipole: list[np.ndarray | None]


@dataclass
class _Batch:
    structures: Batch
    energy: torch.Tensor           # (B,) eV, shift removed
    forces: torch.Tensor           # (B, N, 3) eV/Å
    dipole: torch.Tensor | None    # (B, 3) e·Å, None unless every structure has one
    n_atoms: torch.Tensor          # (B,)


class _Packed:
    """A data split stacked once per atom count, in the training dtype. The batches of :func:`_batches` hold
    structures of one atom count, so a batch is one ``index_select`` per field: no padding loop, no numpy
    conversion, every step. The stacks live on ``device`` (the member's: the whole split moves once)."""

    def __init__(self, data: _Tensors, dtype=torch.float32, device="cpu"):
        self.device = torch.device(device)
        self.n_structures = len(data.energy)
        self.slot: list[tuple[int, int]] = []          # structure -> (atom count, row in its group)
        by_size: dict[int, list[int]] = {}
        for i, ix in enumerate(data.index):
            rows = by_size.setdefault(len(ix), [])
            self.slot.append((len(ix), len(rows)))
            rows.append(i)
        as_t = lambda arrays, dt=dtype: torch.as_tensor(np.stack(arrays), dtype=dt).to(self.device)
        self.groups = {}
        for n, ids in by_size.items():
            dipoles = [data.dipole[i] for i in ids]
            self.groups[n] = dict(species=as_t([data.index[i] for i in ids], torch.long),
                                  positions=as_t([data.positions[i] for i in ids]),
                                  forces=as_t([data.forces[i] for i in ids]),
                                  energy=torch.as_tensor(data.energy[ids], dtype=dtype).to(self.device),
                                  dipole=None if any(d is None for d in dipoles) else as_t(dipoles))

    def sizes(self) -> list[int]:
        return [n for n, _ in self.slot]

    def batch(self, ids) -> _Batch:
        n = self.slot[ids[0]][0]
        if any(self.slot[i][0] != n for i in ids):
            raise ValueError("a training batch must hold structures of one atom count (see _batches)")
        rows = torch.tensor([self.slot[i][1] for i in ids], device=self.device)
        take = lambda key: None if self.groups[n][key] is None else self.groups[n][key].index_select(0, rows)
        species = take("species")
        return _Batch(Batch(species, take("positions"), species >= 0), take("energy"), take("forces"),
                      take("dipole"), torch.full((len(ids),), n, device=self.device))


def _tensors(frames, species, shift) -> _Tensors:
    index = _species_index(frames, species)
    energy = np.array([f.energy - shift[ix].sum() for f, ix in zip(frames, index)])
    return _Tensors(index, [f.positions for f in frames], energy, [f.forces for f in frames],
                    [f.dipole for f in frames])


# ------------------------------------------------------------------ energies and forces for a force loss
def _silu_and_derivatives(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(z), silu'(z) and silu''(z)."""
    sig = torch.sigmoid(z)
    one_minus = 1.0 - sig
    h = z * sig
    d1 = sig + h * one_minus                                  # sig (1 + z (1 - sig))
    d2 = sig * one_minus * (2.0 + z * (one_minus - sig))      # sig (1 - sig) (2 + z (1 - 2 sig))
    return h, d1, d2


class _AtomicNetwork(torch.autograd.Function):
    """The SiLU network of :class:`EnergyModel` (stacked layers y = gain x W + b) for training on forces:
    returns each atom's output o (K, M) and its input gradient J = do/dx (K, M, F) from one forward, and its
    backward, written out, gives the gradient of any loss of (o, J) w.r.t. x and the weights with exactly
    the GEMMs of the double backward (two per GEMM of the input gradient, two per layer) and a handful of
    elementwise terms, where autograd's double backward of silu records several times as many operations.
    ``params`` alternate weight, bias, layer by layer."""

    @staticmethod
    def forward(ctx, x, gains, *params):
        weights, biases = params[0::2], params[1::2]
        acts, d1s, d2s = [x], [], []
        for w, b, gain in zip(weights[:-1], biases[:-1], gains[:-1]):
            h, d1, d2 = _silu_and_derivatives(torch.baddbmm(b, acts[-1], w, alpha=gain))
            acts.append(h)
            d1s.append(d1)
            d2s.append(d2)
        out = torch.baddbmm(biases[-1], acts[-1], weights[-1], alpha=gains[-1])[..., 0]
        # input gradient, layer by layer down: u_l = dO/dh_l, delta_l = dO/dz_l = silu'(z_l) u_l
        u = (gains[-1] * weights[-1].transpose(1, 2)).expand(-1, x.shape[1], -1)
        us, deltas = [None] * len(d1s), [None] * len(d1s)
        for layer in range(len(d1s) - 1, -1, -1):
            us[layer], deltas[layer] = u, d1s[layer] * u
            u = torch.bmm(deltas[layer], weights[layer].transpose(1, 2)).mul_(gains[layer])
        ctx.gains, ctx.n_hidden = gains, len(d1s)
        ctx.save_for_backward(*acts, *d1s, *d2s, *us, *deltas, *weights)
        return out, u

    @staticmethod
    def backward(ctx, grad_out, grad_j):
        n, g = ctx.n_hidden, ctx.gains
        saved = ctx.saved_tensors
        acts, d1s, d2s = saved[:n + 1], saved[n + 1:2 * n + 1], saved[2 * n + 1:3 * n + 1]
        us, deltas, weights = saved[3 * n + 1:4 * n + 1], saved[4 * n + 1:5 * n + 1], saved[5 * n + 1:]
        grad_w, grad_b, grad_z = [None] * (n + 1), [None] * (n + 1), [None] * n
        # 1. up the input-gradient chain J = g_1 delta_1 W_1^T: cotangents of delta_l (d_hat) and u_l
        if n == 0:  # no hidden layer: J = g_out w_out^T for every atom
            grad_w[0] = grad_j.sum(1)[..., None].mul_(g[0])
        else:
            grad_w[0] = torch.bmm(grad_j.transpose(1, 2), deltas[0]).mul_(g[0])
            d_hat = torch.bmm(grad_j, weights[0]).mul_(g[0])
        for layer in range(n):
            u_hat = d1s[layer] * d_hat
            grad_z[layer] = us[layer] * d_hat * d2s[layer]           # through silu'(z_l)
            if layer + 1 < n:  # u_l = g_{l+1} delta_{l+1} W_{l+1}^T
                grad_w[layer + 1] = torch.bmm(u_hat.transpose(1, 2), deltas[layer + 1]).mul_(g[layer + 1])
                d_hat = torch.bmm(u_hat, weights[layer + 1]).mul_(g[layer + 1])
            else:              # u_n = g_out w_out^T, the same for every atom
                grad_w[n] = u_hat.sum(1)[..., None].mul_(g[n])
        # 2. down the forward chain, with the output's cotangent and the terms of step 1
        grad_out = grad_out[..., None]
        grad_w[n].baddbmm_(acts[n].transpose(1, 2), grad_out, alpha=g[n])
        grad_b[n] = grad_out.sum(1, keepdim=True)
        h_hat = grad_out * (g[n] * weights[n].transpose(1, 2))
        for layer in range(n - 1, -1, -1):
            z_hat = h_hat.mul_(d1s[layer]).add_(grad_z[layer])
            grad_w[layer].baddbmm_(acts[layer].transpose(1, 2), z_hat, alpha=g[layer])
            grad_b[layer] = z_hat.sum(1, keepdim=True)
            if layer > 0 or ctx.needs_input_grad[0]:
                h_hat = torch.bmm(z_hat, weights[layer].transpose(1, 2)).mul_(g[layer])
        grads = [h_hat if ctx.needs_input_grad[0] else None, None]
        for w, b in zip(grad_w, grad_b):
            grads += [w, b]
        return tuple(grads)


def _energy_and_forces(model: EnergyModel, batch: Batch, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Energies (B,) eV and forces (B, N, 3) eV/Å of a one-member energy model, differentiable in the weights
    when ``create_graph``. The same numbers as autograd through ``model`` (tested), for a fraction of the
    operations: the pair terms depend on the positions alone (data), so they are computed once without a
    graph and the forces come from their hand-written VJP (:class:`MomentForces`, whose backward is the JVP);
    the atomic network is one :class:`_AtomicNetwork`; autograd differentiates twice only the invariants
    and the radial contraction."""
    desc = model.descriptor
    if model.n_members != 1:
        raise ValueError("training works on one member at a time")
    with torch.no_grad():
        moments, terms = pair_terms(batch.positions, batch.species, batch.mask, desc.n_species,
                                    desc.basis.centres.to(batch.positions.dtype), desc.basis.beta, desc.cutoff)
    coefficients = desc.centre_coefficients(batch.species)                       # (1, B, N, Q, n_radial)
    psi = torch.einsum("kbiqs,biqm->kbism", coefficients, moments)
    if not psi.requires_grad:  # frozen descriptor: forces still need dE/dpsi
        psi.requires_grad_(True)
    feats = desc.features_from_moments(psi)                                       # (1, B, N, F)
    k, b, n, f = feats.shape
    x = (feats.reshape(k, b * n, f) - model.feature_mean) / model.feature_std
    layers = model.layers
    params = [t for layer in layers for t in (layer.weight, layer.bias)]
    out, d_out = _AtomicNetwork.apply(x, tuple(layer.gain for layer in layers), *params)
    scale = model.atomic_scale[:, batch.species.clamp(min=0)] * batch.mask       # (1, B, N)
    energy = (out.reshape(k, b, n) * scale).sum(-1)
    d_feats = (d_out / model.feature_std).reshape(k, b, n, f) * scale[..., None]  # dE/dG
    (d_psi,) = torch.autograd.grad(feats, psi, d_feats, create_graph=create_graph)
    d_moments = torch.einsum("kbiqs,kbism->biqm", coefficients, d_psi)
    return energy[0], -MomentForces.apply(d_moments, terms)


# ------------------------------------------------------------------ one member
def _energy_loss(model, data: _Packed, ids, cfg: TrainConfig, create_graph: bool):
    b = data.batch(ids)
    e, f = _energy_and_forces(model, b.structures, create_graph)
    f_err = ((f - b.forces) ** 2).sum((-1, -2)) / (3 * b.n_atoms)
    return (cfg.lambda_energy * (e - b.energy) ** 2 + cfg.lambda_forces * f_err).mean()


def _dipole_loss(model, data: _Packed, ids, total_charge: float):
    b = data.batch(ids)
    mu = model(b.structures, total_charge)[0]
    return ((mu - b.dipole) ** 2).mean()


@torch.no_grad()
def _dipole_mae_D(model, data: _Packed, batches, total_charge: float) -> dict:
    err = torch.cat([(model(b.structures, total_charge)[0] - b.dipole).abs().reshape(-1)
                     for b in map(data.batch, batches)])
    return {"dipole_mae_D": float(err.mean()) * DEBYE_PER_E_A}


def _energy_mae(model, data: _Packed, batches) -> dict:
    """Validation MAE of the energy per atom (meV/atom) and of the force components (eV/Å)."""
    de, df = [], []
    for b in map(data.batch, batches):
        e, f = _energy_and_forces(model, b.structures, create_graph=False)
        de.append(((e - b.energy) / b.n_atoms).detach().abs() * 1000)
        df.append((f - b.forces).detach().abs().reshape(-1))
    return {"energy_mae_meV_per_atom": float(torch.cat(de).mean()), "force_mae_eV_per_A": float(torch.cat(df).mean())}


def _train_step(loss_fn, ids, data: _Packed, params: list, opt: torch.optim.Optimizer) -> float:
    """One optimiser step on the batch ``ids``; returns its loss."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(ids, data, True)
    torch.autograd.backward(loss, inputs=params)  # the weights only: positions are data, they need no gradient
    opt.step()
    return float(loss.detach())


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam; the fused kernel where this torch has it (one pass over the weights instead of a dozen)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # pragma: no cover - older torch
        return torch.optim.Adam(params, lr=lr)


class _Progress:
    """A member's progress lines: every ``log_every`` epochs (0: ~10 % of them) or after ``log_seconds``,
    whichever comes first, plus the last. Each line is one ``os.write`` of one whole line, so members that
    train in parallel processes never interleave mid-line, and each names its member."""

    def __init__(self, name: str, cfg: TrainConfig, start: float):
        self.name, self.cfg, self.start = name, cfg, start
        self.every = cfg.log_every if cfg.log_every > 0 else max(1, math.ceil(cfg.epochs / 10))
        self.last = start

    def due(self, epoch: int, now: float) -> bool:
        if self.cfg.progress == "off":
            return False
        return ((epoch + 1) % self.every == 0 or epoch == 0 or epoch == self.cfg.epochs - 1
                or (self.cfg.log_seconds > 0 and now - self.last >= self.cfg.log_seconds))

    def eta_s(self, epoch: int, now: float) -> float:
        """Seconds left if training runs to the last epoch (early stopping can end it sooner)."""
        elapsed = now - self.start
        left = elapsed / (epoch + 1) * (self.cfg.epochs - epoch - 1)
        if self.cfg.max_minutes:
            left = min(left, max(0.0, 60 * self.cfg.max_minutes - elapsed))
        return left

    def epoch_line(self, epoch: int, train_loss: float, val: dict, best: float, best_epoch: int, lr: float,
                   now: float) -> None:
        if "dipole_mae_D" in val:
            errors = f"val mu {val['dipole_mae_D']:.4f} D"
        else:
            errors = (f"val E {val['energy_mae_meV_per_atom']:.3f} meV/atom "
                      f"F {val['force_mae_eV_per_A']:.4f} eV/Å")
        self.write(f"epoch {epoch + 1}/{self.cfg.epochs} train loss {train_loss:.3e} {errors} "
                   f"(val loss {val['loss']:.3e}, best {best:.3e} at epoch {best_epoch + 1}) lr {lr:.1e} "
                   f"{now - self.start:.0f} s ETA {self.eta_s(epoch, now):.0f} s")
        self.last = now

    def write(self, text: str) -> None:
        if self.cfg.progress == "off":
            return
        stream = sys.stderr if self.cfg.progress == "stderr" else sys.stdout
        line = f"[{self.name}] {text}\n"
        try:
            stream.flush()
            os.write(stream.fileno(), line.encode())
        except (AttributeError, OSError, ValueError):  # a stream without a file descriptor (captured)
            stream.write(line)
            stream.flush()


def _member_model(task: dict, train: _Packed, pick: list[int]):
    """The member's model, initial learning rate and loss function ``loss(ids, data, create_graph)``."""
    cfg: TrainConfig = task["cfg"]
    mcfg: ModelConfig = task["model_config"]
    if task["kind"] == "energy":
        model, lr0 = _energy_model(mcfg, 1), cfg.lr
        # looked up at call time: bench/training_schedule.py wraps _energy_loss to follow the epochs
        loss_fn = lambda ids, d, g: _energy_loss(model, d, ids, cfg, g)
    else:
        model, lr0 = _dipole_model(mcfg, 1), cfg.lr_dipole
        loss_fn = lambda ids, d, g: _dipole_loss(model, d, ids, mcfg.total_charge)
    model.to(train.device)  # initialised on the CPU (the same weights for a seed on any device), trained there
    if task.get("warm_state") is not None:
        model.load_state_dict(task["warm_state"])
    elif task["kind"] == "energy":
        model.fit_normalisation([train.batch(ids).structures for ids in _batches(pick, train.sizes(), 64, None)])
        rms_f = math.sqrt(np.mean([np.mean(f**2) for f in task["train"].forces]))
        with torch.no_grad():
            model.atomic_scale.fill_(max(rms_f, 0.05))
    return model, lr0, loss_fn


def _train_member(task: dict) -> dict:
    """Train one member (runs in its own process)."""
    torch.set_num_threads(task["threads"])
    cfg: TrainConfig = task["cfg"]
    kind, k = task["kind"], task["member"]
    seed = cfg.seed + 1 + k + (1000 if kind == "dipole" else 0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = task.get("device", "cpu")
    train, val = _Packed(task["train"], device=device), _Packed(task["val"], device=device)
    n_train = train.n_structures
    n_pick = max(1, int(round(cfg.subsample * n_train)))
    pick = (rng.integers(0, n_train, n_train) if cfg.bootstrap
            else rng.permutation(n_train)[:n_pick]).tolist()
    sizes_t = train.sizes()
    model, lr0, loss_fn = _member_model(task, train, pick)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adam(params, lr0)
    val_batches = _batches(list(range(val.n_structures)), val.sizes(), 32, None)

    def val_loss():
        if not val_batches:
            return float("nan")
        total = 0.0
        for ids in val_batches:
            with torch.set_grad_enabled(kind == "energy"):
                total += float(loss_fn(ids, val, False).detach()) * len(ids)
        return total / val.n_structures

    def val_errors(loss: float) -> dict:
        if not val_batches:
            nan = float("nan")
            errors = {"dipole_mae_D": nan} if kind == "dipole" else {"energy_mae_meV_per_atom": nan,
                                                                     "force_mae_eV_per_A": nan}
        elif kind == "dipole":
            errors = _dipole_mae_D(model, val, val_batches, task["model_config"].total_charge)
        else:
            errors = _energy_mae(model, val, val_batches)
        return dict(errors, loss=loss)

    best, best_state, best_epoch = math.inf, None, 0
    start = time.time()
    progress = _Progress(f"{kind} member {k}", cfg, start)
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
            train_total += _train_step(loss_fn, ids, train, params, opt) * len(ids)
        v = val_loss()
        history.append((epoch, train_total / len(pick), v))
        if not (v >= best):  # also true for the first NaN-free value
            best, best_epoch = v, epoch
            best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
        now = time.time()
        if progress.due(epoch, now):
            progress.epoch_line(epoch, train_total / len(pick), val_errors(v), best, best_epoch, lr, now)
        if epoch - best_epoch >= cfg.patience:
            progress.write(f"early stop at epoch {epoch + 1} (best val loss {best:.3e} at epoch {best_epoch + 1})")
            break
        if cfg.max_minutes and (now - start) > 60 * cfg.max_minutes:
            progress.write(f"time limit at epoch {epoch + 1}")
            break
    if best_state is None:
        best_state = model.state_dict()
    best_state = {name: t.detach().cpu() for name, t in best_state.items()}  # results hold CPU tensors
    progress.write(f"done: {len(history)} epochs in {time.time() - start:.0f} s, best val loss {best:.3e} "
                   f"at epoch {best_epoch + 1}")
    return {"kind": kind, "member": k, "state": best_state, "best_val": best, "best_epoch": best_epoch,
            "epochs_run": len(history), "seconds": time.time() - start}


# ------------------------------------------------------------------ the committee
def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def train_committee(data, out_dir, cfg: TrainConfig | None = None, executor=None) -> Committee:
    """Train K energy members (+ J dipole members) on ``data`` (a database path, a file ASE reads, or a
    list of :class:`Frame`) and write the committee to ``out_dir`` atomically. Returns the committee.

    ``executor``: a concurrent.futures-style executor (e.g. a Parsl pool on other nodes,
    :mod:`al_manager.execution`) that trains one member per task; its task and result files are written
    beside ``out_dir`` (a folder the workers must see: on a cluster, the shared work directory). Default:
    child processes on this machine."""
    cfg = cfg or TrainConfig()
    from .device import resolve_device

    device = resolve_device(cfg.device, option="device")  # before any work: cuda without CUDA is refused
    frames = read_frames(data) if isinstance(data, (str, Path)) else list(data)
    if len(frames) < 2:
        raise ValueError(f"need at least 2 labelled structures to train, got {len(frames)}")
    start = cfg.warm_start or cfg.pretrained
    warm = load_committee(start) if start else None
    mcfg = warm.config if warm is not None else ModelConfig(**cfg.model)
    train_frames, val_frames = split_train_validation(frames, cfg.seed)
    if not cfg.hold_out:
        train_frames = train_frames + val_frames
    index = _species_index(train_frames, mcfg.species)
    pretrained_record = None
    if warm is None:
        shift = fit_energy_shift(train_frames, len(mcfg.species), index)
    elif cfg.warm_start:
        shift = warm.energy_shift      # the same reference method: its shift holds
    else:                              # another method's committee: its per-element constants are refitted
        shift, pretrained_record = fit_pretrained_shift(warm, train_frames, index)
        pretrained_record["from"] = str(Path(cfg.pretrained).resolve())
        print(f"pretrained committee {cfg.pretrained}: energy shift refitted on {len(train_frames)} labels "
              f"(training energy MAE {pretrained_record['train_energy_mae_meV_per_atom_before']:.4g} -> "
              f"{pretrained_record['train_energy_mae_meV_per_atom_after']:.4g} meV/atom before fine-tuning)",
              flush=True)
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
                              warm_state=warm_state, device=str(device)))
    cores = _cores()
    workers = max(1, min(cfg.workers or cores, len(tasks)))
    threads = max(1, cores // workers)
    print(f"training {cfg.committee} energy/force member(s) and {j} dipole member(s) on "
          f"{len(train_frames)} structures (validation {len(val_frames)}"
          f"{'' if cfg.hold_out else ', trained on too: hold_out off'}), {workers} process(es) x "
          f"{threads} thread(s){'' if device.type == 'cpu' else f' on {device}'}", flush=True)
    t0 = time.time()
    if executor is not None:
        print(f"training {len(tasks)} member(s) as tasks of {type(executor).__name__} "
              f"{getattr(executor, 'stage', '')}".rstrip(), flush=True)
        results = _submit_tasks(executor, tasks, Path(out_dir))
    else:
        results = _run_tasks(tasks, workers, threads)
    energy_states = sorted((r for r in results if r["kind"] == "energy"), key=lambda r: r["member"])
    dipole_states = sorted((r for r in results if r["kind"] == "dipole"), key=lambda r: r["member"])
    em, dm = _energy_model(mcfg, cfg.committee), _dipole_model(mcfg, j)
    em.load_state_dict(_stack([r["state"] for r in energy_states]))
    if dm is not None:
        dm.load_state_dict(_stack([r["state"] for r in dipole_states]))
    committee = Committee(mcfg, em.eval(), dm.eval() if dm is not None else None, np.asarray(shift, float))
    committee.to(device=device)  # calibration and error tables where it trained; saved from CPU copies
    if not cfg.hold_out and warm is not None and cfg.warm_start:
        committee.calibration = dict(warm.calibration)
    else:
        if not cfg.hold_out:
            print("note: hold_out off without a warm start: calibrated on frames the members trained on, so the "
                  "factors are optimistic", flush=True)
        committee.calibration = calibrate(committee, val_frames)
    committee.metadata = {
        "n_train": len(train_frames), "n_validation": len(val_frames), "seconds": time.time() - t0,
        "validation_seen": not cfg.hold_out,
        "train_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "model"},
        "members": [{k: r[k] for k in ("kind", "member", "best_val", "best_epoch", "epochs_run", "seconds")}
                    for r in results],
        "errors": {"train": error_table(committee, train_frames), "validation": error_table(committee, val_frames)},
        # what it has seen, without the method (the same geometry labelled otherwise is still seen): `nanosil
        # evaluate` warns when a test frame is among them
        "structure_hashes": sorted({structure_hash(f.numbers, f.positions)[:16] for f in train_frames + val_frames}),
    }
    if pretrained_record is not None:
        committee.metadata["pretrained"] = pretrained_record
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
                    results.append(torch.load(result_file, map_location="cpu", weights_only=True))
        finally:
            for proc, _, _ in running:
                proc.kill()
    return results


def _submit_tasks(executor, tasks: list[dict], out_dir: Path) -> list[dict]:
    """One task per member on ``executor``: each reads its task file and writes its result file (tensors
    and plain types only, loaded with ``weights_only=True``); the task folder is removed afterwards."""
    folder = out_dir.parent / f".{out_dir.name}.tasks"
    if folder.exists():
        shutil.rmtree(folder)   # a killed earlier attempt: its members train again
    folder.mkdir(parents=True)
    try:
        futures = []
        for i, task in enumerate(tasks):
            task_file, result_file = folder / f"task{i}.pt", folder / f"result{i}.pt"
            # a worker's parent is its pool, not this process: no parent check there
            torch.save(dict(_encode_task(task, 1), parent_pid=None), task_file)
            futures.append((executor.submit(train_task_file, str(task_file), str(result_file)), task))
        results = []
        for future, task in futures:
            try:
                result_file = future.result()
            except Exception as exc:
                raise RuntimeError(f"training of {task['kind']} member {task['member']} failed on "
                                   f"{type(executor).__name__}: {type(exc).__name__}: {exc}") from exc
            results.append(torch.load(result_file, map_location="cpu", weights_only=True))
        return results
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _encode_task(task: dict, threads: int) -> dict:
    def tensors(d: _Tensors) -> dict:
        return {"index": [torch.as_tensor(x) for x in d.index],
                "positions": [torch.as_tensor(x) for x in d.positions],
                "energy": torch.as_tensor(d.energy), "forces": [torch.as_tensor(x) for x in d.forces],
                "dipole": [None if x is None else torch.as_tensor(x) for x in d.dipole]}

    return {"kind": task["kind"], "member": task["member"], "threads": threads, "parent_pid": os.getpid(),
            "cfg": dataclasses.asdict(task["cfg"]), "model_config": dataclasses.asdict(task["model_config"]),
            "train": tensors(task["train"]), "val": tensors(task["val"]), "warm_state": task["warm_state"],
            "device": task.get("device", "cpu")}


def _decode_task(raw: dict) -> dict:
    def data(d: dict) -> _Tensors:
        return _Tensors([x.numpy() for x in d["index"]], [x.numpy() for x in d["positions"]], d["energy"].numpy(),
                        [x.numpy() for x in d["forces"]], [None if x is None else x.numpy() for x in d["dipole"]])

    return dict(raw, cfg=TrainConfig(**raw["cfg"]), model_config=ModelConfig(**raw["model_config"]),
                train=data(raw["train"]), val=data(raw["val"]))


def train_task_file(task_file: str, result_file: str) -> str:
    """Train the member of ``task_file`` and write its result atomically to ``result_file`` (the body of a
    member's process or remote task); returns ``result_file``."""
    task = _decode_task(torch.load(task_file, map_location="cpu", weights_only=True))
    result = _train_member(task)
    tmp = result_file + ".tmp"
    torch.save(result, tmp)
    os.replace(tmp, result_file)
    return result_file


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
    train_task_file(sys.argv[1], sys.argv[2])
