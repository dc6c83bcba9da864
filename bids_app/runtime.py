"""How a run uses the machine: the device, mixed precision, memory layout (``RuntimeConfig`` in ``config``).

Training, prediction and interpretation all place models and batches through these functions, so the three
stages agree on a device name, refuse the same unsafe settings and lay out memory the same way. torch is
imported inside the functions: importing this module stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bids_app.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

DEVICE_NAMES = ("auto", "cpu", "cuda")


def check_device_name(name: str) -> None:
    """ConfigError unless ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``."""
    if name not in DEVICE_NAMES and not (name.startswith("cuda:") and name.removeprefix("cuda:").isdigit()):
        raise ConfigError(f"Unknown device '{name}' (runtime.device). Use auto, cpu, cuda or cuda:<index>.")


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU. Raises ConfigError when CUDA is asked for but absent."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"Device '{name}' requested but no CUDA GPU is available. Use --device cpu or auto.")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """What ``train.amp`` autocasts to on ``device``: float16 on CUDA (with loss scaling); None without AMP.

    Raises:
        ConfigError: AMP on a CPU. CPU autocast means bfloat16, and the oneDNN kernels of the pinned torch
            (2.13.0, CPU build) compute bfloat16 convolution weight gradients wrongly for padded convolutions
            on small feature maps (a 3D map 2 voxels deep, for instance): off by up to 1e37, differing from
            run to run, sometimes a heap corruption. ``benchmarks/check_cpu_bf16_conv.py`` measures it.
    """
    import torch

    if not amp:
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"--amp (runtime.amp) is refused on device {device.type}: CPU mixed precision is bfloat16, and torch "
            f"{torch.__version__.split('+')[0]}'s bfloat16 convolution gradients are wrong on small feature maps "
            "(see docs/performance.md). Drop --amp (--channels-last is the CPU speed-up) or train on a GPU "
            "(--device cuda)."
        )
    return torch.float16


def batch_memory_format(batch_ndim: int, channels_last: bool) -> torch.memory_format:
    """The memory format of batches with ``batch_ndim`` axes, and of the model reading them.

    With ``channels_last``, ``torch.channels_last_3d`` for ``(N, C, D, H, W)`` (3D models) and
    ``torch.channels_last`` for ``(N, C, H, W)`` (2D models); else ``torch.preserve_format`` (``Tensor.to`` and
    ``Module.to`` leave the layout as it is). A layout changes how convolutions walk memory (often faster on
    CPU and GPU), never the values a tensor holds; kernels may sum in another order, so results agree with
    the default layout within float tolerance.

    Raises:
        ValueError: ``channels_last`` for batches that are neither 4-D nor 5-D (no model reads such batches).
    """
    import torch

    if not channels_last:
        return torch.preserve_format
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    if batch_ndim not in formats:
        raise ValueError(f"channels-last formats exist for 4-D and 5-D batches, not {batch_ndim}-D ones")
    return formats[batch_ndim]


def set_memory_format(model: nn.Module, memory_format: torch.memory_format) -> nn.Module:
    """``model`` with its 4-D and 5-D parameters and buffers in ``memory_format`` (in place, as ``Module.to``)."""
    return model.to(memory_format=memory_format)  # type: ignore[call-overload]  # the stubs omit the argument
