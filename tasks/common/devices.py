"""The one device resolver: where a stage's models run and in which dtype.

``auto`` is CUDA when visible, else the CPU; an explicit CUDA device that is not there is an error
naming the setting. Half precision applies on CUDA only (on a CPU it is slow and often unsupported),
so :func:`compute_dtype` falls back to float32 there.
"""

from __future__ import annotations

import torch

from tasks.common.errors import InputError


def torch_device(name: str, setting: str) -> torch.device:
    """``auto`` -> CUDA when visible, else CPU; ``cuda`` without a visible GPU names ``setting``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{setting}={name}, but no CUDA device is visible here (use auto or cpu)")
    return device


def compute_dtype(device: torch.device, requested: str) -> torch.dtype:
    """``requested`` (float32 / float16 / bfloat16) on CUDA; float32 anywhere else."""
    return getattr(torch, requested) if device.type == "cuda" else torch.float32
