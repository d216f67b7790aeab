"""Small steps for pipeline/executor tests (registered as ``toy_*``; imported by worker processes too)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lmforge.data.document import Document
from lmforge.data.step import Filter, GlobalFilter, Step, register_step


@register_step("toy_min_words")
class MinWords(Filter):
    def __init__(self, min_words: int = 3) -> None:
        super().__init__()
        self.min_words = min_words

    def decide(self, doc: Document) -> str | None:
        return "too_few_words" if len(doc.text.split()) < self.min_words else None


@register_step("toy_tag")
class Tag(Step):
    """Marks documents (a transform) and fails on a trigger word (to exercise step errors)."""

    def __init__(self, fail_on: str = "KABOOM", delay_s: float = 0.0) -> None:
        super().__init__()
        self.fail_on, self.delay_s = fail_on, delay_s

    def process(self, doc: Document) -> Document | None:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on in doc.text:
            raise ValueError(f"found {self.fail_on}")
        doc.meta["tagged"] = True
        self.stats.counters["chars"] += len(doc.text)
        return doc


@register_step("toy_fail_task")
class FailTask(Step):
    """Fails a whole task (an infrastructure failure, not a bad document) that holds a document with
    ``trigger`` in it, while the ``flag`` file exists."""

    def __init__(self, flag: str = "", trigger: str = "") -> None:
        super().__init__()
        self.flag, self.trigger = flag, trigger
        self._triggered = False

    def process(self, doc: Document) -> Document | None:
        self._triggered = self._triggered or self.trigger in doc.text
        return doc

    def close(self) -> None:
        triggered, self._triggered = self._triggered, False
        if triggered and os.path.exists(self.flag):
            raise OSError("disk on fire")


@register_step("toy_text_dedup")
class TextDedup(GlobalFilter):
    """Keeps the first occurrence (in task order) of each exact text across the whole dataset."""

    def start_collect(self, task: int) -> None:
        self.texts: list[str] = []

    def collect(self, doc: Document, position: int) -> None:
        self.texts.append(doc.text.strip())

    def write_artifact(self, path: Path) -> None:
        path.write_text(json.dumps(self.texts), encoding="utf-8")

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        seen: set[str] = set()
        for task, path in enumerate(artifacts):
            drop = []
            for position, text in enumerate(json.loads(path.read_text(encoding="utf-8"))):
                if text in seen:
                    drop.append(position)
                seen.add(text)
            (decision_dir / f"{task}.json").write_text(json.dumps(drop), encoding="utf-8")

    def load_decision(self, decision_dir: Path, task: int) -> None:
        self.drop = set(json.loads((decision_dir / f"{task}.json").read_text(encoding="utf-8")))

    def decide(self, doc: Document) -> str | None:
        return "duplicate" if self.position in self.drop else None


@register_step("toy_pid_log")
class PidLog(Step):
    """Appends the pid of every worker process that runs it to ``path`` (once per process)."""

    def __init__(self, path: str = "") -> None:
        super().__init__()
        self.path = path
        self._logged = False

    def process(self, doc: Document) -> Document | None:
        if not self._logged:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
            self._logged = True
        return doc
