"""Per-step metrics of the alignment objectives, next to the trainer's own log.

The trainer logs the loss; an objective's other sums (accuracy, margins, rewards) are gathered here while it
trains (``model.training``) and written every ``every_steps`` optimizer steps to ``RUN/align_metrics.jsonl``
as per-unit means over the steps since the last record. :meth:`AlignMetrics.hook` is the trainer's
``batch_hook``: it sees the step number before each micro-batch, which is when the previous step is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from lmforge.train.objective import Batch


class AlignMetrics:
    def __init__(self, path: str | Path, every_steps: int) -> None:
        self.path = Path(path)
        self.every_steps = max(1, every_steps)
        self.sums: dict[str, float] = {}
        self.units = 0
        self.step = 0

    def add(self, sums: dict[str, Tensor], units: int) -> None:
        for key, value in sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.units += units

    def means(self) -> dict[str, float]:
        return {key: value / max(self.units, 1) for key, value in self.sums.items()}

    def flush(self, step: int) -> None:
        """Append the means since the last record (as of ``step`` completed steps) and start over."""
        if self.units:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **self.means()}) + "\n")
        self.sums, self.units = {}, 0

    def hook(self, step: int, batch: Batch) -> Batch:
        if step != self.step:
            if step % self.every_steps == 0:
                self.flush(step)
            self.step = step
        return batch
