"""A committee of K energy/force members and J dipole members, evaluated in one batched pass.

Statistics (all in ASE units):

- ``energy``: mean of the member energies (eV); ``forces``: mean member forces (eV/Å).
- ``energy_std_per_atom``: alpha_E * std_k(E_k) / N_atoms, with ddof=1 (eV/atom).
- ``max_force_std``: alpha_F * max_i sqrt(sum_a var_k(F_ia)), ddof=1: the largest per-atom force standard
  deviation, taken as the norm of the per-component standard deviations (eV/Å).
- ``dipole``: mean member dipole (e·Å); ``dipole_std``: sqrt(sum_c var_j(mu_c)), ddof=1 (e·Å), J >= 2 only.

alpha_E and alpha_F are calibration scales fitted on the validation set after training
(alpha = sqrt(mean(err^2 / sigma^2)), see :mod:`driver.training`). With one member every std is zero.

On disk a committee is a folder: ``committee.json`` (species, sizes, units, shifts, calibration, version)
and ``energy.pt`` / ``dipole.pt`` state dicts, loaded with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ase.data import atomic_masses, atomic_numbers, chemical_symbols

from spectra.atomic import write_dir

from .dipole_model import DipoleModel
from .energy_model import EnergyModel
from .geometry import Batch, make_batch

FORMAT = "nanosil-committee"
FORMAT_VERSION = 1
MIN_DISTANCE = 0.5  # Å: closer atoms are unphysical for these models (and inside r_min of the basis)


@dataclass
class ModelConfig:
    """Sizes of both networks; the defaults are the paper's."""

    species: tuple[str, ...] = ("Mg", "Si", "O")
    cutoff: float = 5.0            # Å, energy model
    r_min: float = 0.5             # Å, first Gaussian centre
    n_basis: int = 7
    n_radial: int = 5
    hidden: tuple[int, ...] = (512, 512)
    dipole_features: int = 128
    dipole_interactions: int = 3
    dipole_gaussians: int = 25
    dipole_cutoff: float = 5.0     # Å
    total_charge: float = 0.0      # e

    def __post_init__(self):
        self.species = tuple(self.species)
        self.hidden = tuple(int(h) for h in self.hidden)
        unknown = [s for s in self.species if s not in atomic_numbers]
        if unknown:
            raise ValueError(f"unknown element(s) in species: {', '.join(unknown)}")


@dataclass
class MemberOutputs:
    """Raw per-member results of one structure (what MPI ranks exchange)."""

    energies: np.ndarray                 # (k,) eV, shifts included
    forces: np.ndarray | None            # (k, N, 3) eV/Å, or None when only the mean force was computed
    dipoles: np.ndarray                  # (j, 3) e·Å
    mean_forces: np.ndarray | None = None  # (N, 3) when member forces were skipped

    @staticmethod
    def concatenate(parts: list["MemberOutputs"]) -> "MemberOutputs":
        forces = [p.forces for p in parts if p.forces is not None and len(p.forces)]
        return MemberOutputs(
            energies=np.concatenate([p.energies for p in parts]),
            forces=np.concatenate(forces) if forces else None,
            dipoles=np.concatenate([p.dipoles for p in parts]) if parts else np.zeros((0, 3)),
        )


@dataclass
class CommitteePrediction:
    energy: float
    forces: np.ndarray
    energy_std_per_atom: float
    max_force_std: float
    dipole: np.ndarray | None
    dipole_std: float | None
    member_energies: np.ndarray
    member_forces: np.ndarray | None
    member_dipoles: np.ndarray


