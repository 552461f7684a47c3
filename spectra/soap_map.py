"""The SOAP-PCA map of the paper's Fig. 7 b: is a new cluster inside what the model was trained on?

Every structure becomes one global SOAP vector (dscribe ``SOAP``, species Mg/Si/O by default plus any other
element present, ``r_cut`` 5 Å, ``n_max`` 6, ``l_max`` 4, no periodicity, averaged over the atoms:
``average='inner'`` averages the neighbour densities before the power spectrum, ``'outer'`` the power
spectra). The map is the plane of the first two principal axes of the *training* set (numpy SVD of the
training descriptors centred on their mean); test and transfer structures are projected on those axes.

Distances are measured in the full descriptor space, not in the plane: the distance of a structure to the
training set is its Euclidean distance to the nearest training descriptor, in units of the training set's
own median nearest-neighbour distance (each training point to its nearest other training point). A value
near or below 1 reads as inside what the model saw; well above 1 as outside. Training points get their
leave-one-out value.

dscribe is an optional dependency (``pip install nanosil[analysis]``); without it
:class:`MissingPackageError` says so in one line.
"""
from __future__ import annotations

import io as _io
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

DEFAULT_SPECIES = ("Mg", "Si", "O")
AVERAGES = ("inner", "outer")
MISSING_DSCRIBE = "the SOAP map needs dscribe: pip install nanosil[analysis]"
CSV_COLUMNS = ("set", "name", "pc1", "pc2", "distance")


class MissingPackageError(ImportError):
    """An optional package is not installed; the message names what to install."""


@dataclass(frozen=True)
class SoapSettings:
    r_cut: float = 5.0
    n_max: int = 6
    l_max: int = 4
    sigma: float = 0.5
    average: str = "inner"

    def __post_init__(self):
        if self.average not in AVERAGES:
            raise ValueError(f"unknown SOAP average {self.average!r}; choose from {', '.join(AVERAGES)}")
        if not (self.r_cut > 1.0 and np.isfinite(self.r_cut)):
            raise ValueError(f"SOAP r_cut must be > 1 Å, got {self.r_cut}")
        if self.n_max < 1 or self.l_max < 0:
            raise ValueError(f"SOAP n_max must be >= 1 and l_max >= 0, got {self.n_max}, {self.l_max}")
        if not (self.sigma > 0):
            raise ValueError(f"SOAP sigma must be positive, got {self.sigma}")


def _soap_class():
    try:
        from dscribe.descriptors import SOAP
    except ImportError:
        raise MissingPackageError(MISSING_DSCRIBE) from None
    return SOAP


def species_of(structures: Sequence, base: Sequence[str] = DEFAULT_SPECIES) -> list[str]:
    """``base`` plus every other element found in ``structures`` (ASE Atoms), in a fixed order."""
    found = {s for atoms in structures for s in atoms.get_chemical_symbols()}
    return list(base) + sorted(found - set(base))


def global_descriptors(structures: Sequence, settings: SoapSettings = SoapSettings(),
                       species: Sequence[str] | None = None, n_jobs: int = 1) -> np.ndarray:
    """(M, D) global SOAP vectors of ``structures`` (ASE Atoms, any sizes; no periodicity)."""
    SOAP = _soap_class()
    structures = list(structures)
    if not structures:
        return np.zeros((0, 0))
    species = list(species) if species is not None else species_of(structures)
    soap = SOAP(species=species, r_cut=settings.r_cut, n_max=settings.n_max, l_max=settings.l_max,
                sigma=settings.sigma, average=settings.average, periodic=False, sparse=False)
    clean = []
    for atoms in structures:
        a = atoms.copy()
        a.pbc = False
        a.calc = None
        clean.append(a)
    out = soap.create(clean, n_jobs=n_jobs) if len(clean) > 1 else soap.create(clean[0])[None]
    return np.asarray(out, dtype=float).reshape(len(clean), -1)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)), numerically safe for near-identical vectors."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


