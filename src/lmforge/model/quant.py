"""Weight-only quantization of linear layers for inference: int8, int4 and NF4.

Three formats replace the ``nn.Linear`` layers of the Transformer blocks (attention and MLP projections; MoE
routers, the token embedding and the LM head stay in full precision: the embedding is a lookup that costs no
matmul bandwidth, and the head and routers are small but the most sensitive to rounding):

- **int8**: per-output-channel symmetric, ``scale = max|w_row| / 127``, ``q = round(w / scale)`` in [-127, 127].
- **int4**: group-wise symmetric along the input dimension (groups of 32, 64 or 128 values),
  ``scale = max|w_group| / 7``, ``q = round(w / scale)`` in [-7, 7]; stored as ``q + 8``, two per byte (the
  even column in the high nibble).
- **NF4** (QLoRA, Dettmers et al. 2023): blocks of 64 values scaled by their absmax into [-1, 1], each value
  the index of the nearest of the 16 NF4 code values (quantiles of a standard normal, exact zero included),
  two per byte; double quantization stores the absmax constants in 8 bits (mean subtracted, blocks of 256
  scaled by their absmax to symmetric int8; linear codes, where bitsandbytes uses its dynamic 8-bit map).

Matmuls use PyTorch's CPU weight-only kernels where torch ships one: ``aten._weight_int8pack_mm`` (int8) and
``aten._weight_int4pack_mm_for_cpu`` on the layout of ``aten._convert_weight_to_int4pack_for_cpu`` (int4).
Both are fast only with bfloat16 activations (their float32 paths are scalar and ~10x slower than a float32
matmul, measured on torch 2.13), so activations are rounded to bfloat16 for the kernel and the result is cast
back; the kernels accumulate in float32. Shapes the kernels do not handle fall back to dequantize-then-matmul:
int8 needs ``in_features % 16 == 0`` (other widths read out of bounds; its AVX-512 path also needs 64-byte
aligned rows, so unaligned weights are copied once), int4 needs ``out_features % 16 == 0``.
There is no NF4 kernel in torch: NF4 layers dequantize their weight (to the activations' dtype) for every matmul,
which saves memory, not time. Off the CPU every format dequantizes per matmul.

The packed tensors and scales are buffers, so a quantized model's ``state_dict`` is its checkpoint;
:func:`quantization_config` describes it for config.json and :func:`prepare_quantized` rebuilds the empty
modules a checkpoint is loaded into (see :mod:`lmforge.model.hf`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("int8", "int4", "nf4")
INT4_GROUP_SIZES = (32, 64, 128)
QUANT_METHOD = "lmforge"  # config.json quantization_config.quant_method of folders written here
FORMAT_VERSION = 1
KERNEL_DTYPE = torch.bfloat16  # the activation dtype the CPU kernels are fast with

NF4_BLOCK = 64  # values per absmax constant
NF4_ABSMAX_BLOCK = 256  # absmax constants per 8-bit scale (double quantization)
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
_TINY = torch.finfo(torch.float32).tiny


class QuantizationError(ValueError):
    """A quantization method or group size that cannot be applied; the message names the option or layer."""


# -------------------------------------------------------------------------------------------- the formulas


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 (out, in), scales float32 (out,)): per-output-channel symmetric, w ~= q * scale[:, None]."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=_TINY) / 127
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype)


def _check_group(in_features: int, group_size: int, where: str = "") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"group_size: {group_size} is not one of {', '.join(map(str, INT4_GROUP_SIZES))}"
        )
    if in_features % group_size:
        raise QuantizationError(
            f"{where or 'weight'}: in_features {in_features} is not a multiple of group_size {group_size}"
        )


def quantize_int4(weight: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor]:
    """(packed uint8 (out, in // 2), scales float32 (out, in // group_size)): group-wise symmetric,
    w ~= (nibble - 8) * scale of its group."""
    out_features, in_features = weight.shape
    _check_group(in_features, group_size)
    w = weight.detach().float().view(out_features, -1, group_size)
    scales = w.abs().amax(dim=2).clamp(min=_TINY) / 7
    q = torch.round(w / scales[..., None]).clamp(-8, 7).view(out_features, in_features)
    nibbles = (q + 8).to(torch.uint8)
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2], scales


def unpack_int4(packed: Tensor) -> Tensor:
    """The signed int4 values (int32, in [-8, 7]) of a :func:`quantize_int4` packing, shape (out, in)."""
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=2).view(packed.shape[0], -1)
    return nibbles.to(torch.int32) - 8


def dequantize_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    q = unpack_int4(packed).float()
    out_features, in_features = q.shape
    groups = scales.shape[1]
    w = q.view(out_features, groups, in_features // groups) * scales.float()[..., None]
    return w.view(out_features, in_features).to(dtype)


def _blocks(x: Tensor, size: int) -> Tensor:
    """x flattened, zero-padded to a whole number of blocks, as (n_blocks, size)."""
    flat = x.reshape(-1)
    return F.pad(flat, (0, -flat.numel() % size)).view(-1, size)


def nf4_quantize(weight: Tensor) -> dict[str, Tensor]:
    """NF4 codes with double-quantized absmax constants: {packed (uint8, two codes a byte), absmax_codes
    (int8, (n, 256)), absmax_scale (float32, (n,)), absmax_offset (float32 scalar)}."""
    w = _blocks(weight.detach().float(), NF4_BLOCK)
    absmax = w.abs().amax(dim=1).clamp(min=_TINY)
    codes = NF4_CODES.to(w.device)
    # nearest code: count the midpoints between consecutive codes that lie below the value
    index = torch.bucketize(w / absmax[:, None], (codes[1:] + codes[:-1]) / 2).to(torch.uint8).view(-1)
    offset = absmax.mean()
    centered = _blocks(absmax - offset, NF4_ABSMAX_BLOCK)
    scale = centered.abs().amax(dim=1).clamp(min=_TINY) / 127
    return {
        "packed": (index[0::2] << 4) | index[1::2],
        "absmax_codes": torch.round(centered / scale[:, None]).to(torch.int8),
        "absmax_scale": scale,
        "absmax_offset": offset,
    }


def nf4_absmax(absmax_codes: Tensor, absmax_scale: Tensor, absmax_offset: Tensor, n_blocks: int) -> Tensor:
    """The per-block absmax constants restored from their 8-bit double quantization."""
    centered = absmax_codes.float() * absmax_scale[:, None]
    return centered.view(-1)[:n_blocks] + absmax_offset


def nf4_dequantize(
    packed: Tensor,
    absmax_codes: Tensor,
    absmax_scale: Tensor,
    absmax_offset: Tensor,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    numel = int(torch.Size(shape).numel())
    absmax = nf4_absmax(absmax_codes, absmax_scale, absmax_offset, -(-numel // NF4_BLOCK))
    index = torch.stack([packed >> 4, packed & 0xF], dim=1).view(-1, NF4_BLOCK).long()
    values = NF4_CODES.to(packed.device)[index] * absmax[:, None]
    return values.view(-1)[:numel].view(shape).to(dtype)


# ------------------------------------------------------------------------------------------------ modules


def _frozen_bias(linear: nn.Linear | None, out_features: int, bias: bool, dtype: torch.dtype, device) -> Any:
    if linear is not None and linear.bias is not None:
        return nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    if bias:
        return nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
    return None


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights and per-output-channel float32 scales.

    On the CPU (``in_features % 16 == 0``) it calls ``aten._weight_int8pack_mm`` with bfloat16 activations;
    elsewhere it dequantizes the weight for the matmul."""

    method = "int8"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_parameter("bias", _frozen_bias(None, out_features, bias, dtype, device))
        self._kernel_memo: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, False, linear.weight.device)
        layer.qweight, layer.scales = quantize_int8(linear.weight)
        layer.bias = _frozen_bias(linear, linear.out_features, False, linear.weight.dtype, None)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int8(self.qweight, self.scales, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (float32), for code that reads ``.weight``."""
        return self.dequantize()

    def uses_kernel(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and self.in_features % 16 == 0

    def _kernel_weight(self) -> tuple[Tensor, Tensor]:
        """(int8 weight, bfloat16 scales) for the kernel. Its AVX-512 path loads rows with aligned vector
        loads, so a weight whose data is not 64-byte aligned (a safetensors file maps tensors at 8-byte
        offsets) is copied once into fresh, aligned memory."""
        memo = self._kernel_memo
        if memo is None or memo[0] is not self.qweight or memo[1] is not self.scales:
            weight = self.qweight.contiguous()
            if weight.data_ptr() % 64:
                weight = weight.clone()
            memo = (self.qweight, self.scales, weight, self.scales.to(KERNEL_DTYPE))
            self._kernel_memo = memo
        return memo[2], memo[3]

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_kernel(x):
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
            if flat.data_ptr() % 64:  # aligned rows, see _kernel_weight
                flat = flat.clone()
            y = torch.ops.aten._weight_int8pack_mm(flat, *self._kernel_weight())
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class Int4Linear(nn.Module):
    """A frozen linear layer with group-wise symmetric int4 weights (two a byte) and float32 group scales.

    On the CPU (``out_features % 16 == 0``) it calls ``aten._weight_int4pack_mm_for_cpu`` with bfloat16
    activations on a copy of the weight in the kernel's own layout (``_convert_weight_to_int4pack_for_cpu``,
    made on first use; the portable nibble packing stays for the checkpoint, so a layer holds 1 byte per
    weight in all); elsewhere it dequantizes the weight for the matmul."""

    method = "int4"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        group_size: int = 128,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        _check_group(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer(
            "qweight", torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8, device=device)
        )
        groups = in_features // group_size
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_parameter("bias", _frozen_bias(None, out_features, bias, dtype, device))
        self._kernel_memo: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> Int4Linear:
        layer = cls(linear.in_features, linear.out_features, False, group_size, linear.weight.device)
        layer.qweight, layer.scales = quantize_int4(linear.weight, group_size)
        layer.bias = _frozen_bias(linear, linear.out_features, False, linear.weight.dtype, None)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_int4(self.qweight, self.scales, dtype)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (float32), for code that reads ``.weight``."""
        return self.dequantize()

    def uses_kernel(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and self.out_features % 16 == 0

    def _kernel_weight(self) -> tuple[Tensor, Tensor]:
        memo = self._kernel_memo
        if memo is None or memo[0] is not self.qweight or memo[1] is not self.scales:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight) + 8, 2)
            scales = self.scales.t()
            scales_and_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1)
            memo = (self.qweight, self.scales, packed, scales_and_zeros.to(KERNEL_DTYPE).contiguous())
            self._kernel_memo = memo
        return memo[2], memo[3]

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_kernel(x):
            packed, scales_and_zeros = self._kernel_weight()
            flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales_and_zeros)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class NF4Weight(nn.Module):
    """A weight matrix stored as NF4 codes, double-quantized absmax constants and their fp32 scales (buffers).
    A weight on the meta device gives empty buffers of the right shapes (to load a checkpoint into)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.shape = weight.shape
        if weight.is_meta:
            n_blocks = -(-weight.numel() // NF4_BLOCK)
            n_scales = -(-n_blocks // NF4_ABSMAX_BLOCK)
            parts = {
                "packed": torch.empty(n_blocks * NF4_BLOCK // 2, dtype=torch.uint8, device="meta"),
                "absmax_codes": torch.empty(n_scales, NF4_ABSMAX_BLOCK, dtype=torch.int8, device="meta"),
                "absmax_scale": torch.empty(n_scales, device="meta"),
                "absmax_offset": torch.empty((), device="meta"),
            }
        else:
            parts = nf4_quantize(weight)
        for name, tensor in parts.items():
            self.register_buffer(name, tensor)

    def absmax(self) -> Tensor:
        n_blocks = -(-self.shape.numel() // NF4_BLOCK)
        return nf4_absmax(self.absmax_codes, self.absmax_scale, self.absmax_offset, n_blocks)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return nf4_dequantize(
            self.packed, self.absmax_codes, self.absmax_scale, self.absmax_offset, self.shape, dtype
        )


class _NF4Matmul(torch.autograd.Function):
    """x W^T + b for a frozen NF4 weight, saving nothing for backward but the quantized weight (the input
    gradient is grad W, with W dequantized again), as bitsandbytes' 4-bit matmul does."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, bias: Tensor | None, quantized: NF4Weight, compute_dtype: torch.dtype
    ) -> Tensor:
        ctx.quantized, ctx.compute_dtype, ctx.dtype = quantized, compute_dtype, x.dtype
        return F.linear(x, quantized.dequantize(compute_dtype).to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.to(ctx.dtype) @ ctx.quantized.dequantize(ctx.compute_dtype).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(dim=0)
        return grad_x, grad_bias, None, None


class NF4Linear(nn.Module):
    """A frozen linear layer with NF4 weights: y = x W^T + b, W dequantized to ``compute_dtype`` for every
    matmul (torch has no NF4 kernel: this saves memory, not time). The base layer of QLoRA
    (:mod:`lmforge.tune.peft.lora`) and the ``nf4`` inference format."""

    method = "nf4"

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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.quantized.dequantize(dtype)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            # training through a frozen NF4 layer (QLoRA): autograd would keep every layer's dequantized weight
            # alive until backward; the weight is dequantized again there instead
            return _NF4Matmul.apply(x, bias, self.quantized, self.compute_dtype)
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


QUANTIZED_LINEARS = (Int8Linear, Int4Linear, NF4Linear)


# ------------------------------------------------------------------------------------------ whole models


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers a model's quantization replaces: every ``nn.Linear`` inside the blocks
    except MoE routers (embeddings and the LM head are not inside the blocks)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.") and not name.endswith(".router")
    ]


