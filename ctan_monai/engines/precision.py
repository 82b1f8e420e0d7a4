"""Mixed precision and memory format for the bundles' engines, on CUDA and on the CPU.

A bundle's ``amp`` option names the precision of the forward pass (the losses always run in float32):

- ``none`` (or ``false``): float32.
- ``bf16``: bfloat16 autocast around the network, on CUDA (cards with bf16) and on the CPU (fast with AVX-512 BF16
  or AMX, correct everywhere). bf16 has float32's range, so no gradient scaling is needed: backward and the
  optimiser step run as in float32. The autocast comes from :class:`AutocastInferer` wrapped around the engine's
  inferer, because MONAI's own ``amp`` autocasts for ``"cuda"`` only.
- ``fp16``: CUDA only, through MONAI's engines: ``amp=True`` with ``amp_kwargs={"dtype": torch.float16}``
  (``torch.autocast("cuda")`` and a ``GradScaler``).
- ``true``: MONAI's meaning of ``amp=True`` where it has one, fp16 on CUDA; bf16 on other devices.

:class:`MixedPrecision` resolves the option for a device and gives what ``SupervisedTrainer`` and
``SupervisedEvaluator`` take (``inferer``, ``amp``, ``amp_kwargs``); :func:`place_network` moves a network to the
device and, with ``channels_last``, its convolution weights to the channels-last memory format that
``MultiTaskPrepareBatch(channels_last=True)`` gives the images.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SimpleInferer
from torch import nn

__all__ = ["AMP_MODES", "AutocastInferer", "MixedPrecision", "is_channels_last", "place_network", "resolve_amp"]

AMP_MODES = ("none", "bf16", "fp16")
_ALIASES = {
    "none": "none",
    "false": "none",
    "off": "none",
    "no": "none",
    "fp32": "none",
    "float32": "none",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "true": "true",
    "on": "true",
    "yes": "true",
}


def resolve_amp(amp: bool | str | None, device: str | torch.device) -> str:
    """The precision mode of an ``amp`` option on a device.

    Args:
        amp: ``"none"``, ``"bf16"``, ``"fp16"`` (aliases: ``"float32"``, ``"bfloat16"``, ``"float16"``, ...), a bool
            or None (float32). ``True`` (and the strings ``"true"``/``"on"``/``"yes"``, as a bundle command line
            passes them) means fp16 on CUDA, MONAI's ``amp=True``, and bf16 on any other device.
        device: the training device.

    Returns:
        one of ``AMP_MODES``.

    Raises:
        ValueError: for an unknown option, fp16 off CUDA, or bf16 on a CUDA card without bfloat16.

    Example:
        >>> resolve_amp(False, "cpu"), resolve_amp("bf16", "cpu"), resolve_amp(True, "cpu")
        ('none', 'bf16', 'bf16')
    """
    device = torch.device(device)
    if amp is None or isinstance(amp, bool):
        key = "true" if amp else "none"
    else:
        key = _ALIASES.get(str(amp).strip().lower(), "")
        if not key:
            raise ValueError(f"amp must be one of {AMP_MODES} (or true / false), got {amp!r}")
    if key == "true":
        key = "fp16" if device.type == "cuda" else "bf16"
    if key == "fp16" and device.type != "cuda":
        raise ValueError(f"amp fp16 needs CUDA (float16 autocast with a grad scaler); on {device.type} use bf16")
    if key == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; use fp16")
    return key


def _to_dtype(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors in ``value`` (a tensor, or a dict / list / tuple of them) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, Mapping):
        return type(value)({k: _to_dtype(v, dtype) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, (list, tuple)):
        return type(value)(_to_dtype(v, dtype) for v in value)
    return value


class AutocastInferer(Inferer):
    """An inferer that runs another one under ``torch.autocast`` and returns its floating outputs in float32.

    MONAI's engines call ``inferer(inputs, network)`` for the forward pass (the trainer inside its step, before the
    loss and outside backward, which is where autocast belongs). Wrapping the engine's inferer gives autocast on
    any device, where MONAI's ``amp`` gives it for CUDA only.

    Args:
        inferer: the inferer to run (e.g. ``SimpleInferer()``, a ``SliceInferer``); default ``SimpleInferer()``.
        device_type: ``"cuda"``, ``"cpu"``, ... (the device the network runs on).
        dtype: the autocast dtype (default bfloat16).
        output_dtype: floating outputs are cast to it (default float32; None leaves them): the losses, metrics and
            numpy-based handlers downstream expect float32. Our decoders' output layers already run in float32,
            so for our networks the cast costs nothing.

    Example:
        >>> net = torch.nn.Linear(4, 2)
        >>> AutocastInferer(device_type="cpu")(torch.zeros(3, 4), net).dtype
        torch.float32
    """

    def __init__(
        self,
        inferer: Inferer | None = None,
        device_type: str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        output_dtype: torch.dtype | None = torch.float32,
    ) -> None:
        super().__init__()
        self.inferer = inferer if inferer is not None else SimpleInferer()
        self.device_type = str(device_type)
        self.dtype = dtype
        self.output_dtype = output_dtype

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped inferer under autocast.

        Args:
            inputs: the network input.
            network: the network (or callable) the wrapped inferer runs.
            args: passed on to the wrapped inferer.
            kwargs: passed on to the wrapped inferer.

        Returns:
            the wrapped inferer's output, floating tensors cast to ``output_dtype``.
        """
        with torch.autocast(device_type=self.device_type, dtype=self.dtype):
            outputs = self.inferer(inputs, network, *args, **kwargs)
        return outputs if self.output_dtype is None else _to_dtype(outputs, self.output_dtype)


