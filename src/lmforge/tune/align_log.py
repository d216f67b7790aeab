"""Metrics of the alignment objectives beyond the loss, per training step and on held-out data.

The trainer logs the loss; an objective's other sums (accuracy, margins, rewards) are gathered by
:class:`AlignMetrics` while it trains (``model.training``) and written every ``every_steps`` optimizer steps
to ``RUN/align_metrics.jsonl`` as per-unit means over the steps since the last record.
:meth:`AlignMetrics.hook` is the trainer's ``batch_hook``: it sees the step number before each micro-batch,
which is when the previous step is complete. :func:`evaluate` gives the same means over held-out batches.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.train.objective import Batch, Objective


class Means:
    """Sums of metrics and, per metric, the units they cover (pairs, replies, tokens); :meth:`means` per unit."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.units: dict[str, int] = {}

    def add(self, sums: dict[str, Tensor], units: int) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
            self.units[key] = self.units.get(key, 0) + units

    def means(self) -> dict[str, float]:
        return {key: value / max(self.units[key], 1) for key, value in self.sums.items()}


class AlignMetrics(Means):
    def __init__(self, path: str | Path, every_steps: int) -> None:
        super().__init__()
        self.path = Path(path)
        self.every_steps = max(1, every_steps)
        self.step = 0

    def flush(self, step: int) -> None:
        """Append the means since the last record (as of ``step`` completed steps) and start over."""
        if self.units:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **self.means()}) + "\n")
        self.sums, self.units = {}, {}

    def hook(self, step: int, batch: Batch) -> Batch:
        if step < self.step:  # the trainer rolled back to a checkpoint: forget what came after it
            self.truncate(step)
        elif step != self.step and step % self.every_steps == 0:
            self.flush(step)
        self.step = step
        return batch

    def truncate(self, step: int) -> None:
        """Drop the records after ``step`` and the sums gathered since the last record."""
        self.sums, self.units = {}, {}
        if self.path.is_file():
            kept = [
                line
                for line in self.path.read_text(encoding="utf-8").splitlines()
                if json.loads(line)["step"] <= step
            ]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def pair_sums(r_chosen: Tensor, r_rejected: Tensor) -> dict[str, Tensor]:
    """Summed pair metrics of rewards (a reward model's scores, or DPO's implicit rewards)."""
    return {
        "accuracy": (r_chosen > r_rejected).float().sum(),
        "margin": (r_chosen - r_rejected).sum(),
        "chosen": r_chosen.sum(),
        "rejected": r_rejected.sum(),
    }


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Iterable[Batch]) -> dict[str, float]:
    """The objective's per-unit loss and metric means over ``batches`` (the model in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals, units = Means(), 0
    for batch in batches:
        out = objective(model, {k: v.to(device) for k, v in batch.items()})
        totals.add({"loss": out.loss_sum.detach(), **out.sums}, out.count)
        units += out.count
    model.train(was_training)
    return {"units": units, **totals.means()}
