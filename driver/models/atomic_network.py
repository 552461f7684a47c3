"""The atomic network of :class:`~driver.models.energy_model.EnergyModel` at inference, with a hand-written
input-gradient backward and a choice of GEMM library.

At inference (frozen weights, ``fast=True``) the network x -> silu(gain x W + b) -> ... -> gain h w + b is
one autograd Function, :class:`InferenceNetwork`: its forward keeps the pre-activations, its backward is the
chain of matmuls with SiLU's derivative (``d @ (gain W)^T`` per layer), the same math as autograd through the
layers, with no graph and no weight gradients. Its backward is not differentiable again: training keeps its
own path (:mod:`driver.training`), Hessians go through autograd (``fast=False``).

The four large GEMMs per member (forward and input gradient through the hidden layers) run in the library
that ``NANOSIL_GEMM`` names:

- ``torch``: torch's batched matmuls (MKL in the PyTorch wheels), one ``baddbmm``/``bmm`` for all K members;
- ``mkl_packed``: MKL's packed-weight sgemm (``torch.ops.mkl._mkl_linear``, the weights reordered once per
  row count), member by member;
- ``openblas``: numpy's OpenBLAS (``np.matmul`` on float32, one call per member into a shared buffer), with
  numpy's BLAS pool set to torch's thread count; float32 only (float64 models use ``torch``);
- ``autograd``: not this Function but autograd through the layers, as for training (the reference);
- ``auto`` (default): the fastest of these on this host, chosen once per process by timing the network's
  GEMMs at a P10-sized shape (50 atoms, K members) in the first call; an alternative must beat ``torch`` by
  :data:`AUTO_MARGIN` to be chosen (see :func:`chosen`).

Every backend computes the same products in float32 and agrees with autograd through the layers to float32
rounding (tested); which one ran is :func:`chosen`.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

BACKENDS = ("torch", "mkl_packed", "openblas")
AUTO_MARGIN = 0.10      # an alternative to torch must be this much faster (relative) to be chosen by auto
AUTO_ATOMS = 50         # rows (atoms) of the calibration: P10
_choice: dict[tuple, str] = {}   # auto's decision per (K, dtype), one per process


def requested() -> str:
    """The backend asked for by ``NANOSIL_GEMM`` (read at every call, so tests and benchmarks can switch)."""
    name = os.environ.get("NANOSIL_GEMM", "auto").strip().lower() or "auto"
    if name not in BACKENDS + ("auto", "autograd"):
        raise ValueError(f"NANOSIL_GEMM={name!r}: expected one of auto, {', '.join(BACKENDS)}, autograd")
    return name


def _usable(backend: str, dtype: torch.dtype) -> bool:
    if backend == "mkl_packed":
        return dtype == torch.float32 and torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
    if backend == "openblas":
        return dtype == torch.float32
    return True


class _Prepared:
    """A model's weights laid out for one backend (rebuilt when a weight changes: see :func:`_prepared`)."""

    def __init__(self, model: nn.Module, backend: str):
        layers = model.layers
        self.backend = backend
        self.mean, self.std = model.feature_mean, model.feature_std
        hidden = layers[:-1]
        self.k = layers[0].weight.shape[0]
        # forward: a = gain x W + b; input gradient: d_x = d_a (gain W)^T
        self.w = [layer.weight for layer in hidden]
        self.b = [layer.bias for layer in hidden]
        self.gain = [layer.gain for layer in hidden]
        self.w_back = [(layer.weight * layer.gain).transpose(1, 2).contiguous() for layer in hidden]
        last = layers[-1]
        self.w_out, self.b_out, self.gain_out = last.weight, last.bias, last.gain
        self.u_out = (last.weight * last.gain).transpose(1, 2)              # (K, 1, n_last): dO/dh_last
        if backend == "mkl_packed":
            # torch.nn.functional.linear convention: y = x A^T, A (n_out, n_in)
            self.fwd_lin = [[(layer.weight[k] * layer.gain).t().contiguous() for k in range(self.k)]
                            for layer in hidden]
            self.back_lin = [[(layer.weight[k] * layer.gain).contiguous() for k in range(self.k)]
                             for layer in hidden]
            self.bias2d = [[layer.bias[k, 0].contiguous() for k in range(self.k)] for layer in hidden]
            self.packed: dict[int, tuple] = {}
        if backend == "openblas":
            self.np_fwd = [(layer.weight * layer.gain).detach().numpy() for layer in hidden]     # (K, n_in, n_out)
            self.np_back = [w.detach().numpy() for w in self.w_back]                           # (K, n_out, n_in)

    def packs(self, m: int):
        """MKL's packed weights for ``m`` rows (cached; MKL falls back to plain sgemm for other row counts)."""
        if m not in self.packed:
            if len(self.packed) >= 8:
                self.packed.pop(next(iter(self.packed)))
            reorder = torch.ops.mkl._mkl_reorder_linear_weight
            self.packed[m] = ([[reorder(a, m) for a in per] for per in self.fwd_lin],
                              [[reorder(a, m) for a in per] for per in self.back_lin])
        return self.packed[m]

    # ------------------------------------------------------------ the hidden layers' GEMMs, by backend
    def linear(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """gain x W + b for all members, x (K, M, n_in)."""
        if self.backend == "torch":
            return torch.baddbmm(self.b[layer], x, self.w[layer], alpha=self.gain[layer])
        if self.backend == "mkl_packed":
            m = x.shape[1]
            fwd, _ = self.packs(m)
            return torch.stack([torch.ops.mkl._mkl_linear(x[k], fwd[layer][k], self.fwd_lin[layer][k],
                                                          self.bias2d[layer][k], m) for k in range(self.k)])
        xn = x.detach().numpy()
        w = self.np_fwd[layer]
        out = np.empty((self.k, x.shape[1], w.shape[2]), dtype=np.float32)
        for k in range(self.k):
            np.matmul(xn[k], w[k], out=out[k])
        return torch.from_numpy(out).add_(self.b[layer])

    def linear_back(self, layer: int, d: torch.Tensor) -> torch.Tensor:
        """d (gain W)^T for all members, d (K, M, n_out)."""
        if self.backend == "torch":
            return torch.bmm(d, self.w_back[layer])
        if self.backend == "mkl_packed":
            m = d.shape[1]
            _, back = self.packs(m)
            return torch.stack([torch.ops.mkl._mkl_linear(d[k], back[layer][k], self.back_lin[layer][k], None, m)
                                for k in range(self.k)])
        dn = d.detach().numpy()
        w = self.np_back[layer]
        out = np.empty((self.k, d.shape[1], w.shape[2]), dtype=np.float32)
        for k in range(self.k):
            np.matmul(dn[k], w[k], out=out[k])
        return torch.from_numpy(out)

    # ------------------------------------------------------------ the network
    def forward(self, g: torch.Tensor, keep: bool):
        """Atomic outputs (K, M) from the raw features g (K, M, F); the pre-activations when ``keep``."""
        x = (g - self.mean) / self.std
        pre = []
        for layer in range(len(self.w)):
            a = self.linear(layer, x)
            if keep:
                pre.append(a)
            x = nn.functional.silu(a)
        out = torch.baddbmm(self.b_out, x, self.w_out, alpha=self.gain_out)[..., 0]
        return out, pre

    def backward(self, grad_out: torch.Tensor, pre: list[torch.Tensor]) -> torch.Tensor:
        """dL/dg (K, M, F) from dL/dout (K, M)."""
        d = grad_out[..., None] * self.u_out                                  # (K, M, n_last)
        for layer in range(len(self.w) - 1, -1, -1):
            d = self.linear_back(layer, torch.ops.aten.silu_backward(d, pre[layer]))
        return d / self.std


def _key(model: nn.Module) -> tuple:
    tensors = [t for layer in model.layers for t in (layer.weight, layer.bias)] + [model.feature_mean,
                                                                                  model.feature_std]
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def _prepared(model: nn.Module, backend: str) -> _Prepared:
    """The model's weights for ``backend``, cached on the model and rebuilt when any of them changes
    (in-place update, ``load_state_dict``, ``.to(dtype)``)."""
    cache = model.__dict__.setdefault("_inference_network", {})
    key = _key(model)
    entry = cache.get(backend)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, _Prepared(model, backend))
        cache[backend] = entry
    return entry[1]