class MixedPrecision:
    """A bundle's ``amp`` option resolved for its device: the arguments of MONAI's trainer and evaluators.

    In a bundle config::

        precision: "$ctan_monai.engines.MixedPrecision(@amp, @device)"
        trainer:   {inferer: "$@precision.inferer()", amp: "$@precision.monai_amp",
                    amp_kwargs: "$@precision.amp_kwargs", ...}
        evaluator: {inferer: "$@precision.inferer(@validate#inferer)", amp: ..., amp_kwargs: ...}

    Args:
        amp: the option (see :func:`resolve_amp`).
        device: the device the engines run on.

    Raises:
        ValueError: as :func:`resolve_amp`.

    Example:
        >>> precision = MixedPrecision("bf16", "cpu")
        >>> precision.mode, precision.monai_amp, type(precision.inferer()).__name__
        ('bf16', False, 'AutocastInferer')
    """

    def __init__(self, amp: bool | str | None, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.mode = resolve_amp(amp, self.device)

    @property
    def dtype(self) -> torch.dtype:
        """The forward pass's compute dtype (float32 for ``none``)."""
        return {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mode]

    @property
    def monai_amp(self) -> bool:
        """The ``amp`` argument of MONAI's engines: True for fp16 only (CUDA autocast and a grad scaler)."""
        return self.mode == "fp16"

    @property
    def amp_kwargs(self) -> dict[str, Any]:
        """The ``amp_kwargs`` argument of MONAI's engines (``torch.autocast("cuda", **amp_kwargs)``)."""
        return {"dtype": torch.float16} if self.mode == "fp16" else {}

    def inferer(self, inferer: Inferer | None = None) -> Inferer:
        """The engine's inferer for this precision.

        Args:
            inferer: the inferer the engine would use in float32 (default ``SimpleInferer()``).

        Returns:
            ``inferer`` wrapped in an :class:`AutocastInferer` for bf16, else ``inferer`` itself.
        """
        base = inferer if inferer is not None else SimpleInferer()
        if self.mode != "bf16":
            return base
        return AutocastInferer(base, device_type=self.device.type, dtype=torch.bfloat16)

    def autocast(self) -> torch.autocast:
        """An autocast context of this precision, for loops outside MONAI's engines.

        Returns:
            ``torch.autocast`` for the device and dtype, disabled for ``none``.
        """
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, enabled=self.mode != "none")

    def __repr__(self) -> str:
        return f"MixedPrecision(mode={self.mode!r}, device={str(self.device)!r})"


_MEMORY_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def place_network(
    network: nn.Module, device: str | torch.device | None = None, channels_last: bool = False
) -> nn.Module:
    """Move a network to its device and, optionally, its 4D / 5D weights to channels-last memory format.

    With channels-last inputs (``MultiTaskPrepareBatch(channels_last=True)``) and weights, cuDNN and oneDNN pick
    their NHWC kernels (the fast ones for tensor cores and for bf16 on the CPU) without converting every layer's
    input and output. Parameters keep their identity (an optimiser built on them afterwards, or before, is
    unaffected); 2D networks get ``channels_last`` and 3D networks ``channels_last_3d``.

    Args:
        network: the network (changed in place and returned).
        device: the device, or None to leave it where it is.
        channels_last: convert the convolution weights' memory format.

    Returns:
        ``network``.

    Example:
        >>> net = place_network(torch.nn.Conv2d(1, 4, 3), "cpu", channels_last=True)
        >>> net.weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    if device is not None:
        network = network.to(device)
    if channels_last:
        with torch.no_grad():
            for tensor in itertools.chain(network.parameters(), network.buffers()):
                memory_format = _MEMORY_FORMATS.get(tensor.dim())
                if memory_format is not None:
                    tensor.data = tensor.data.contiguous(memory_format=memory_format)
    return network


def is_channels_last(network: nn.Module) -> bool:
    """Whether every 4D / 5D parameter of a network is in channels-last memory format (a check for tests).

    Args:
        network: the network.

    Returns:
        True when all of them are (vacuously True without any).
    """
    checks: Sequence[bool] = [
        p.is_contiguous(memory_format=_MEMORY_FORMATS[p.dim()]) for p in network.parameters() if p.dim() in (4, 5)
    ]
    return all(checks)
