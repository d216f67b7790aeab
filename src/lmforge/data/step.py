"""Pipeline steps: generators over documents that keep their own statistics.

A step is a callable ``step(docs: Iterable[Document]) -> Iterator[Document]``. Filters subclass
:class:`Filter` and implement ``decide(doc) -> None | str`` (``None`` keeps the document, a string is the
removal reason); transforms subclass :class:`Step` and override ``process``. Every step counts documents
in, kept, removed by reason and errors, and the time it spent. Steps are registered by name with
:func:`register_step` so YAML recipes can declare them (``- step: gopher_quality`` plus its keyword
arguments).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lmforge.data.document import Document


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    kept: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    seconds: float = 0.0
    counters: Counter[str] = field(default_factory=Counter)  # step-specific counts (e.g. PII by type)

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.kept += other.kept
        self.removed.update(other.removed)
        self.errors += other.errors
        self.seconds += other.seconds
        self.counters.update(other.counters)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "in": self.docs_in,
            "kept": self.kept,
            "removed": dict(sorted(self.removed.items())),
            "removed_total": sum(self.removed.values()),
            "errors": self.errors,
            "seconds": round(self.seconds, 4),
            "counters": dict(sorted(self.counters.items())),
        }


# Called with (document, step name, reason) for every removed document; set by the executor so removed
# documents reach the exclusion output.
Excluder = Callable[[Document, str, str], None]


class Step:
    """Base class: one pass over a stream of documents."""

    name: str = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)
        self.exclude: Excluder | None = None

    def process(self, doc: Document) -> Document | None:
        """Return the (possibly changed) document, or None to drop it (counted as removed 'dropped')."""
        return doc

    def remove(self, doc: Document, reason: str) -> None:
        self.stats.removed[reason] += 1
        if self.exclude is not None:
            self.exclude(doc, self.name, reason)

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            start = time.perf_counter()
            self.stats.docs_in += 1
            try:
                out = self.process(doc)
            except Exception:  # a bad document must not take the run down; the executor logs rejects
                self.stats.errors += 1
                self.stats.seconds += time.perf_counter() - start
                raise
            self.stats.seconds += time.perf_counter() - start
            if out is None:
                self.remove(doc, "dropped")
                continue
            self.stats.kept += 1
            yield out

    def close(self) -> None:
        """Release resources at the end of a task."""


class Filter(Step):
    """A step that keeps or removes whole documents."""

    def decide(self, doc: Document) -> str | None:
        raise NotImplementedError

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            start = time.perf_counter()
            self.stats.docs_in += 1
            try:
                reason = self.decide(doc)
            except Exception:
                self.stats.errors += 1
                self.stats.seconds += time.perf_counter() - start
                raise
            self.stats.seconds += time.perf_counter() - start
            if reason is None:
                self.stats.kept += 1
                yield doc
            else:
                self.remove(doc, reason)


STEPS: dict[str, type[Step]] = {}
S = TypeVar("S", bound=type[Step])


def register_step(name: str) -> Callable[[S], S]:
    """Class decorator: make a step available to YAML recipes as ``step: <name>``."""

    def wrap(cls: S) -> S:
        if name in STEPS and STEPS[name] is not cls:
            raise ValueError(f"step name {name!r} is registered twice")
        cls.name = name
        STEPS[name] = cls
        return cls

    return wrap
