"""Prefix-LM training (UL2's S-denoiser, U-PaLM's continued training): a random split of each row into a prefix,
attended bidirectionally, and a continuation, attended causally and the only part the loss covers.

A batch source draws the split (so the objective's token count is known before the forward pass) and masks
the labels whose target lies inside the prefix: a prefix position sees the tokens after it, so predicting
them would be copying. The objective passes ``prefix_lengths`` to a ``structure: prefix`` Transformer, whose
attention mask (``lmforge.model.attention.attention_mask``) opens the prefix both ways.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.train.objective import IGNORE_INDEX, Batch, LMObjective, ObjectiveOutput, lm_loss_sum


def prefix_lm_labels(
    labels: torch.Tensor, prefix_lengths: torch.Tensor, positions: torch.Tensor | None = None
):
    """``labels`` (batch, seq; label t is the token after position t) with every target inside the prefix set
    to -100. With ``positions`` (packed documents whose positions restart) the prefix is the first
    prefix_length positions of each document, as the attention mask applies it; the target of label t is at
    positions[t + 1] (for the last label, positions[-1] + 1)."""
    if positions is None:
        positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    target_pos = torch.cat((positions[:, 1:], positions[:, -1:] + 1), dim=1)
    return labels.masked_fill(target_pos < prefix_lengths.to(labels.device)[:, None], IGNORE_INDEX)


class PrefixLMBatches:
    """Adds a random ``prefix_lengths`` (uniform in 1..seq-1, per row) to each batch of a token loader and masks
    the labels of prefix targets. The n-th batch's split comes from a generator seeded with (seed, n), and
    ``state_dict`` carries n with the loader's position, so resumes and rollbacks split the same way."""

    def __init__(self, loader: Iterator[Batch], seed: int = 0) -> None:
        self.loader, self.seed, self.batches = loader, seed, 0

    def __iter__(self) -> PrefixLMBatches:
        return self

    def __next__(self) -> Batch:
        batch = dict(next(self.loader))
        rows, length = batch["input_ids"].shape[:2]
        if length < 2:
            raise ValueError(f"input_ids: a prefix-LM row needs at least 2 tokens, got {length}")
        rng = np.random.default_rng([self.seed, self.batches])
        self.batches += 1
        prefix = torch.from_numpy(rng.integers(1, length, size=rows)).long()
        batch["prefix_lengths"] = prefix
        batch["labels"] = prefix_lm_labels(batch["labels"], prefix, batch.get("position_ids"))
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict(), "batches": self.batches}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["loader"])  # type: ignore[attr-defined]
        self.batches = state["batches"]


class PrefixLMObjective(LMObjective):
    """Next-token cross-entropy on the continuation (labels not -100) of a prefix decoder given each row's
    ``prefix_lengths``, plus the model's auxiliary (MoE) loss weighted as in :class:`LMObjective`."""

    name = "prefix_lm"

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        if "prefix_lengths" not in batch:
            raise ValueError("prefix_lengths: missing from the batch (use PrefixLMBatches)")
        out = model(
            batch["input_ids"],
            position_ids=batch.get("position_ids"),
            segment_ids=batch.get("segment_ids"),
            prefix_lengths=batch["prefix_lengths"],
        )
        count = self.count(batch)
        ce_sum = lm_loss_sum(out.logits, batch["labels"])
        aux = out.aux_loss.float() * count
        return ObjectiveOutput(
            loss_sum=ce_sum + aux, count=count, sums={"ce": ce_sum.detach(), "aux": aux.detach()}
        )
