"""The atomic network of :class:`~driver.models.energy_model.EnergyModel` at inference: a hand-written forward
and input gradient, and the choice of GEMM library.

At inference (frozen weights) the network x -> silu(gain x W + b) -> ... -> gain h w + b needs no autograd:
the forward keeps the pre-activations and the input gradient is the chain of matmuls with SiLU's derivative,
``d_l = silu'(a_l) * (d_{l+1} (gain W_{l+1})^T)`` -- the same math as autograd through the layers, without a
graph or weight gradients. :meth:`Prepared.forward` / :meth:`Prepared.backward` are that chain;
:class:`InferenceNetwork` wraps it as a once-differentiable autograd Function for the autograd paths (the
PyTorch descriptor); :meth:`EnergyModel.infer <driver.models.energy_model.EnergyModel.infer>` calls it
directly. Training keeps its own path (:mod:`driver.training`), Hessians go through autograd (``fast=False``).

The four large GEMMs per member (forward and input gradient through the hidden layers) run in the library
that the environment variable ``NANOSIL_GEMM`` names (read at every call):

- ``torch``: torch's batched matmuls (MKL in the PyTorch wheels), one ``baddbmm`` / ``bmm`` for all K members,
  the input-gradient weights stored transposed (contiguous) once;
- ``openblas``: numpy's OpenBLAS (``np.matmul`` on float32, one call per member into one buffer), numpy's BLAS
  pool set to torch's thread count; float32 models on the CPU only (others use ``torch``). MKL takes a slow sgemm path
  on some AMD processors, where OpenBLAS is the faster library;
- ``autograd``: none of this: autograd through the layers, as before this module (the reference);
- ``auto`` (default): the faster of ``torch`` and ``openblas`` on this host, chosen once per process and
  committee size by timing both on the model's own GEMMs at P10's 50 atoms (:func:`chosen`); ``openblas``
  must win by :data:`AUTO_MARGIN` to be chosen, so that a noisy neighbour does not flip a near tie.

Both libraries compute the same products in float32; results agree with autograd through the layers to float32
rounding (tests/test_models.py).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

BACKENDS = ("torch", "openblas")
AUTO_MARGIN = 0.10      # openblas must be this much faster than torch (relative) for auto to choose it
AUTO_ATOMS = 50         # rows (atoms) of auto's timing: P10
_choice: dict[tuple, str] = {}       # auto's decision per (K, widths, dtype, threads), one per process
_blas_pool = {"threads": None}


def requested() -> str:
    """The setting of ``NANOSIL_GEMM``: auto (default), torch, openblas or autograd."""
    name = os.environ.get("NANOSIL_GEMM", "auto").strip().lower() or "auto"
    if name not in BACKENDS + ("auto", "autograd"):
        raise ValueError(f"NANOSIL_GEMM={name!r}: expected one of auto, {', '.join(BACKENDS)}, autograd")
    return name


def usable(backend: str, dtype: torch.dtype) -> bool:
    return backend != "openblas" or dtype == torch.float32


def _hold_blas_threads() -> None:
    """numpy's BLAS pool set to torch's thread count before OpenBLAS runs (OpenBLAS otherwise starts one
    thread per core on top of the process's own). Set once, and again only when torch's count changes: a
    limit per call (threadpoolctl's context manager) costs ~50 us. Without threadpoolctl,
    ``OPENBLAS_NUM_THREADS`` governs."""
    n = torch.get_num_threads()
    if _blas_pool["threads"] != n:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            pass
        else:
            limiter = threadpool_limits(limits=n, user_api="blas")
            _blas_pool.setdefault("limiter", limiter)  # the first one knows the original limits
        _blas_pool["threads"] = n


def _release_blas_threads() -> None:
    """Undo :func:`_hold_blas_threads` (numpy's BLAS pool back to what it was before)."""
    limiter = _blas_pool.pop("limiter", None)
    if limiter is not None:
        limiter.restore_original_limits()
    _blas_pool["threads"] = None


class Prepared:
    """A model's network laid out for one backend; built by :func:`prepared`, which rebuilds it when a weight
    changes."""

    def __init__(self, model: nn.Module, backend: str):
        hidden, last = model.layers[:-1], model.layers[-1]
        self.backend = backend
        self.k = last.weight.shape[0]
        self.mean, self.std = model.feature_mean, model.feature_std
        self.w = [layer.weight for layer in hidden]                              # (K, n_in, n_out)
        self.b = [layer.bias if layer.bias is not None else layer.weight.new_zeros(self.k, 1, layer.weight.shape[2])
                  for layer in hidden]                                           # (K, 1, n_out)
        self.gain = [layer.gain for layer in hidden]
        # the input gradient's weights, transposed once; the first layer's also take the features' 1/std
        # (d_g = d_a (gain W)^T / std), which saves a pass over the features
        back = [layer.weight * layer.gain for layer in hidden]
        back[0] = back[0] / model.feature_std.transpose(1, 2)
        self.w_back = [w.transpose(1, 2).contiguous() for w in back]
        self.w_out, self.gain_out = last.weight, last.gain
        self.b_out = last.bias if last.bias is not None else last.weight.new_zeros(self.k, 1, 1)
        self.u_out = (last.weight * last.gain).transpose(1, 2)                  # (K, 1, n_last): dO/dh_last
        if backend == "openblas":
            self.np_w = [(layer.weight * layer.gain).numpy() for layer in hidden]  # gain folded in
            self.np_back = [w.numpy() for w in self.w_back]

    # ------------------------------------------------------------ the hidden layers' GEMMs
    def _matmul_np(self, x: torch.Tensor, w: np.ndarray) -> torch.Tensor:
        xn = x.numpy()
        out = np.empty((self.k, x.shape[1], w.shape[2]), dtype=np.float32)
        for k in range(self.k):
            np.matmul(xn[k], w[k], out=out[k])
        return torch.from_numpy(out)

    def linear(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """gain x W + b, x (K, M, n_in) -> (K, M, n_out)."""
        if self.backend == "openblas":
            return self._matmul_np(x, self.np_w[layer]).add_(self.b[layer])
        return torch.baddbmm(self.b[layer], x, self.w[layer], alpha=self.gain[layer])

    def linear_back(self, layer: int, d: torch.Tensor) -> torch.Tensor:
        """d (gain W)^T, d (K, M, n_out) -> (K, M, n_in)."""
        if self.backend == "openblas":
            return self._matmul_np(d, self.np_back[layer])
        return torch.bmm(d, self.w_back[layer])

    # ------------------------------------------------------------ the network
    def forward(self, g: torch.Tensor, keep: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Atomic outputs (K, M) from the raw features g (K, M, F), and the pre-activations when ``keep``
        (for :meth:`backward`). No autograd: call under ``torch.no_grad()`` or from a Function."""
        if self.backend == "openblas":
            _hold_blas_threads()
        x = (g - self.mean) / self.std
        pre = []
        for layer in range(len(self.w)):
            a = self.linear(layer, x)
            if keep:
                pre.append(a)
            x = nn.functional.silu(a)
        return torch.baddbmm(self.b_out, x, self.w_out, alpha=self.gain_out)[..., 0], pre

    def backward(self, grad_out: torch.Tensor, pre: list[torch.Tensor]) -> torch.Tensor:
        """dL/dg (K, M, F) from dL/dout (K, M) and the forward's pre-activations."""
        if self.backend == "openblas":
            _hold_blas_threads()
        d = grad_out[..., None] * self.u_out                                  # (K, M, n_last)
        for layer in range(len(self.w) - 1, -1, -1):
            d = self.linear_back(layer, torch.ops.aten.silu_backward(d, pre[layer]))
        return d                                                              # 1/std is in w_back[0]

    def gemms(self, x: torch.Tensor, d: list[torch.Tensor]) -> None:
        """The hidden layers' GEMMs alone, forward from x (K, M, n_in) and input gradient from d[l]
        (K, M, n_out of layer l): what :func:`calibrate` and bench/model_speed.py time."""
        if self.backend == "openblas":
            _hold_blas_threads()
        for layer in range(len(self.w)):
            x = self.linear(layer, x)
        for layer in range(len(self.w) - 1, -1, -1):
            self.linear_back(layer, d[layer])


def _key(model: nn.Module) -> tuple:
    tensors = [t for layer in model.layers for t in (layer.weight, layer.bias) if t is not None]
    tensors += [model.feature_mean, model.feature_std]
    return tuple((t.data_ptr(), t._version) for t in tensors)   # a new dtype is a new data pointer


def prepared(model: nn.Module, backend: str | None = None) -> Prepared:
    """``model``'s network for ``backend`` (default :func:`chosen`), cached on the model and rebuilt when any
    weight changes (in-place update, ``load_state_dict``, ``.to(dtype)``)."""
    cache = model.__dict__.setdefault("_inference_network", {})
    if backend is None:
        weight = model.layers[0].weight
        setting = (os.environ.get("NANOSIL_GEMM"), weight.dtype, weight.device, torch.get_num_threads())
        last = cache.get("chosen")
        if last is None or last[0] != setting:
            last = (setting, chosen(model))
            cache["chosen"] = last
        backend = last[1]
    key = _key(model)
    entry = cache.get(backend)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, Prepared(model, backend))
        cache[backend] = entry
    return entry[1]


def gemm_inputs(model: nn.Module, atoms: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Random inputs of :meth:`Prepared.gemms` for ``atoms`` rows of each member."""
    gen = torch.Generator().manual_seed(seed)
    dtype = model.layers[0].weight.dtype
    k, n_in = model.layers[0].weight.shape[:2]
    x = torch.randn(k, atoms, n_in, generator=gen, dtype=dtype)
    d = [torch.randn(k, atoms, layer.weight.shape[2], generator=gen, dtype=dtype) for layer in model.layers[:-1]]
    return x, d


def calibrate(model: nn.Module, atoms: int = AUTO_ATOMS, rounds: int = 3, repeat: int = 3) -> dict[str, float]:
    """Seconds of each usable backend's GEMMs (:meth:`Prepared.gemms`) for ``model`` at ``atoms`` rows: the
    best of ``rounds`` x ``repeat`` calls, the backends taking turns round by round (a busy neighbour slows
    them alike), after one warm-up call each."""
    dtype = model.layers[0].weight.dtype
    x, d = gemm_inputs(model, atoms)
    preps = {b: prepared(model, b) for b in BACKENDS if usable(b, dtype)}
    times = {b: float("inf") for b in preps}
    try:
        with torch.no_grad():
            for prep in preps.values():
                prep.gemms(x, d)
            for _ in range(rounds):
                for b, prep in preps.items():
                    for _ in range(repeat):
                        t = time.perf_counter()
                        prep.gemms(x, d)
                        times[b] = min(times[b], time.perf_counter() - t)
    finally:
        _release_blas_threads()  # timing OpenBLAS leaves numpy's pool as it found it
    return times


def chosen(model: nn.Module) -> str:
    """The backend the model's inference network runs in now: ``NANOSIL_GEMM``, or auto's choice (timed on
    the first call for each committee size, widths, dtype and thread count). Weights off the CPU (a GPU)
    always run in ``torch``: OpenBLAS is CPU code."""
    name = requested()
    dtype = model.layers[0].weight.dtype
    if name in ("torch", "autograd"):
        return name
    if model.layers[0].weight.device.type != "cpu":
        return "torch"
    if name == "openblas":
        return name if usable(name, dtype) else "torch"
    if not usable("openblas", dtype):
        return "torch"
    key = (tuple(tuple(layer.weight.shape) for layer in model.layers), dtype, torch.get_num_threads())
    if key not in _choice:
        times = calibrate(model)
        _choice[key] = "openblas" if times["openblas"] < (1 - AUTO_MARGIN) * times["torch"] else "torch"
    return _choice[key]


class InferenceNetwork(torch.autograd.Function):
    """Atomic outputs (K, M) from raw features g (K, M, F) with the hand-written input gradient as backward
    (once-differentiable: no Hessians through it)."""

    @staticmethod
    def forward(ctx, g, prep):
        out, pre = prep.forward(g, ctx.needs_input_grad[0])
        ctx.prep, ctx.pre = prep, pre
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad = ctx.prep.backward(grad_out.contiguous(), ctx.pre)
        ctx.pre = None
        return grad, None


def atomic_outputs(model: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """(K, M) outputs of ``model``'s atomic network for raw features g (K, M, F), differentiable in g."""
    return InferenceNetwork.apply(g.contiguous(), prepared(model))
