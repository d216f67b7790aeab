"""Pipeline steps: generators over documents that keep their own statistics.

Writing a step
--------------
A step is a callable ``step(docs: Iterable[Document]) -> Iterator[Document]``.

* Filters subclass :class:`Filter` and implement ``decide(doc) -> None | str``: ``None`` keeps the
  document, a string is the removal reason (short, snake_case, e.g. ``"gopher_min_words"``).
* Transforms subclass :class:`Step` and override ``process(doc) -> Document | None`` (return the changed
  document; ``None`` removes it with reason ``"dropped"``; call ``self.remove(doc, reason)`` and return
  ``None`` for a precise reason — then it is counted once, under that reason).
* Step-specific counts (e.g. PII matches by type) go into ``self.stats.counters[key] += n``.
* Register the class with ``@register_step("name")`` so recipes can say ``- step: name`` followed by its
  keyword arguments; the constructor's keyword arguments ARE the recipe schema (an unknown key is an
  error naming the step and the key). Call ``super().__init__()`` first.
* Steps travel to worker processes and Ray tasks by pickling, and one instance serves every task of a
  worker: ``__init__`` stores configuration only; load heavy resources (models, word lists) lazily on
  first use and keep no per-task state except in the hooks below. Public attributes are the step's
  configuration (recorded in the run folder's ``pipeline.json``, which a relaunch must match); keep
  lazily loaded resources and per-task state in attributes whose names start with ``_``. The executor gives each task fresh
  :class:`StepStats` and sets the ``exclude``/``reject`` callbacks; a step never opens output files.
* Built-in step modules are found by the pipeline loader: every module under ``lmforge.data`` whose
  source contains ``@register_step(`` is imported when a recipe names a step not yet registered.

Errors
------
An exception raised by ``process``/``decide`` does not take the run down: the document is counted as
rejected (``stats.errors``), sent to the rejects output with reason ``"<step>: <ExceptionType>: <msg>"``
and the stream goes on. Per step and per task, ``docs_in == kept + sum(removed) + errors`` exactly; for a
whole run, ``in = kept + removed + rejected`` (rejected = reader rejects + step errors).

Dataset-level steps (the stage barrier)
---------------------------------------
Some steps need the whole dataset before they can decide about one document (exact dedup across
sources, MinHash-LSH near-dup clusters, lines repeated across many documents). They subclass
:class:`GlobalStep` (or :class:`GlobalFilter` for whole-document decisions) and the executor splits the
pipeline at each of them into stages::

    stage k   : [previous global step, pass 2] + local steps ... + [this global step, pass 1]
    barrier   : this_step.reduce(artifacts of all tasks, decision_dir)      (once, one process)
    stage k+1 : [this global step, pass 2] + local steps ...

Pass 1 (per task, in the worker): ``start_collect(task)`` then ``collect(doc, position)`` for every
document that reaches the step, in stream order (``position`` = 0, 1, 2... counts only the documents
that reached it), then ``write_artifact(path)`` writes what reduce needs (a file the step chooses the
format of, e.g. ``.npy`` of hashes). The documents themselves are stored unchanged between stages, so
pass 2 sees exactly the same documents in the same order.

Barrier (once): ``reduce(artifacts, decision_dir)`` where ``artifacts[task]`` is the artifact path of
task ``task`` (all tasks, in task order, so "keep the first occurrence" is deterministic across the
dataset); it writes its decision (e.g. per task the positions to drop, or a set of boilerplate line
hashes) into the existing folder ``decision_dir``. A step whose reduce splits into independent parts
(``sharded_reduce = True``, e.g. MinHash by LSH bucket) also implements ``reduce_part(artifacts, part,
n_parts, out)`` and ``merge_parts(artifacts, parts, decision_dir)``: an executor with ``n`` workers runs
the ``n`` parts on them, then the (cheap) merge, so no process holds the whole reduce's memory.

Pass 2 (per task): ``load_decision(decision_dir, task)`` then the usual ``process``/``decide``; during
those calls ``self.position`` is the document's position within this task (the same ``position`` that
``collect`` received), so a decision keyed by ``(task, position)`` is applied exactly. A document key
``(task, position)`` is stable and unique across the whole dataset even when ``doc.id`` repeats.
Pass-2 stats are the step's stats in the report (pass 1 removes nothing).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepStats:
        return cls(
            name=data["name"],
            docs_in=data["in"],
            kept=data["kept"],
            removed=Counter(data["removed"]),
            errors=data["errors"],
            seconds=data["seconds"],
            counters=Counter(data["counters"]),
        )


# Called with (document, step name, reason); the executor sets these so removed documents reach the
# exclusion output and failed ones the rejects output.
DocumentSink = Callable[[Document, str, str], None]
Excluder = DocumentSink  # the original name, kept for steps written against it


def error_reason(step_name: str, err: BaseException) -> str:
    message = " ".join(str(err).split())  # one line, bounded: it goes into the rejects file and report
    return f"{step_name}: {type(err).__name__}: {message[:300]}"


class Step:
    """Base class: one pass over a stream of documents."""

    name: str = "step"

    def __init__(self) -> None:
        self.stats = StepStats(self.name)
        self.exclude: DocumentSink | None = None
        self.reject: DocumentSink | None = None

    def process(self, doc: Document) -> Document | None:
        """Return the (possibly changed) document, or None to drop it (counted as removed 'dropped')."""
        return doc

    def remove(self, doc: Document, reason: str) -> None:
        self.stats.removed[reason] += 1
        if self.exclude is not None:
            self.exclude(doc, self.name, reason)

    def reset_stats(self) -> None:
        self.stats = StepStats(self.name)

    def _fail(self, doc: Document, err: Exception) -> None:
        self.stats.errors += 1
        if self.reject is not None:
            self.reject(doc, self.name, error_reason(self.name, err))

    def _apply(self, doc: Document) -> Document | None:
        """Run the step on one document, keeping the counts; None when it was removed or rejected."""
        start = time.perf_counter()
        self.stats.docs_in += 1
        removed_before = self.stats.removed.total()
        try:
            out = self.process(doc)
        except Exception as err:  # one bad document must not take the run down
            self.stats.seconds += time.perf_counter() - start
            self._fail(doc, err)
            return None
        self.stats.seconds += time.perf_counter() - start
        if out is None:
            if self.stats.removed.total() == removed_before:  # process() gave no reason of its own
                self.remove(doc, "dropped")
            return None
        self.stats.kept += 1
        return out

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            out = self._apply(doc)
            if out is not None:
                yield out

    def close(self) -> None:
        """Release resources at the end of a task."""


class Filter(Step):
    """A step that keeps or removes whole documents."""

    def decide(self, doc: Document) -> str | None:
        raise NotImplementedError

    def process(self, doc: Document) -> Document | None:
        reason = self.decide(doc)
        if reason is None:
            return doc
        self.remove(doc, reason)
        return None


class GlobalStep(Step):
    """A dataset-level step, run in two passes around a barrier (see the module docstring)."""

    position: int = -1
    sharded_reduce: ClassVar[bool] = False  # reduce_part + merge_parts may replace reduce

    def start_collect(self, task: int) -> None:
        """Pass 1: reset the per-task collection state."""

    def collect(self, doc: Document, position: int) -> None:
        """Pass 1: record what ``reduce`` needs about one document."""
        raise NotImplementedError

    def write_artifact(self, path: Path) -> None:
        """Pass 1: write this task's collected state to ``path``."""
        raise NotImplementedError

    def reduce(self, artifacts: list[Path], decision_dir: Path) -> None:
        """Barrier: from every task's artifact (``artifacts[task]``) write the decision into ``decision_dir``."""
        raise NotImplementedError

    def reduce_part(self, artifacts: list[Path], part: int, n_parts: int, out: Path) -> None:
        """Sharded barrier (steps with ``sharded_reduce``): part ``part`` of ``n_parts`` independent slices
        of the reduce work, written to ``out``; the executor runs the parts on its workers."""
        raise NotImplementedError

    def merge_parts(self, artifacts: list[Path], parts: list[Path], decision_dir: Path) -> None:
        """Sharded barrier: from every part's output (``parts[part]``) write the decision, as ``reduce``
        would have."""
        raise NotImplementedError

    def load_decision(self, decision_dir: Path, task: int) -> None:
        """Pass 2: load what ``process``/``decide`` need for task ``task``."""
        raise NotImplementedError

    def collect_stream(self, docs: Iterable[Document], task: int, artifact: Path) -> Iterator[Document]:
        """Pass 1 driver: pass documents through unchanged while collecting, then write the artifact.

        A document whose ``collect`` raises is rejected (counted in this step's ``docs_in`` and ``errors``)
        and not passed on, so positions in pass 2 match.
        """
        self.start_collect(task)
        position = 0
        for doc in docs:
            start = time.perf_counter()
            try:
                self.collect(doc, position)
            except Exception as err:
                self.stats.seconds += time.perf_counter() - start
                self.stats.docs_in += 1
                self._fail(doc, err)
                continue
            self.stats.seconds += time.perf_counter() - start
            position += 1
            yield doc
        self.write_artifact(artifact)

    def apply_stream(self, docs: Iterable[Document], decision_dir: Path, task: int) -> Iterator[Document]:
        """Pass 2 driver: load the decision, then process documents with ``self.position`` set."""
        self.load_decision(decision_dir, task)
        for position, doc in enumerate(docs):
            self.position = position
            out = self._apply(doc)
            if out is not None:
                yield out


class GlobalFilter(GlobalStep, Filter):
    """A dataset-level step that keeps or removes whole documents in pass 2 via ``decide``."""


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
