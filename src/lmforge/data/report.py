"""The final report of a pipeline run: totals, per-step table on the console, ``stats.json``."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.step import StepStats


@dataclass
class RunReport:
    """Totals over every task of every stage; ``docs_in == kept + removed + rejected`` when balanced."""

    tasks: int
    stages: int
    input_bytes: int = 0
    docs_in: int = 0
    kept: int = 0
    reader_rejects: Counter[str] = field(default_factory=Counter)
    steps: list[StepStats] = field(default_factory=list)
    task_seconds: float = 0.0  # summed over tasks and barriers: the work, whatever the number of workers
    wall_seconds: float = 0.0  # of the invocation that finished the run

    @property
    def removed(self) -> int:
        return sum(s.removed.total() for s in self.steps)

    @property
    def rejected(self) -> int:
        return self.reader_rejects.total() + sum(s.errors for s in self.steps)

    @property
    def balanced(self) -> bool:
        return self.docs_in == self.kept + self.removed + self.rejected

    @classmethod
    def from_markers(
        cls,
        step_names: list[str],
        stages: int,
        tasks: int,
        markers: list[dict[str, Any]],
        reduces: Sequence[dict[str, Any]] = (),
    ) -> RunReport:
        """Sum the task markers (and the barriers' reduce times) of a run."""
        report = cls(tasks=tasks, stages=stages, steps=[StepStats(name) for name in step_names])
        for reduce in reduces:
            report.steps[reduce["step"]].seconds += reduce["seconds"]
            report.task_seconds += reduce["seconds"]
        for marker in markers:
            if marker["stage"] == 0:
                report.docs_in += marker["read"]
                report.input_bytes += marker["input_bytes"]
            if marker["stage"] == stages - 1:
                report.kept += marker["written"]
            report.reader_rejects.update(marker["reader_rejects"])
            report.task_seconds += marker["seconds"]
            for step in marker["steps"]:
                report.steps[step["index"]].merge(StepStats.from_dict(step))
        return report

    def to_dict(self) -> dict[str, Any]:
        mb = self.input_bytes / 1e6
        return {
            "totals": {
                "in": self.docs_in,
                "kept": self.kept,
                "removed": self.removed,
                "rejected": self.rejected,
                "balanced": self.balanced,
            },
            "reader_rejects": dict(sorted(self.reader_rejects.items())),
            "steps": [{"index": i, **s.to_dict()} for i, s in enumerate(self.steps)],
            "tasks": self.tasks,
            "stages": self.stages,
            "input_mb": round(mb, 3),
            "task_seconds": round(self.task_seconds, 3),
            "wall_seconds": round(self.wall_seconds, 3),
            "mb_per_core_second": round(mb / self.task_seconds, 3) if self.task_seconds else None,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="data pipeline", show_footer=False)
        for column in ("#", "step", "in", "kept", "removed", "errors", "top removal reasons", "s"):
            # fold: a narrow terminal wraps a long reason (even inside a word) instead of cutting it
            overflow = "fold" if column in ("step", "top removal reasons") else "ellipsis"
            table.add_column(
                column,
                justify="left" if column in ("step", "top removal reasons") else "right",
                overflow=overflow,
            )
        if self.reader_rejects:
            reasons = ", ".join(f"{k} {v}" for k, v in self.reader_rejects.most_common(3))
            table.add_row(
                "", "(reader)", str(self.docs_in), "", "", str(self.reader_rejects.total()), reasons, ""
            )
        for index, s in enumerate(self.steps):
            reasons = ", ".join(f"{k} {v}" for k, v in s.removed.most_common(3))
            table.add_row(
                str(index),
                s.name,
                str(s.docs_in),
                str(s.kept),
                str(s.removed.total()),
                str(s.errors),
                reasons,
                f"{s.seconds:.2f}",
            )
        console = Console()
        if not console.is_terminal:
            # Piped or redirected output has no width to respect (rich would assume 80 columns): the table
            # takes the width its cells need, so a log file holds every reason whole, on one row.
            console = Console(width=Console(width=100_000).measure(table).maximum)
        console.print(table)
        check = "balanced" if self.balanced else "NOT BALANCED"
        console.print(
            f"in {self.docs_in} = kept {self.kept} + removed {self.removed} + rejected {self.rejected} ({check}); "
            f"{self.tasks} task(s), {self.input_bytes / 1e6:.1f} MB in {self.task_seconds:.1f} task-s"
        )