def check_method(method: str, group_size: int | None) -> int | None:
    """The group size that applies to ``method`` (None for int8/nf4), or a QuantizationError naming the option."""
    if method not in METHODS:
        raise QuantizationError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if method != "int4":
        return None
    group_size = 128 if group_size is None else group_size
    if group_size not in INT4_GROUP_SIZES:
        raise QuantizationError(
            f"group_size: {group_size} is not one of {', '.join(map(str, INT4_GROUP_SIZES))} (int4)"
        )
    return group_size


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, method: str, group_size: int | None = None) -> nn.Module:
    """Replace the block linears of ``model`` (in place, see :func:`quantizable_linears`) by ``method``'s
    quantized layers; returns the model. Every layer is checked before any is replaced."""
    group_size = check_method(method, group_size)
    names = quantizable_linears(model)
    if method == "int4":
        for name in names:
            _check_group(model.get_submodule(name).in_features, group_size, name)
    for name in names:
        linear = model.get_submodule(name)
        if method == "int8":
            layer: nn.Module = Int8Linear.from_linear(linear)
        elif method == "int4":
            layer = Int4Linear.from_linear(linear, group_size)
        else:
            layer = NF4Linear(linear, linear.weight.dtype)
        _replace(model, name, layer)
    model.requires_grad_(False)
    return model