def _time_backend(prep: _Prepared, g: torch.Tensor, d: torch.Tensor, repeat: int) -> float:
    """Best of ``repeat`` timings (s) of the hidden layers' GEMMs, forward and input gradient."""
    best = float("inf")
    if prep.backend == "openblas":
        _hold_blas_threads()
    with torch.no_grad():
        for _ in range(repeat):
            t = time.perf_counter()
            x = g
            for layer in range(len(prep.w)):
                x = prep.linear(layer, x)
            for layer in range(len(prep.w) - 1, -1, -1):
                d_in = prep.linear_back(layer, d[layer])
            best = min(best, time.perf_counter() - t)
    return best


def calibrate(model: nn.Module, atoms: int = AUTO_ATOMS, repeat: int = 7) -> dict[str, float]:
    """Seconds of each usable backend's GEMMs for ``model`` at ``atoms`` rows (best of ``repeat``, interleaved
    so that a busy neighbour slows all alike)."""
    dtype = model.layers[0].weight.dtype
    k = model.layers[0].weight.shape[0]
    widths = [layer.weight.shape[1] for layer in model.layers[:-1]]
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(k, atoms, widths[0], generator=gen, dtype=dtype)
    d = [torch.randn(k, atoms, layer.weight.shape[2], generator=gen, dtype=dtype) for layer in model.layers[:-1]]
    preps = {b: _prepared(model, b) for b in BACKENDS if _usable(b, dtype)}
    times = {b: float("inf") for b in preps}
    for _ in range(3):  # rounds: one warm-up call each, then the timed calls
        for b, prep in preps.items():
            _time_backend(prep, g, d, 1)
            times[b] = min(times[b], _time_backend(prep, g, d, max(1, repeat // 3)))
    return times


def chosen(model: nn.Module) -> str:
    """The backend the model's inference network uses now (``NANOSIL_GEMM``, or auto's choice)."""
    name = requested()
    dtype = model.layers[0].weight.dtype
    if name == "autograd":
        return name
    if name != "auto":
        return name if _usable(name, dtype) else "torch"
    key = (model.layers[0].weight.shape[0], dtype)
    if key not in _choice:
        times = calibrate(model)
        best = min(times, key=times.get)
        _choice[key] = best if times[best] < (1 - AUTO_MARGIN) * times["torch"] else "torch"
    return _choice[key]


_blas_pool = {"threads": None}


def _hold_blas_threads() -> None:
    """numpy's BLAS pool set to torch's thread count before the OpenBLAS backend runs (OpenBLAS otherwise
    starts one thread per core on top of the process's own). Set once, and again only when torch's count
    changes: a per-call limit (threadpoolctl's context) costs ~50 us. Without threadpoolctl,
    ``OPENBLAS_NUM_THREADS`` governs."""
    n = torch.get_num_threads()
    if _blas_pool["threads"] == n:
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        _blas_pool["threads"] = n
        return
    threadpool_limits(limits=n, user_api="blas")
    _blas_pool["threads"] = n


class InferenceNetwork(torch.autograd.Function):
    """Atomic outputs (K, M) of the network from raw features g (K, M, F), with the input gradient as its
    backward (once-differentiable)."""

    @staticmethod
    def forward(ctx, g, prep):
        if prep.backend == "openblas":
            _hold_blas_threads()
        out, pre = prep.forward(g, ctx.needs_input_grad[0])
        ctx.prep, ctx.pre = prep, pre
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad = ctx.prep.backward(grad_out.contiguous(), ctx.pre)
        ctx.pre = None
        return grad, None


def atomic_outputs(model: nn.Module, g: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """(K, M) outputs of ``model``'s atomic network for raw features g (K, M, F), through the inference
    network in ``backend`` (default: :func:`chosen`)."""
    prep = _prepared(model, backend or chosen(model))
    return InferenceNetwork.apply(g.contiguous(), prep)
