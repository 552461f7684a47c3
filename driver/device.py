"""Which torch device the models run on: ``--device cpu|cuda|auto`` of every command that runs a model, the
``device`` of :class:`driver.training.TrainConfig` (the active-learning ``[train]`` section) and of
:class:`driver.calculator.NanosilCalculator`.

- ``cpu`` (the default everywhere): the numbers of the CPU code paths, unchanged; the compiled descriptor
  (:mod:`driver.models.fast_kernels`) and ``NANOSIL_GEMM=openblas`` run only here.
- ``cuda`` (or ``cuda:N``): the PyTorch code paths on the GPU; refused with one line when this torch sees no
  CUDA device.
- ``auto``: ``cuda`` where ``torch.cuda.is_available()``, else ``cpu``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHOICES = ("cpu", "cuda", "auto")


class DeviceError(ValueError):
    """A device this process cannot use (one line; the commands exit with status 2)."""


def resolve_device(name: str | torch.device | None = "cpu", option: str = "--device") -> torch.device:
    """The torch device for ``name``: ``cpu``, ``cuda``, ``cuda:N``, ``auto`` (cuda when
    ``torch.cuda.is_available()``, else cpu) or a :class:`torch.device`; None is ``cpu``. ``option`` names
    the setting in the messages. Raises :class:`DeviceError` (a ValueError) for cuda without CUDA and for
    any other name. torch is imported here, not with the module: ``--device`` costs a command nothing until
    it is resolved."""
    import torch

    if isinstance(name, torch.device):
        text = str(name)
    else:
        text = "cpu" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        try:
            device = torch.device(text)
        except RuntimeError:
            raise DeviceError(f"{option} {text}: not a device; use {option} cpu, cuda or auto") from None
        if not torch.cuda.is_available():
            raise DeviceError(f"{option} {text}: this torch has no CUDA device (torch.cuda.is_available() is "
                              f"False); use {option} cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{option} {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1}); use {option} cuda or auto")
        return device
    raise DeviceError(f"{option} {name!r}: expected cpu, cuda or auto")


def check_name(name: str, option: str = "device") -> str:
    """``name`` if it is a device name :func:`resolve_device` knows (without asking for CUDA), else
    :class:`DeviceError`: for configurations written on one machine and run on another."""
    text = str(name).strip().lower()
    if text in CHOICES or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise DeviceError(f"{option} {name!r}: expected cpu, cuda or auto")


def add_device_argument(parser, what: str = "the models") -> None:
    """``--device cpu|cuda|auto`` (default cpu) on an argparse parser."""
    parser.add_argument("--device", choices=CHOICES, default="cpu",
                        help=f"where {what} run: cpu (default), cuda (a GPU; refused without one) or auto "
                             f"(cuda when torch sees one, else cpu)")
