"""A pipeline: readers -> steps -> writer, cut into stages at dataset-level steps, run task by task.

A *task* is one group of input files (one JSONL/Parquet/WARC file, or a batch of .txt/.html files); it
becomes one output file. Tasks run independently in any order, on any worker, so the output depends
only on the input and the pipeline. Each :class:`~lmforge.data.step.GlobalStep` cuts the pipeline into
stages (see ``step.py``): stage ``k`` ends with the step's pass 1 and writes its documents to the run
folder; after the barrier (``reduce``) stage ``k + 1`` starts with its pass 2.

Run folder layout (all of it is what a relaunch resumes from)::

    pipeline.json                        what ran (checked on relaunch: a different pipeline is refused)
    launches.jsonl                       one line per launch: time, host, executor, library versions
    stages/<s>/done/<task>.json          completion marker of a task, with its stats
    stages/<s>/docs/<task>.jsonl.zst     documents between stages      (deleted at the end unless
    stages/<s>/artifacts/<task>          pass-1 artifacts of the global step ending stage s   keep_intermediate)
    stages/<s>/reduce-parts/<k>-of-<n>   edges etc. of part k of a sharded reduce (deleted at the end too)
    stages/<s>/decision/                 what its reduce decided (complete once it exists)
    stages/<s>/reduce.json               which step reduced, in how many seconds
    excluded/<step#>_<step>/<task>.jsonl.gz  removed documents with step and reason (``exclusions``)
    rejects/<s>/<task>.jsonl.gz          records that were rejected, with the reason
    stats.json                           the final report
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec

from lmforge.data.atomic import atomic_write_json
from lmforge.data.document import Document
from lmforge.data.io import JsonlRecordFile, Reader, Reject, Writer, preview
from lmforge.data.step import DocumentSink, GlobalStep, Step

if TYPE_CHECKING:
    pass

_CONFIG_ATTRS_SKIPPED = {"stats", "exclude", "reject", "position"}


@dataclass
class StageStep:
    index: int  # position in the pipeline's step list
    step: Step
    mode: str  # "local", "collect" (global pass 1) or "apply" (global pass 2)


def plan_stages(steps: Sequence[Step]) -> list[list[StageStep]]:
    stages: list[list[StageStep]] = [[]]
    for index, step in enumerate(steps):
        if isinstance(step, GlobalStep):
            stages[-1].append(StageStep(index, step, "collect"))
            stages.append([StageStep(index, step, "apply")])
        else:
            stages[-1].append(StageStep(index, step, "local"))
    return stages


class RunPaths:
    """Where everything of a run lives (a local or shared-filesystem folder)."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.root = Path(run_dir)

    def stage(self, stage: int) -> Path:
        return self.root / "stages" / str(stage)

    def done(self, stage: int, task: int) -> Path:
        return self.stage(stage) / "done" / f"{task:05d}.json"

    def docs(self, stage: int) -> Path:
        return self.stage(stage) / "docs"

    def artifact(self, stage: int, task: int) -> Path:
        return self.stage(stage) / "artifacts" / f"{task:05d}"

    def decision(self, stage: int) -> Path:
        return self.stage(stage) / "decision"

    def reduce_part(self, stage: int, part: int, n_parts: int) -> Path:
        return self.stage(stage) / "reduce-parts" / f"{part:03d}-of-{n_parts:03d}"

    def reduced(self, stage: int) -> Path:
        return self.stage(stage) / "reduce.json"

    def excluded(self, step_index: int, step_name: str, task: int) -> Path:
        return self.root / "excluded" / f"{step_index:02d}_{step_name}" / f"{task:05d}.jsonl.gz"

    def rejects(self, stage: int, task: int) -> Path:
        return self.root / "rejects" / str(stage) / f"{task:05d}.jsonl.gz"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "pipeline.json"


class PipelineError(RuntimeError):
    """Tasks failed (not single documents: those are rejects), or a run folder does not fit the pipeline."""


def claim_run_folder(pipeline: Pipeline, run_dir: str | os.PathLike[str]) -> None:
    """Record which pipeline runs in ``run_dir``; refuse to resume it with a different one."""
    paths = RunPaths(run_dir)
    current = json.loads(json.dumps(pipeline.fingerprint()))
    if paths.fingerprint.exists():
        previous = json.loads(paths.fingerprint.read_text(encoding="utf-8"))
        if previous != current:
            changed = sorted(k for k in current.keys() | previous.keys() if current.get(k) != previous.get(k))
            raise PipelineError(
                f"{paths.root} holds a run of a different pipeline (differs in: {', '.join(changed)}); "
                "use a new run folder, or delete this one to start over"
            )
    else:
        atomic_write_json(paths.fingerprint, current, sort_keys=True)


