"""4-bit NormalFloat (NF4) weights with double quantization, the base-weight format of QLoRA (Dettmers et al. 2023).

A weight is cut into blocks of 64 values; each block is scaled by its absolute maximum into [-1, 1] and every
value is stored as the index (4 bits, two per byte) of the nearest of the 16 NF4 code values, quantiles of a
standard normal (exact zero included). Double quantization stores the per-block absmax constants themselves in
8 bits: their mean is subtracted and each block of 256 is scaled by its absolute maximum to symmetric int8 (linear
codes; bitsandbytes uses its dynamic 8-bit map there). Dequantized weights are computed in ``compute_dtype``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BLOCK = 64  # values per absmax constant
ABSMAX_BLOCK = 256  # absmax constants per 8-bit scale (double quantization)
# The 16 NF4 code values as published with QLoRA (bitsandbytes' table).
NF4_CODES = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def _blocks(x: Tensor, size: int) -> Tensor:
    """x flattened, zero-padded to a whole number of blocks, as (n_blocks, size)."""
    flat = x.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % size)).view(-1, size)


class NF4Weight(nn.Module):
    """A weight matrix stored as NF4 codes, double-quantized absmax constants and their fp32 scales (buffers)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.shape = weight.shape
        w = _blocks(weight.detach().float(), BLOCK)
        absmax = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny)
        codes = NF4_CODES.to(w.device)
        # nearest code: count the midpoints between consecutive codes that lie below the value
        index = torch.bucketize(w / absmax[:, None], (codes[1:] + codes[:-1]) / 2).to(torch.uint8).view(-1)
        self.register_buffer("packed", (index[0::2] << 4) | index[1::2])
        offset = absmax.mean()
        centered = _blocks(absmax - offset, ABSMAX_BLOCK)
        scale = centered.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("absmax_codes", torch.round(centered / scale[:, None]).to(torch.int8))
        self.register_buffer("absmax_scale", scale)
        self.register_buffer("absmax_offset", offset)

    def absmax(self) -> Tensor:
        n_blocks = -(-self.shape.numel() // BLOCK)
        centered = self.absmax_codes.float() * self.absmax_scale[:, None]
        return centered.view(-1)[:n_blocks] + self.absmax_offset

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        index = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).view(-1, BLOCK).long()
        values = NF4_CODES.to(self.packed.device)[index] * self.absmax()[:, None]
        return values.view(-1)[: self.shape.numel()].view(self.shape).to(dtype)


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights: y = x W^T + b, W dequantized to ``compute_dtype`` on the fly."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.quantized = NF4Weight(linear.weight)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().to(compute_dtype), False)
        )

    @property
    def weight(self) -> Tensor:
        return self.quantized.dequantize(self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def dequantized(self) -> nn.Linear:
        """A plain linear layer holding the dequantized weight (in ``compute_dtype``)."""
        weight = self.weight
        linear = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, weight.device, weight.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
    """Store every linear layer of the Transformer blocks as NF4 (in place; embeddings and LM head stay)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("blocks."):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, NF4Linear(module, compute_dtype))