def quantization_config(model: nn.Module) -> dict[str, Any] | None:
    """The config.json ``quantization_config`` block of a quantized model, or None if it has no quantized layer."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LINEARS)]
    if not layers:
        return None
    methods = {m.method for m in layers}
    if len(methods) > 1:
        raise QuantizationError(f"the model mixes quantization methods {sorted(methods)}")
    method = methods.pop()
    config: dict[str, Any] = {
        "quant_method": QUANT_METHOD,
        "method": method,
        "format_version": FORMAT_VERSION,
        "modules_not_converted": ["embed_tokens", "lm_head", "router"],
    }
    if method == "int4":
        sizes = {m.group_size for m in layers}
        if len(sizes) > 1:
            raise QuantizationError(f"the model mixes int4 group sizes {sorted(sizes)}")
        config["group_size"] = sizes.pop()
    if method == "nf4":
        config |= {"block_size": NF4_BLOCK, "double_quant_block_size": NF4_ABSMAX_BLOCK}
    return config


def prepare_quantized(model: nn.Module, config: dict[str, Any], dtype: torch.dtype = torch.float32) -> None:
    """Replace the block linears of a freshly built (usually meta-device) model by empty quantized layers of the
    format ``config`` (a config.json ``quantization_config``) describes, ready for ``load_state_dict``.
    Raises QuantizationError naming the key that does not describe an lmforge quantization."""
    if not isinstance(config, dict):
        raise QuantizationError("quantization_config: expected a JSON object")
    quant_method = config.get("quant_method")
    if quant_method != QUANT_METHOD:
        raise QuantizationError(
            f"quantization_config.quant_method: {quant_method!r} is not supported (only {QUANT_METHOD!r}, "
            "written by `lmforge quantize`)"
        )
    version = config.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise QuantizationError(f"quantization_config.format_version: {version!r} is not {FORMAT_VERSION}")
    method = config.get("method")
    if method not in METHODS:
        raise QuantizationError(f"quantization_config.method: {method!r} is not one of {', '.join(METHODS)}")
    group_size = config.get("group_size") if method == "int4" else None
    try:
        group_size = check_method(method, group_size)
    except QuantizationError as err:
        raise QuantizationError(f"quantization_config.{err}") from None
    for name in quantizable_linears(model):
        linear = model.get_submodule(name)
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        device = linear.weight.device
        if method == "int8":
            layer: nn.Module = Int8Linear(*shape, device=device, dtype=dtype)
        elif method == "int4":
            _check_group(linear.in_features, group_size, name)
            layer = Int4Linear(*shape, group_size=group_size, device=device, dtype=dtype)
        else:
            empty = nn.Linear(*shape, device="meta")
            layer = NF4Linear(empty, dtype)
            if device.type != "meta":
                layer.to_empty(device=device)
        _replace(model, name, layer)
    model.requires_grad_(False)


def quantized_buffer_names(model: nn.Module) -> set[str]:
    """State-dict names of the packed weights and scales of the quantized layers (kept in their stored dtype
    when loading, where floating parameters are cast to the load dtype)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, QUANTIZED_LINEARS):
            names.update(f"{prefix}.{name}" for name, _ in module.named_buffers())
    return names


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers as stored (packed weights count as packed)."""
    state = model.state_dict()
    seen: set[int] = set()
    total = 0
    for tensor in state.values():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total
