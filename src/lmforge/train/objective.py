"""Objectives: what the one training loop minimises, as a loss summed over a batch's units.

An objective returns the *summed* loss and how many units (tokens, pairs, ...) it covers; the trainer
divides by the units of the whole optimizer step across all micro-batches and data-parallel ranks, so
gradient accumulation, a batch-size ramp and data parallelism all keep per-unit semantics. The unit count
must be computable from the batch alone (``count``), before the forward, so each micro-batch can be
scaled in its own backward pass. Pretraining and SFT use :class:`LMObjective` (SFT batches mask prompt
tokens with ``labels=-100``); preference objectives (DPO, reward models) implement the same protocol
over their own batch format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100
Batch = dict[str, Tensor]


@dataclass
class ObjectiveOutput:
    loss_sum: Tensor  # scalar, summed over ``count`` units (what backward sees, once divided)
    count: int  # units covered
    sums: dict[str, Tensor] = field(default_factory=dict)  # detached summed metrics, reported per unit


class Objective(Protocol):
    name: str

    def count(self, batch: Batch) -> int:
        """Units in ``batch`` the loss is averaged over (known before the forward pass)."""
        ...

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput: ...


def lm_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy (in fp32) over positions whose label is not -100."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a ``nn.Linear`` would run its matmul in here: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` computed ``chunk`` rows at a time, gradients included.

    Each chunk's logits are formed, reduced to its loss, turned into ``softmax - onehot`` and multiplied
    back into the chunk's hidden-state gradient and the accumulated weight gradient, then freed: the
    (rows, vocab) logits tensor and its gradient never exist in full. The gradients are computed in the
    forward pass (as Liger's fused linear cross-entropy does) and only scaled in backward, so memory is
    ``O(rows x d_model + vocab x d_model + chunk x vocab)`` instead of ``O(rows x vocab)``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, compute_dtype: torch.dtype
    ) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = weight.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        )
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk].to(compute_dtype)
            y = labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)
            logits = (h @ w.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            if not (need_hidden or need_weight):
                continue
            # d(sum of losses)/d(logits) = softmax - onehot on valid rows, 0 on ignored ones (in place)
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(len(y), device=y.device), target] -= 1.0
            grad *= valid[:, None]
            grad = grad.to(compute_dtype)
            if need_hidden:
                grad_hidden[start : start + chunk] = grad @ w
            if need_weight:
                grad_weight += (grad.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_lm_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 256) -> Tensor:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without the full logits tensor.

    The same value and gradients as ``lm_loss_sum(F.linear(hidden, weight), labels)`` (up to float
    rounding; the logits are reduced in fp32 and the matmuls run in the autocast dtype when autocast is
    on, as the plain path does), with ``chunk`` positions' logits alive at a time.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    dtype = _compute_dtype(flat.device, flat.dtype)
    return _ChunkedLinearCrossEntropy.apply(flat, weight, labels.reshape(-1), chunk, dtype)


class LMObjective:
    """Causal language modelling: cross-entropy on ``labels`` plus the model's auxiliary (MoE) loss.

    The auxiliary loss is a per-forward mean; it is weighted by the micro-batch's token count so that, after
    the per-token division, it enters the step loss as the token-weighted mean over micro-batches.

    ``chunk_tokens`` > 0 computes the cross-entropy with :func:`chunked_lm_loss_sum` when the model is an
    unwrapped :class:`~lmforge.model.Transformer` with a plain bias-free ``nn.Linear`` head (other models,
    e.g. DDP/FSDP-wrapped or with an adapter on the head, take the plain path): the model returns its
    final hidden states and the head is applied ``chunk_tokens`` positions at a time.
    """

    name = "lm"
    chunk_tokens: int | None = None  # class default too, for subclasses that skip __init__

    def __init__(self, chunk_tokens: int | None = None) -> None:
        if chunk_tokens is not None and chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens  # None: the trainer sets it from precision.loss_chunk_tokens

    def count(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def _head(self, model: nn.Module) -> nn.Linear | None:
        """The head to apply chunk-wise, or None for the plain path."""
        from lmforge.model import Transformer

        if not self.chunk_tokens or not isinstance(model, Transformer):
            return None
        head = model.lm_head
        if type(head) is not nn.Linear or head.bias is not None:
            return None
        # a sharded head (FSDP2 keeps the module a Transformer, its weight a DTensor) takes the plain path
        return None if isinstance(head.weight, DTensor) else head

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        head = self._head(model)
        kwargs = {"return_hidden": True} if head is not None else {}
        out = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            **kwargs,
        )
        labels = batch["labels"]
        count = self.count(batch)
        if head is not None:
            ce_sum = chunked_lm_loss_sum(out.logits, head.weight, labels, self.chunk_tokens)
        else:
            ce_sum = lm_loss_sum(out.logits, labels)
        aux = out.aux_loss.float() * count
        return ObjectiveOutput(
            loss_sum=ce_sum + aux, count=count, sums={"ce": ce_sum.detach(), "aux": aux.detach()}
        )
