"""The training memory plan of parameter-efficient fine-tuning: LoRA on a frozen base, and QLoRA (LoRA on an NF4
base, Dettmers et al. 2023), per GPU, for ``lmforge info --peft lora`` / ``--qlora``.

Only the adapters train, so gradients and optimizer states exist for them alone:

- **weights**: the frozen base in the compute dtype (LoRA), or (QLoRA) every linear layer of the blocks in NF4
  with double quantization exactly as :class:`lmforge.model.quant.NF4Weight` stores it (0.5 byte per weight,
  one 8-bit absmax per 64 weights, one float32 scale per 256 absmax constants, all padded to whole blocks),
  the rest (embeddings, LM head, norms) in the compute dtype; plus the adapters in the compute dtype (as
  :mod:`lmforge.tune.peft.lora` creates them: the dtype of the base weight, dequantized for QLoRA).
- **gradients**: one per adapter parameter, in the compute dtype.
- **optimizer**: AdamW's two moments per adapter parameter in float32 (8 bytes; QLoRA's paged 32-bit AdamW
  keeps them so).
- **activations**: the full fine-tune estimate of :func:`lmforge.model.flops.memory_plan` (per-layer tensors
  kept for backward, or block inputs with activation checkpointing, plus float32 logits), scaled from 16-bit
  to the compute dtype, plus the r-wide LoRA intermediate ``A x`` of every adapted layer.
- **workspace** (QLoRA): the largest NF4 weight dequantized to the compute dtype, as each layer does for its
  matmul (one at a time).

Target modules follow peft's rule on module names: a list of names (a module matches when its leaf name is in
it, e.g. ``q_proj``), or ``"all-linear"`` (every linear layer of the blocks; not the LM head). lmforge's names
of the attention and MLP projections are those of the Llama checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.flops import GIB, ParamCount, memory_plan
from lmforge.model.quant import NF4_ABSMAX_BLOCK, NF4_BLOCK

PEFT_METHODS = ("lora", "qlora")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # lmforge's (and peft's) LoRA default for Llama-style models
ADAM_STATE_BYTES = 8  # two float32 moments per trainable parameter
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def nf4_bytes(numel: int) -> int:
    """Bytes of one weight tensor of ``numel`` values stored as NF4 with double-quantized absmax constants:
    packed codes, int8 absmax codes (padded to blocks of 256), float32 scale per 256 constants, float32 offset."""
    n_blocks = -(-numel // NF4_BLOCK)
    n_scales = -(-n_blocks // NF4_ABSMAX_BLOCK)
    return n_blocks * NF4_BLOCK // 2 + n_scales * NF4_ABSMAX_BLOCK + 4 * n_scales + 4


@dataclass
class AdapterPlan:
    """Bytes per GPU for one LoRA / QLoRA training step, with the counts behind them."""

    method: str
    r: int
    targets: list[str] = field(default_factory=list)  # adapted module names (ours)
    trainable: int = 0  # adapter parameters
    frozen: int = 0  # base parameters
    quantized: int = 0  # base parameters stored as NF4
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    workspace: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    def as_gib(self) -> dict[str, float]:
        keys = ("weights", "gradients", "optimizer", "activations", "workspace")
        return {k: getattr(self, k) / GIB for k in keys} | {"total": self.total / GIB}

    def summary(self) -> dict:
        data = asdict(self)
        data["targets"] = len(self.targets)
        return data | {"total": self.total}


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("blocks.")
    }


def lora_targets(model: nn.Module, target_modules: str | list[str] | tuple[str, ...]) -> list[str]:
    """The names of the linear layers LoRA adapts: peft's rule for a list of names, or ``"all-linear"``.
    Raises ValueError listing the layer names that exist when nothing matches."""
    linears = _block_linears(model)
    if target_modules == "all-linear":
        return list(linears)
    if isinstance(target_modules, str):
        target_modules = [t for t in target_modules.split(",") if t]
    wanted = set(target_modules)
    names = [name for name in linears if name.rsplit(".", 1)[-1] in wanted]
    if not names:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise ValueError(
            f"target_modules: {sorted(wanted)} match no linear layer (the layers are {', '.join(leaves)})"
        )
    return names


def peft_memory_plan(
    cfg: ModelConfig,
    method: str = "lora",
    r: int = 8,
    target_modules: str | list[str] | tuple[str, ...] = DEFAULT_TARGETS,
    compute_dtype: str = "bfloat16",
    micro_batch: int = 1,
    context: int | None = None,
    activation_checkpointing: bool = False,
    flash: bool = True,
) -> AdapterPlan:
    """The per-GPU training memory of LoRA (``method="lora"``) or QLoRA (``"qlora"``) of rank ``r`` on
    ``target_modules``, with adapters and activations in ``compute_dtype`` (see the module docstring)."""
    if method not in PEFT_METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(PEFT_METHODS)}")
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r: the rank must be a positive integer, got {r}")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype: {compute_dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    context = context or cfg.max_seq_len
    width = DTYPE_BYTES[compute_dtype]
    from lmforge.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    targets = lora_targets(model, target_modules)
    linears = _block_linears(model)
    trainable = sum(r * (linears[n].in_features + linears[n].out_features) for n in targets)
    params = {id(p): p for p in model.parameters()}  # a tied head counts once
    frozen = sum(p.numel() for p in params.values())
    plan = AdapterPlan(method, r, targets, trainable, frozen)
    if method == "qlora":
        quantized = [m.weight.numel() for m in linears.values()]  # every block linear, as QLoRA stores them
        plan.quantized = sum(quantized)
        plan.weights = sum(nf4_bytes(n) for n in quantized) + (frozen - plan.quantized) * width
        plan.workspace = max(quantized) * width
    else:
        plan.weights = frozen * width
    plan.weights += trainable * width
    plan.gradients = trainable * width
    plan.optimizer = trainable * ADAM_STATE_BYTES
    counted = ParamCount(total=frozen, embedding=0, active=frozen)  # spares memory_plan a second count
    full = memory_plan(
        cfg,
        micro_batch,
        context,
        activation_checkpointing=activation_checkpointing,
        flash=flash,
        params=counted,
    )
    tokens = micro_batch * context
    logits = 4 * tokens * cfg.vocab_size
    # A x of each adapted layer (r values a token) is kept for backward; with checkpointing, one block's worth
    kept = len(targets) / cfg.n_layers if activation_checkpointing else len(targets)
    lora_intermediates = tokens * r * kept * width
    plan.activations = (full.activations - logits) * width / 2 + logits + lora_intermediates
    return plan
