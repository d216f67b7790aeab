"""Mixed precision: bf16 autocast, fp16 autocast with dynamic loss scaling, or plain fp32.

Parameters (the master weights) and optimizer states stay in fp32 in every mode; autocast runs the
matmuls in 16 bits. fp16 needs a ``GradScaler``: it multiplies the loss so small gradients survive in
fp16, unscales before clipping, and skips the update (lowering the scale) when gradients overflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16, from /proc/cpuinfo's flags);
    elsewhere bf16 matmuls are emulated through fp32 and are no faster than fp32 ones."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 on a CUDA device that supports it, otherwise fp32 (the CPU default)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A zero-argument factory of the forward-pass context for ``precision``."""
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = DTYPES[precision]
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