def step_config(step: Step) -> dict[str, Any]:
    """The step's public attributes (its configuration) in a form that is the same in every process:
    the run fingerprint a relaunch must match."""
    return {
        key: _canonical(value)
        for key, value in sorted(vars(step).items())
        if not key.startswith("_") and key not in _CONFIG_ATTRS_SKIPPED
    }


def _canonical(value: Any) -> Any:
    """JSON-ready, independent of set order and of object addresses (which differ between processes)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, set | frozenset):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


class _TaskOutputs:
    """The exclusion and rejects files of one task, opened on first use and committed together."""

    def __init__(self, paths: RunPaths, stage: int, task: int, exclusions: bool) -> None:
        self.paths, self.stage, self.task, self.exclusions = paths, stage, task, exclusions
        self.fs = fsspec.filesystem("file")
        self.files: dict[Path, JsonlRecordFile] = {}
        self.reader_rejects: Counter[str] = Counter()

    def _file(self, path: Path) -> JsonlRecordFile:
        if path not in self.files:
            self.files[path] = JsonlRecordFile(self.fs, str(path))
        return self.files[path]

    def reject_record(self, reject: Reject) -> None:
        self.reader_rejects[reject.reason.split(":", 1)[0]] += 1
        self._file(self.paths.rejects(self.stage, self.task)).write({**reject.to_record(), "step": None})

    def rejecter(self, step_index: int) -> DocumentSink:
        def reject(doc: Document, step_name: str, reason: str) -> None:
            record = {"where": doc.id, "id": doc.id, "reason": reason, "preview": preview(doc.text)}
            record["step"] = f"{step_index:02d}_{step_name}"
            self._file(self.paths.rejects(self.stage, self.task)).write(record)

        return reject

    def excluder(self, step_index: int) -> DocumentSink | None:
        def exclude(doc: Document, step_name: str, reason: str) -> None:
            record = {**doc.to_record(), "step": step_name, "reason": reason}
            self._file(self.paths.excluded(step_index, step_name, self.task)).write(record)

        return exclude if self.exclusions else None

    def commit(self) -> None:
        for file in self.files.values():
            file.commit()

    def abort(self) -> None:
        for file in self.files.values():
            file.abort()


class Pipeline:
    """Readers -> steps -> writer. ``run`` executes it into a run folder (locally or on Ray).

    >>> pipeline = Pipeline(JsonlReader("raw/*.jsonl.gz"), [GopherQuality()], Writer("clean/"))
    >>> LocalExecutor(workers=2).run(pipeline, "runs/clean")   # lmforge.data.executor (or RayExecutor)
    """

    def __init__(
        self,
        readers: Reader | Sequence[Reader],
        steps: Sequence[Step],
        writer: Writer,
        *,
        exclusions: bool = True,
        keep_intermediate: bool = False,
    ) -> None:
        self.readers = [readers] if isinstance(readers, Reader) else list(readers)
        if not self.readers:
            raise ValueError("a pipeline needs at least one reader")
        self.steps = list(steps)
        self.writer = writer
        self.exclusions = exclusions
        self.keep_intermediate = keep_intermediate  # documents between stages; deleted when the run is done
        self.stages = plan_stages(self.steps)
        self._tasks: list[tuple[int, list[str]]] | None = None

    def tasks(self) -> list[tuple[int, list[str]]]:
        """``(reader index, files)`` per task; listed once, in the driver, then shipped to workers."""
        if self._tasks is None:
            self._tasks = [(r, files) for r, reader in enumerate(self.readers) for files in reader.tasks()]
        return self._tasks

    def fingerprint(self) -> dict[str, Any]:
        """What determines the output: refuse to resume a run folder against a different pipeline."""
        return {
            "inputs": [
                {"format": r.format, "source": r.source, "max_doc_bytes": r.max_doc_bytes, "tasks": r.tasks()}
                for r in self.readers
            ],
            "steps": [{"step": s.name, **step_config(s)} for s in self.steps],
            "output": {"folder": self.writer.folder, "format": self.writer.format},
            "exclusions": self.exclusions,
        }

    def remove_intermediate(self, run_dir: str | os.PathLike[str]) -> None:
        """Delete the documents and artifacts between stages (a finished run no longer needs them)."""
        paths = RunPaths(run_dir)
        for stage in range(len(self.stages) - 1):
            shutil.rmtree(paths.docs(stage), ignore_errors=True)
            shutil.rmtree(paths.artifact(stage, 0).parent, ignore_errors=True)
            shutil.rmtree(paths.reduce_part(stage, 0, 1).parent, ignore_errors=True)

    # --- what a worker does ---------------------------------------------------------------------------

    def _stage_input(self, paths: RunPaths, stage: int, task: int) -> tuple[Reader, list[str], int]:
        if stage == 0:
            reader_index, files = self.tasks()[task]
            reader = self.readers[reader_index]
            return reader, files, sum(reader.fs.size(f) for f in files)
        writer = Writer(str(paths.docs(stage - 1)), "jsonl.zst")
        return writer.reader(), [writer.path(task)], 0

    def run_task(self, run_dir: str | os.PathLike[str], stage: int, task: int) -> dict[str, Any]:
        """Run one task of one stage and write its completion marker; returns the marker's content."""
        start = time.perf_counter()
        paths = RunPaths(run_dir)
        reader, files, input_bytes = self._stage_input(paths, stage, task)
        final = stage == len(self.stages) - 1
        writer = self.writer if final else Writer(str(paths.docs(stage)), "jsonl.zst")
        outputs = _TaskOutputs(paths, stage, task, self.exclusions)
        counts = Counter[str]()

        def documents(items: Iterable[Document | Reject]) -> Iterator[Document]:
            for item in items:
                counts["read"] += 1
                if isinstance(item, Reject):
                    outputs.reject_record(item)
                else:
                    yield item

        stream: Iterator[Document] = documents(reader.read(files))
        for planned in self.stages[stage]:
            step = planned.step
            step.reset_stats()
            step.exclude = outputs.excluder(planned.index)
            step.reject = outputs.rejecter(planned.index)
            if planned.mode == "local":
                stream = step(stream)
            elif planned.mode == "collect":
                artifact = paths.artifact(stage, task)
                artifact.parent.mkdir(parents=True, exist_ok=True)
                stream = step.collect_stream(stream, task, artifact)  # type: ignore[attr-defined]
            else:
                stream = step.apply_stream(stream, paths.decision(stage - 1), task)  # type: ignore[attr-defined]

        out = writer.open(task)
        try:
            for doc in stream:
                out.write(doc.to_record())
            for planned in self.stages[stage]:
                planned.step.close()
            out.commit()
            outputs.commit()
        except BaseException:
            out.abort()
            outputs.abort()
            for planned in self.stages[stage]:
                with contextlib.suppress(Exception):  # the task failed already; report that error
                    planned.step.close()
            raise

        marker = {
            "stage": stage,
            "task": task,
            "files": files,
            "input_bytes": input_bytes,
            "read": counts["read"],
            "reader_rejects": dict(sorted(outputs.reader_rejects.items())),
            "written": out.count,
            "steps": [
                {"index": p.index, "mode": p.mode, **p.step.stats.to_dict()} for p in self.stages[stage]
            ],
            "seconds": round(time.perf_counter() - start, 4),
        }
        atomic_write_json(paths.done(stage, task), marker, sort_keys=True)
        return marker

    def global_step(self, stage: int) -> GlobalStep:
        """The dataset-level step whose barrier ends ``stage``."""
        step = self.stages[stage][-1].step
        assert isinstance(step, GlobalStep)
        return step

    def reduce_part(self, run_dir: str | os.PathLike[str], stage: int, part: int, n_parts: int) -> None:
        """One part of a sharded barrier (see :meth:`GlobalStep.reduce_part`); a finished part is kept."""
        paths = RunPaths(run_dir)
        out = paths.reduce_part(stage, part, n_parts)
        if out.exists():
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(out.name + ".partial")
        artifacts = [paths.artifact(stage, t) for t in range(len(self.tasks()))]
        self.global_step(stage).reduce_part(artifacts, part, n_parts, partial)
        os.replace(partial, out)

    def reduce(self, run_dir: str | os.PathLike[str], stage: int, n_parts: int = 0) -> None:
        """The barrier after ``stage``: its global step's reduce over every task's artifact, or with
        ``n_parts`` the merge of that many finished :meth:`reduce_part` outputs."""
        paths = RunPaths(run_dir)
        step = self.global_step(stage)
        decision = paths.decision(stage)
        partial = decision.with_name("decision.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        start = time.perf_counter()
        artifacts = [paths.artifact(stage, t) for t in range(len(self.tasks()))]
        if n_parts:
            parts = [paths.reduce_part(stage, k, n_parts) for k in range(n_parts)]
            step.merge_parts(artifacts, parts, partial)
        else:
            step.reduce(artifacts, partial)
        seconds = round(time.perf_counter() - start, 4)
        atomic_write_json(
            paths.reduced(stage), {"step": self.stages[stage][-1].index, "seconds": seconds}, sort_keys=True
        )
        os.replace(partial, decision)
