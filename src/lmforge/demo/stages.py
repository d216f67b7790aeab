"""Resumable stages: each finished stage leaves a marker with its report card; a rerun skips it.

A marker is ``RUN/stages/<name>.json`` written atomically after the stage's outputs are complete, so a run
killed mid-stage redoes only that stage. ``restart_from`` removes the markers of a stage and every stage
after it (their outputs are overwritten when they run again).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from lmforge.data.atomic import atomic_write_json
from lmforge.demo.report import StageCard, Table, format_seconds


def card_to_dict(card: StageCard) -> dict:
    return dataclasses.asdict(card)


def card_from_dict(data: dict) -> StageCard:
    tables = [Table(**t) for t in data.get("tables", [])]
    return StageCard(**{**data, "tables": tables})


class StageRunner:
    def __init__(self, run_dir: str | Path, order: Sequence[str], console: Console | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.marker_dir = self.run_dir / "stages"
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        self.order = list(order)
        self.console = console or Console()
        self.cards: dict[str, StageCard] = {}

    def marker(self, name: str) -> Path:
        return self.marker_dir / f"{name}.json"

    def done(self, name: str) -> bool:
        return self.marker(name).is_file()

    def restart_from(self, name: str) -> None:
        if name not in self.order:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(self.order)}")
        for later in self.order[self.order.index(name) :]:
            self.marker(later).unlink(missing_ok=True)

    def run(self, name: str, title: str, work: Callable[[], StageCard]) -> StageCard:
        index = self.order.index(name) + 1
        header = f"[{index}/{len(self.order)}] {title}"
        if self.done(name):
            card = card_from_dict(json.loads(self.marker(name).read_text(encoding="utf-8")))
            self.console.print(
                f"[dim]{header}: done in an earlier run ({format_seconds(card.seconds)}), skipped[/]"
            )
        else:
            self.console.rule(f"[bold]{header}")
            started = time.perf_counter()
            card = work()
            card.seconds = time.perf_counter() - started
            atomic_write_json(self.marker(name), card_to_dict(card))
            self.console.print(f"[green]{title} finished in {format_seconds(card.seconds)}[/]")
        self.cards[name] = card
        return card