@dataclass
class SoapMap:
    """Principal axes of a training set of descriptors, and distances to it."""

    train: np.ndarray                     # (M, D) training descriptors
    mean: np.ndarray = field(init=False)  # (D,)
    axes: np.ndarray = field(init=False)  # (2, D) first two principal axes (rows, unit norm)
    explained: np.ndarray = field(init=False)  # fraction of the training variance along each axis
    scale: float = field(init=False)      # median nearest-neighbour distance within the training set
    train_nn: np.ndarray = field(init=False)  # (M,) each training point's distance to its nearest other one

    def __post_init__(self):
        x = np.asarray(self.train, dtype=float)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"the SOAP map needs at least 2 training structures, got {len(x)}")
        self.train = x
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        axes = vt[:2]
        # a fixed sign per axis (largest component positive), so maps of the same data agree
        signs = np.sign(axes[np.arange(len(axes)), np.argmax(np.abs(axes), axis=1)])
        self.axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
        if len(self.axes) < 2:  # two training points span one axis: the second is zero
            self.axes = np.vstack([self.axes, np.zeros((2 - len(self.axes), x.shape[1]))])
        var = s**2
        total = var.sum()
        self.explained = (var[:2] / total if total > 0 else np.zeros(min(2, len(var))))
        d = _pairwise(x, x)
        np.fill_diagonal(d, np.inf)
        self.train_nn = d.min(1)
        positive = self.train_nn[self.train_nn > 0]
        self.scale = float(np.median(self.train_nn)) if np.median(self.train_nn) > 0 else (
            float(np.median(positive)) if len(positive) else float("nan"))

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, 2) coordinates on the training set's first two principal axes."""
        return (np.atleast_2d(x) - self.mean) @ self.axes.T

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(distance to the nearest training descriptor, its index) for each row of ``x``."""
        d = _pairwise(np.atleast_2d(x), self.train)
        k = np.argmin(d, axis=1)
        return d[np.arange(len(k)), k], k

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Nearest-training distance of each row of ``x`` in units of :attr:`scale` (> 1 reads as outside)."""
        return self.nearest(x)[0] / self.scale


@dataclass
class MapPoint:
    set: str
    name: str
    pc1: float
    pc2: float
    distance: float
    nearest: int = -1          # index of the nearest training structure (-1 for training points)


def build_map(train: Sequence, others: dict[str, tuple[Sequence[str], Sequence]] | None = None,
              settings: SoapSettings = SoapSettings(), train_names: Sequence[str] | None = None,
              n_jobs: int = 1) -> tuple[SoapMap, list[MapPoint]]:
    """The map of ``train`` (ASE Atoms) and the other sets ``{set name: (names, structures)}``.

    Returns the :class:`SoapMap` and one :class:`MapPoint` per structure (training points first, their
    distance leave-one-out)."""
    others = dict(others or {})
    every = list(train) + [a for _, structs in others.values() for a in structs]
    species = species_of(every)
    x_train = global_descriptors(train, settings, species, n_jobs)
    smap = SoapMap(x_train)
    names = list(train_names) if train_names is not None else [f"train:{i}" for i in range(len(train))]
    points = [MapPoint("train", n, float(p[0]), float(p[1]), float(d / smap.scale))
              for n, p, d in zip(names, smap.project(x_train), smap.train_nn)]
    for set_name, (set_names, structs) in others.items():
        structs = list(structs)
        if not structs:
            continue
        x = global_descriptors(structs, settings, species, n_jobs)
        dist, k = smap.nearest(x)
        for n, p, d, j in zip(set_names, smap.project(x), dist, k):
            points.append(MapPoint(set_name, str(n), float(p[0]), float(p[1]), float(d / smap.scale), int(j)))
    return smap, points


def write_map_csv(path: str | os.PathLike, points: Sequence[MapPoint]) -> None:
    """``set,name,pc1,pc2,distance`` (distance in units of the training median nearest-neighbour distance)."""
    from .atomic import write_text

    buf = _io.StringIO()
    buf.write(",".join(CSV_COLUMNS) + "\n")
    for p in points:
        name = p.name.replace(",", ";")
        buf.write(f"{p.set},{name},{p.pc1:.8g},{p.pc2:.8g},{p.distance:.6g}\n")
    write_text(path, buf.getvalue())


def plot_map(path: str | os.PathLike, smap: SoapMap, points: Sequence[MapPoint], title: str = "") -> None:
    """Training set in grey, test set in blue, transfer (and other) structures as labelled crosses."""
    from .plotting import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    by_set: dict[str, list[MapPoint]] = {}
    for p in points:
        by_set.setdefault(p.set, []).append(p)
    if "train" in by_set:
        t = by_set.pop("train")
        ax.scatter([p.pc1 for p in t], [p.pc2 for p in t], s=12, c="0.6", alpha=0.6, lw=0,
                   label=f"training ({len(t)})")
    if "test" in by_set:
        t = by_set.pop("test")
        ax.scatter([p.pc1 for p in t], [p.pc2 for p in t], s=14, c="tab:blue", alpha=0.7, lw=0,
                   label=f"test ({len(t)})")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"][1:]
    k = 0
    for set_name, pts in by_set.items():
        for p in pts:
            ax.scatter([p.pc1], [p.pc2], marker="x", s=60, lw=2, color=colors[k % len(colors)],
                       label=f"{p.name} (d = {p.distance:.2f})")
            k += 1
    ev = smap.explained
    ax.set_xlabel(f"PC1 ({100 * ev[0]:.0f} % of training variance)" if len(ev) > 0 else "PC1")
    ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f} % of training variance)" if len(ev) > 1 else "PC2")
    ax.set_title(title or "global SOAP, principal axes of the training set")
    ax.legend(frameon=False, fontsize=7, loc="best")
    try:
        _save(fig, path)
    finally:
        plt.close(fig)