@dataclass
class Committee:
    config: ModelConfig
    energy_model: EnergyModel
    dipole_model: DipoleModel | None
    energy_shift: np.ndarray                       # (S,) eV per atom of each species, float64
    calibration: dict = field(default_factory=lambda: {"energy": 1.0, "forces": 1.0})
    version: str = "untrained"
    metadata: dict = field(default_factory=dict)   # training record (errors, schedule, data size ...)

    def __post_init__(self):
        # A committee is for inference: frozen weights let autograd skip every weight gradient when it
        # differentiates with respect to positions (forces, Hessians). Training works on its own modules.
        for model in (self.energy_model, self.dipole_model):
            if model is not None:
                model.eval().requires_grad_(False)

    # ---------------------------------------------------------------- basic facts
    @property
    def species(self) -> tuple[str, ...]:
        return self.config.species

    @property
    def n_energy_members(self) -> int:
        return self.energy_model.n_members if self.energy_model is not None else 0

    @property
    def n_dipole_members(self) -> int:
        return 0 if self.dipole_model is None else self.dipole_model.embedding.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        model = self.energy_model if self.energy_model is not None else self.dipole_model
        return next(model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        """Where the members' weights are (every batch is made there: :mod:`driver.device`)."""
        model = self.energy_model if self.energy_model is not None else self.dipole_model
        return next(model.parameters()).device

    def to(self, dtype: torch.dtype | None = None, device=None) -> "Committee":
        """The members in ``dtype`` and/or on ``device`` (a name, see :func:`driver.device.resolve_device`, or a
        torch.device), in place; ``to(device)`` with a device alone also works, as for a torch module."""
        if isinstance(dtype, (str, torch.device)):
            dtype, device = None, dtype
        if device is not None:
            from driver.device import resolve_device

            device = resolve_device(device)
        for model in (self.energy_model, self.dipole_model):
            if model is not None:
                model.to(device=device, dtype=dtype)
        return self

    def species_index(self, numbers, source: str = "") -> np.ndarray:
        self.check_numbers(numbers, source)
        lookup = {atomic_numbers[s]: k for k, s in enumerate(self.species)}
        return np.array([lookup[int(z)] for z in numbers], dtype=np.int64)

    def check_numbers(self, numbers, source: str = "") -> None:
        known = {atomic_numbers[s] for s in self.species}
        bad = sorted({int(z) for z in numbers} - known)
        if bad:
            where = f" in {source}" if source else ""
            names = ", ".join(chemical_symbols[z] for z in bad)
            raise ValueError(f"element {names}{where} is not supported by this model "
                             f"(supported species: {', '.join(self.species)})")

    def validate(self, numbers, positions, source: str = "") -> None:
        """Refuse structures the model cannot describe, with a message naming the problem."""
        where = f" in {source}" if source else ""
        self.check_numbers(numbers, source)
        positions = np.asarray(positions, dtype=float)
        if not np.all(np.isfinite(positions)):
            raise ValueError(f"non-finite (NaN/inf) positions{where}")
        if len(positions) > 1:
            d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
            np.fill_diagonal(d, np.inf)
            i, j = np.unravel_index(np.argmin(d), d.shape)
            if d[i, j] < MIN_DISTANCE:
                raise ValueError(f"atoms {i} and {j}{where} are {d[i, j]:.3f} Å apart "
                                 f"(closer than {MIN_DISTANCE} Å): not a physical structure")

    def shift_energy(self, species_index: np.ndarray) -> float:
        return float(self.energy_shift[species_index].sum())

    # ---------------------------------------------------------------- evaluation
    def _batch(self, numbers, positions, requires_grad=False) -> tuple[Batch, torch.Tensor, np.ndarray]:
        idx = self.species_index(numbers)
        device = self.device
        pos = torch.as_tensor(np.asarray(positions), dtype=self.dtype).to(device).clone().requires_grad_(requires_grad)
        species = torch.as_tensor(idx).to(device)[None]
        return Batch(species=species, positions=pos[None], mask=species >= 0), pos, idx

    def member_outputs(self, numbers, positions, forces: bool = True,
                       member_forces: bool = True, dipoles: bool = True) -> MemberOutputs:
        """Per-member energies (and forces, dipoles) of one structure. ``member_forces=False`` takes a single
        backward pass for the mean force (cheaper) and returns it in ``mean_forces``; ``dipoles=False`` skips
        the dipole model (no member dipoles: the prediction's dipole is None)."""
        k = self.n_energy_members
        energies = np.zeros(0)
        f_members, f_mean = None, None
        if k and self.energy_model.can_infer():  # the compiled descriptor, no autograd
            idx = self.species_index(numbers)
            replicas = (k if member_forces else 1) if forces else None
            e, grad = self.energy_model.infer(idx[None], np.asarray(positions)[None], replicas)
            energies = e[:, 0] + self.shift_energy(idx)
            if forces and (member_forces or k == 1):
                f_members = -grad[:, 0]
            elif forces:
                f_mean = -grad[0, 0] / k
        elif k:
            batch, pos, idx = self._batch(numbers, positions, requires_grad=forces)
            with torch.set_grad_enabled(forces):
                if forces and member_forces and k > 1:
                    # One copy of the positions per member: one backward pass gives every member's forces.
                    rep = pos.detach()[None].repeat(k, 1, 1).requires_grad_(True)
                    species = batch.species.expand(k, -1)
                    e = self.energy_model(Batch(species, rep, species >= 0), per_member=True, fast=True)[:, 0]
                    (g,) = torch.autograd.grad(e.sum(), rep)
                    f_members = -g.cpu().double().numpy()
                else:
                    e = self.energy_model(batch, fast=True)[:, 0]                     # (K,)
                if f_members is not None:
                    pass
                elif forces:
                    (g,) = torch.autograd.grad(e.sum(), pos)
                    if k == 1:
                        f_members = -g.detach().cpu().double().numpy()[None]
                    else:
                        f_mean = -g.detach().cpu().double().numpy() / k
            energies = e.detach().cpu().double().numpy() + self.shift_energy(idx)
        mu = self.member_dipoles(numbers, positions) if dipoles else np.zeros((0, 3))
        return MemberOutputs(energies=energies, forces=f_members, dipoles=mu, mean_forces=f_mean)

    @torch.no_grad()
    def member_dipoles(self, numbers, positions) -> np.ndarray:
        if self.dipole_model is None:
            return np.zeros((0, 3))
        batch, _, _ = self._batch(numbers, positions)
        return self.dipole_model(batch, self.config.total_charge)[:, 0].cpu().double().numpy()

    def summarize(self, out: MemberOutputs, n_atoms: int) -> CommitteePrediction:
        """Committee statistics from the members' outputs (see the module docstring)."""
        k = len(out.energies)
        alpha_e, alpha_f = self.calibration.get("energy", 1.0), self.calibration.get("forces", 1.0)
        e_std = float(np.std(out.energies, ddof=1)) / n_atoms * alpha_e if k > 1 else 0.0
        if out.forces is not None:
            forces = out.forces.mean(0)
            f_std = (float(np.sqrt(out.forces.var(0, ddof=1).sum(-1)).max()) * alpha_f
                     if len(out.forces) > 1 else 0.0)
        else:
            forces, f_std = out.mean_forces, float("nan")
        j = len(out.dipoles)
        return CommitteePrediction(
            energy=float(np.mean(out.energies)), forces=forces,
            energy_std_per_atom=e_std, max_force_std=f_std,
            dipole=out.dipoles.mean(0) if j else None,
            dipole_std=float(np.sqrt(out.dipoles.var(0, ddof=1).sum())) if j > 1 else None,
            member_energies=out.energies, member_forces=out.forces, member_dipoles=out.dipoles)

    def predict(self, numbers, positions, forces: bool = True, member_forces: bool = True,
                dipoles: bool = True) -> CommitteePrediction:
        out = self.member_outputs(numbers, positions, forces=forces, member_forces=member_forces, dipoles=dipoles)
        return self.summarize(out, len(numbers))

    def predict_batch(self, numbers_list, positions_list, member_forces: bool = True,
                      dipoles=True) -> list[CommitteePrediction]:
        """Many structures (any sizes) in one padded forward/backward pass. ``dipoles``: True, False, or one
        bool per structure; the dipole model runs (one padded pass) only on the structures that ask for it,
        the others get no dipole (None), as with ``predict(..., dipoles=False)``."""
        idx = [self.species_index(z) for z in numbers_list]
        batch = make_batch(idx, positions_list, dtype=self.dtype, device=self.device)
        pos = batch.positions.requires_grad_(True)
        k = self.n_energy_members
        if self.energy_model.can_infer():  # the compiled descriptor, no autograd
            e, g = self.energy_model.infer(batch.species.numpy(), batch.positions.detach(),
                                           k if member_forces else 1)
            e, g = torch.from_numpy(e), torch.from_numpy(g if member_forces else g / k)
        elif member_forces and k > 1:
            # One copy of the batch per member (member k sees copy k): one backward pass gives every member's
            # forces, about 3x cheaper than a vmapped backward per member (is_grads_batched).
            b, n = batch.species.shape
            rep = batch.positions.detach()[None].repeat(k, 1, 1, 1).requires_grad_(True)   # (K, B, N, 3)
            species = batch.species.repeat(k, 1)
            e = self.energy_model(Batch(species, rep.reshape(k * b, n, 3), species >= 0), per_member=True,
                                  fast=True)
            (g,) = torch.autograd.grad(e.sum(), rep)
        else:
            e = self.energy_model(batch, fast=True)                                   # (K, B)
            (g,) = torch.autograd.grad(e.sum(), pos)
            g = g[None] / k
        e = e.detach().cpu().double().numpy()
        g = -g.detach().cpu().double().numpy()
        wanted = [bool(dipoles)] * len(idx) if isinstance(dipoles, (bool, np.bool_)) else [bool(d) for d in dipoles]
        if len(wanted) != len(idx):
            raise ValueError(f"dipoles: {len(wanted)} flags for {len(idx)} structures")
        rows = [b for b, w in enumerate(wanted) if w] if self.dipole_model is not None else []
        column = {b: c for c, b in enumerate(rows)}
        mu = np.zeros((0, 0, 3))
        if rows:
            with torch.no_grad():
                mu = self.dipole_model(make_batch([idx[b] for b in rows], [positions_list[b] for b in rows],
                                                  dtype=self.dtype, device=self.device),
                                       self.config.total_charge).cpu().double().numpy()
        preds = []
        for b, ix in enumerate(idx):
            n = len(ix)
            forces = g[:, b, :n]
            out = MemberOutputs(energies=e[:, b] + self.shift_energy(ix),
                                forces=forces if (member_forces or k == 1) else None,
                                dipoles=mu[:, column[b]] if b in column else np.zeros((0, 3)),
                                mean_forces=None if member_forces or k == 1 else forces[0])
            preds.append(self.summarize(out, n))
        return preds

    # ---------------------------------------------------------------- composition
    def subset(self, energy_members=None, dipole_members=None) -> "Committee":
        """A committee made of some of the members (e.g. the share of one MPI rank)."""
        e_idx = list(range(self.n_energy_members)) if energy_members is None else list(energy_members)
        d_idx = list(range(self.n_dipole_members)) if dipole_members is None else list(dipole_members)
        return _assemble(self, [(self, e_idx)], [(self, d_idx)])

    @staticmethod
    def stack(committees: list["Committee"]) -> "Committee":
        """One committee from several (members trained in separate processes)."""
        first = committees[0]
        return _assemble(first, [(c, list(range(c.n_energy_members))) for c in committees],
                         [(c, list(range(c.n_dipole_members))) for c in committees])


_UNSTACKED = {"descriptor.basis.centres", "rbf.centres", "masses"}


def _stack_state(parts: list[tuple[torch.nn.Module, list[int]]]) -> dict:
    states = [(m.state_dict(), ix) for m, ix in parts if m is not None and ix]
    if not states:
        return {}
    out = {}
    for key, value in states[0][0].items():
        out[key] = value if key in _UNSTACKED else torch.cat([s[key][ix] for s, ix in states])
    return out


def _energy_model(config: ModelConfig, k: int) -> EnergyModel | None:
    if k == 0:
        return None
    return EnergyModel(len(config.species), k, config.hidden, config.n_basis, config.n_radial,
                       config.r_min, config.cutoff)


def _dipole_model(config: ModelConfig, j: int) -> DipoleModel | None:
    if j == 0:
        return None
    masses = [float(atomic_masses[atomic_numbers[s]]) for s in config.species]
    return DipoleModel(len(config.species), masses, j, config.dipole_features, config.dipole_interactions,
                       config.dipole_gaussians, config.dipole_cutoff)


def _assemble(template: Committee, energy_parts, dipole_parts) -> Committee:
    k = sum(len(ix) for c, ix in energy_parts if c.energy_model is not None)
    j = sum(len(ix) for c, ix in dipole_parts if c.dipole_model is not None)
    dtype, device = template.dtype, template.device
    em, dm = _energy_model(template.config, k), _dipole_model(template.config, j)
    if em is not None:
        em.load_state_dict(_stack_state([(c.energy_model, ix) for c, ix in energy_parts]))
        em.to(device=device, dtype=dtype)
    if dm is not None:
        dm.load_state_dict(_stack_state([(c.dipole_model, ix) for c, ix in dipole_parts]))
        dm.to(device=device, dtype=dtype)
    return Committee(template.config, em, dm, template.energy_shift.copy(), dict(template.calibration),
                     template.version, dict(template.metadata))


def build_committee(config: ModelConfig | None = None, n_members: int = 3, n_dipole: int = 1,
                    seed: int = 0, energy_shift=None) -> Committee:
    """An untrained committee (random weights from ``seed``)."""
    config = config or ModelConfig()
    if not 1 <= n_members <= 8:
        raise ValueError(f"committee size must be between 1 and 8, got {n_members}")
    torch.manual_seed(seed)
    shift = np.zeros(len(config.species)) if energy_shift is None else np.asarray(energy_shift, dtype=float)
    return Committee(config, _energy_model(config, n_members), _dipole_model(config, n_dipole), shift)


# -------------------------------------------------------------------- files
def save_committee(committee: Committee, path: str | Path) -> Path:
    from driver import __version__

    def write(folder: Path):
        digest = hashlib.sha256()
        for name, model in (("energy.pt", committee.energy_model), ("dipole.pt", committee.dipole_model)):
            if model is not None:
                state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                torch.save(state, folder / name)
                digest.update((folder / name).read_bytes())
        if committee.version in ("", "untrained") or "-" not in committee.version:
            committee.version = f"{committee.version or 'model'}-{digest.hexdigest()[:10]}"
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "nanosil_version": __version__,
            "species": list(committee.species),
            "units": {"length": "Å", "energy": "eV", "forces": "eV/Å", "dipole": "e·Å",
                      "energy_std_per_atom": "eV/atom", "max_force_std": "eV/Å"},
            "config": dataclasses.asdict(committee.config),
            "n_energy_members": committee.n_energy_members, "n_dipole_members": committee.n_dipole_members,
            "energy_shift_eV": {s: float(v) for s, v in zip(committee.species, committee.energy_shift)},
            "calibration": committee.calibration, "version": committee.version,
            "metadata": committee.metadata,
        }
        (folder / "committee.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    write_dir(Path(path), write)
    return Path(path)


class ModelFileError(ValueError):
    """A committee folder whose files are damaged or not nanosil's: the message names the file."""


def _brief(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception's message on one line (torch's run to a paragraph)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _unreadable_checkpoint(file: Path, exc: BaseException) -> str:
    with open(file, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        return f"{file}: not a nanosil checkpoint ({'an empty file' if not head else 'not a torch weights file'})"
    reason = "torch cannot read the archive" if isinstance(exc, OSError) else _brief(exc)
    return f"{file}: truncated or damaged checkpoint ({reason}); retrain or restore the file"


def _read_meta(meta_file: Path) -> dict:
    try:
        text = meta_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{meta_file}: cannot be read ({_brief(exc)})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.strip():
            raise ModelFileError(f"{meta_file}: empty file, not a nanosil committee") from None
        if exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip()):
            raise ModelFileError(f"{meta_file}: truncated (the JSON ends early, at line {exc.lineno}); "
                                 f"retrain or restore the file") from None
        raise ModelFileError(f"{meta_file}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); "
                             f"not a nanosil committee") from None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{meta_file}: not a nanosil committee (a JSON {type(meta).__name__}, not an object)")
    return meta


def load_committee(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> Committee:
    """Read a committee folder, its members in ``dtype`` on ``device`` (``cpu``, ``cuda``, ``auto`` or a
    torch.device: :func:`driver.device.resolve_device`; the weights are read onto the CPU, with
    ``weights_only=True``, then moved). Raises FileNotFoundError when ``path`` has no ``committee.json``,
    :class:`ModelFileError` (a ValueError naming the file) when a file is truncated, damaged or not nanosil's,
    and :class:`driver.device.DeviceError` (a ValueError) for cuda without CUDA."""
    from driver.device import resolve_device

    device = resolve_device(device)
    path = Path(path)
    meta_file = path / "committee.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a nanosil model folder (no committee.json)")
    meta = _read_meta(meta_file)
    if meta.get("format") != FORMAT:
        raise ModelFileError(f"{meta_file}: not a nanosil committee (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{meta_file}: checkpoint format version {meta.get('format_version')} is incompatible "
                             f"with this nanosil, which reads version {FORMAT_VERSION}; retrain or use the "
                             f"nanosil version that wrote it ({meta.get('nanosil_version')})")
    missing = [k for k in ("config", "n_energy_members", "n_dipole_members", "energy_shift_eV") if k not in meta]
    if missing:
        raise ModelFileError(f"{meta_file}: missing key(s) {', '.join(missing)}: damaged or not written by nanosil")
    sizes = {k: meta[k] for k in ("n_energy_members", "n_dipole_members")}
    bad = [f"{k}={v!r}" for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad or sizes["n_energy_members"] + sizes["n_dipole_members"] == 0:
        raise ModelFileError(f"{meta_file}: invalid member counts ({', '.join(bad) or 'no members'})")
    try:
        if not isinstance(meta["config"], dict):
            raise TypeError(f"'config' is a {type(meta['config']).__name__}, not an object")
        config = ModelConfig(**meta["config"])
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{meta_file}: invalid model config ({_brief(exc)})") from None
    shifts = meta["energy_shift_eV"]
    lacking = [s for s in config.species if not isinstance(shifts, dict) or s not in shifts]
    if lacking:
        raise ModelFileError(f"{meta_file}: energy_shift_eV lacks species {', '.join(lacking)}")
    try:
        shift = np.array([float(shifts[s]) for s in config.species], dtype=float)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{meta_file}: invalid energy_shift_eV ({_brief(exc)})") from None
    em = _energy_model(config, sizes["n_energy_members"])
    dm = _dipole_model(config, sizes["n_dipole_members"])
    for name, model, count in (("energy.pt", em, sizes["n_energy_members"]),
                               ("dipole.pt", dm, sizes["n_dipole_members"])):
        if model is None:
            continue
        file = path / name
        if not file.is_file():
            raise ModelFileError(f"{file}: missing ({meta_file.name} lists {count} member(s) for it)")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, foreign pickle, I/O error: torch raises many kinds
            raise ModelFileError(_unreadable_checkpoint(file, exc)) from None
        if not isinstance(state, dict):
            raise ModelFileError(f"{file}: not a nanosil checkpoint (holds a {type(state).__name__}, not weights)")
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{file}: does not match {meta_file.name} (not this committee's checkpoint: "
                                 f"{_brief(exc, 200)})") from None
        model.to(device=device, dtype=dtype)
        model.eval()
    calibration = meta.get("calibration", {"energy": 1.0, "forces": 1.0})
    if not isinstance(calibration, dict):
        raise ModelFileError(f"{meta_file}: invalid calibration ({calibration!r})")
    metadata = meta.get("metadata", {})
    return Committee(config, em, dm, shift, calibration, meta.get("version", "unknown"),
                     metadata if isinstance(metadata, dict) else {})
