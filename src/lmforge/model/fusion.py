"""Fused projections for inference: several ``nn.Linear`` reading the same input run as one matmul.

A decode step runs each projection at batch size 1..64, where a matmul costs its weight bytes plus a fixed
dispatch; concatenating q/k/v (and gate/up) weights once at load time turns 5 matmuls per layer into 2. The
concatenation is done once, and the original layers' parameters are rebound as views into the fused tensor:
no memory is duplicated, ``state_dict`` names and values are unchanged, and any in-place change of a
parameter (``load_state_dict``, an optimizer step) is seen by the fused path too.

The fused path is taken only when it computes exactly what the separate layers would: the layers are still
the plain ``nn.Linear`` objects that were fused (a served LoRA adapter or a quantized layer replaces them),
their parameters still live in the fused tensor (``model.to(dtype)`` or ``load_state_dict(assign=True)``
rebinds them), and autograd is off (the views' gradients would not reach the fused tensor's users).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fusable(linears: list[nn.Module | None]) -> bool:
    """Whether these layers can share one matmul: plain ``nn.Linear`` with ordinary (non-distributed,
    non-meta) parameters of one dtype and device, all with or all without a bias."""
    if not linears or any(type(m) is not nn.Linear for m in linears):
        return False
    params = [p for m in linears for p in m.parameters(recurse=False)]
    if any(type(p.data) is not torch.Tensor or p.is_meta for p in params):
        return False
    first = linears[0].weight
    if any(m.weight.dtype != first.dtype or m.weight.device != first.device for m in linears):
        return False
    return len({m.bias is None for m in linears}) == 1


def packing_available() -> bool:
    """Whether this PyTorch can prepack linear weights for oneDNN (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class FusedLinear:
    """The concatenated weight (and bias) of ``linears`` (which must be :func:`fusable`), whose parameters
    become views into it. Not a module: it holds no parameters of its own, so it adds nothing to the model's
    ``state_dict``. A single layer is not copied (its weight is used as it is: a tied LM head stays tied).

    ``pack=True`` also keeps the weight prepacked in oneDNN's blocked layout (CPU, fp32 or bf16): a decode
    matmul then streams the weight without reordering it per call, 1.3-1.9x faster on a 2-core AVX512-BF16
    VM, for a second copy of the weight in memory. An in-place change of the weight (tracked by its version
    counter) makes the packed copy stale, and the plain weight is used until :meth:`pack` runs again."""

    def __init__(
        self, linears: list[nn.Linear], pack: bool = False, pack_dtype: torch.dtype | None = None
    ) -> None:
        if not fusable(linears):
            raise ValueError("FusedLinear: the layers must be plain nn.Linear of one dtype and device")
        self.linears = linears
        self.sizes = [m.out_features for m in linears]
        if len(linears) == 1:
            self.weight, self.bias = linears[0].weight, linears[0].bias
        else:
            with torch.no_grad():
                self.weight = torch.cat([m.weight.detach() for m in linears])
                has_bias = linears[0].bias is not None
                self.bias = torch.cat([m.bias.detach() for m in linears]) if has_bias else None
            offset = 0
            for m, n in zip(linears, self.sizes):
                m.weight = nn.Parameter(
                    self.weight[offset : offset + n], requires_grad=m.weight.requires_grad
                )
                if self.bias is not None:
                    m.bias = nn.Parameter(self.bias[offset : offset + n], requires_grad=m.bias.requires_grad)
                offset += n
        self._ptrs = [m.weight.data_ptr() for m in linears]
        self.packed: Tensor | None = None
        # pack_dtype (bf16 of an fp32 layer): the packed copy holds the weight in that dtype, and the matmul
        # casts its input to it and its output back (weight-only bf16: KV cache and activations stay fp32)
        self.pack_dtype = pack_dtype
        self._packed_bias: Tensor | None = None
        self._packed_version = -1
        if pack:
            self.pack()

    def __getstate__(self) -> dict:
        """Copies and pickles leave the packed weight out (oneDNN's opaque tensors cannot be copied); a
        deep-copied model's layers have new storage, so its copy of this object is not used anyway."""
        state = self.__dict__.copy()
        state["packed"] = None
        return state

    def pack(self) -> bool:
        """(Re)pack the weight for oneDNN; False where that is not available (not a CPU fp32/bf16 weight)."""
        weight = self.weight
        if not packing_available() or weight.device.type != "cpu":
            return False
        dtype = self.pack_dtype or weight.dtype
        if weight.dtype not in (torch.float32, torch.bfloat16) or dtype not in (
            torch.float32,
            torch.bfloat16,
        ):
            return False
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), 1)
            self._packed_bias = None if self.bias is None else self.bias.detach().to(dtype)
        self._packed_version = weight._version
        return True

    def valid(self, current: list[nn.Module | None]) -> bool:
        """Whether ``current`` (the layers now in the modules' slots) are still these, backed by the fused
        tensor, with autograd off."""
        if torch.is_grad_enabled():
            return False
        for m, fused, ptr in zip(current, self.linears, self._ptrs):
            if m is not fused or m.weight.data_ptr() != ptr:
                return False
        return True

    def __call__(self, x: Tensor) -> list[Tensor]:
        """The layers' outputs, in order, from one matmul (views of one result tensor)."""
        if (
            self.packed is not None
            and self.weight._version == self._packed_version
            and x.dtype == self.weight.dtype
        ):
            flat = x.reshape(-1, x.shape[-1])
            if self.pack_dtype is not None:
                flat = flat.to(self.pack_dtype)
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self._packed_bias, "none", [], "")
            out = out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)
        else:
            out = F.linear(x, self.weight, self.bias)
        return [out] if len(self.sizes) == 1 else list(out.split(self.sizes, dim=-1))

    def unfuse(self) -> None:
        """Give each layer its own storage again (the fused tensor is then freed with this object)."""
        self.packed = None
        if len(self.linears) == 1:
            return
        for m in self.linears:
            m.weight = nn.Parameter(m.weight.detach().clone(), requires_grad=m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=m.bias.requires_grad)
