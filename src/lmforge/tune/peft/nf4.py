"""4-bit NormalFloat (NF4) base weights with double quantization for QLoRA (Dettmers et al. 2023).

The format and its math live in the model layer (:mod:`lmforge.model.quant`, which also serves NF4 models for
inference); this module names the pieces QLoRA uses and stores a model's block linears as NF4 for training.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.quant import NF4_ABSMAX_BLOCK, NF4_BLOCK, NF4_CODES, NF4Linear, NF4Weight

BLOCK = NF4_BLOCK  # values per absmax constant
ABSMAX_BLOCK = NF4_ABSMAX_BLOCK  # absmax constants per 8-bit scale (double quantization)

__all__ = ["ABSMAX_BLOCK", "BLOCK", "NF4_CODES", "NF4Linear", "NF4Weight", "quantize_linears"]


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
    """Store every linear layer of the Transformer blocks as NF4 (in place; embeddings and LM head stay)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.startswith("blocks."):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, NF4Linear(module, compute_dtype))
