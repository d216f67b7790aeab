"""Executors: run a pipeline's tasks locally (a pool of worker processes) or on a Ray cluster.

Both share the same driver loop: for each stage, run the tasks that have no completion marker yet,
then the stage barrier (the global step's reduce) unless its decision already exists. A relaunch into
the same run folder therefore redoes only what had not finished; a task's files are committed by
rename before its marker is written, so a task killed half-way leaves nothing that counts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import pickle
import platform
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lmforge.data.pipeline import Pipeline, PipelineError, RunPaths, claim_run_folder
from lmforge.data.report import RunReport

EXECUTORS = ("local", "ray")

TaskDone = Callable[[dict[str, Any] | None], None]  # called with a finished task's marker (None: failed)


def _progress(bar: tqdm) -> TaskDone:
    docs = 0

    def finished(marker: dict[str, Any] | None) -> None:
        nonlocal docs
        docs += marker["read"] if marker else 0
        bar.set_postfix(docs=docs, refresh=False)
        bar.update(1)

    return finished


_VERSIONED = (
    "lmforge",
    "numpy",
    "pyarrow",
    "fsspec",
    "zstandard",
    "trafilatura",
    "py3langid",
    "ftfy",
    "warcio",
    "ray",
)


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


class Executor:
    """The driver loop; subclasses say how a list of tasks and a barrier are run."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers

    def run(self, pipeline: Pipeline, run_dir: str | os.PathLike[str], *, progress: bool = True) -> RunReport:
        start = time.perf_counter()
        paths = RunPaths(run_dir)
        paths.root.mkdir(parents=True, exist_ok=True)
        n_tasks = len(pipeline.tasks())
        claim_run_folder(pipeline, paths.root)
        self._log_launch(paths)
        n_stages = len(pipeline.stages)
        for stage in range(n_stages):
            pending = [t for t in range(n_tasks) if not paths.done(stage, t).exists()]
            if pending:
                desc = f"stage {stage + 1}/{n_stages}" if n_stages > 1 else "tasks"
                with tqdm(total=n_tasks, initial=n_tasks - len(pending), desc=desc, unit="task",
                          disable=not progress) as bar:  # fmt: skip
                    failures = self.run_tasks(pipeline, str(paths.root), stage, pending, _progress(bar))
                if failures:
                    lines = "\n".join(f"  task {t}: {err}" for t, err in sorted(failures.items()))
                    raise PipelineError(
                        f"{len(failures)} task(s) of stage {stage} failed; relaunch to redo only those:\n{lines}"
                    )
            if stage < n_stages - 1 and not paths.decision(stage).exists():
                self.reduce(pipeline, str(paths.root), stage)
        markers = [
            json.loads(paths.done(s, t).read_text(encoding="utf-8"))
            for s in range(n_stages)
            for t in range(n_tasks)
        ]
        reduces = [json.loads(paths.reduced(s).read_text(encoding="utf-8")) for s in range(n_stages - 1)]
        report = RunReport.from_markers([s.name for s in pipeline.steps], n_stages, n_tasks, markers, reduces)
        if not pipeline.keep_intermediate:
            pipeline.remove_intermediate(paths.root)
        report.wall_seconds = time.perf_counter() - start
        report.write(paths.stats)
        if progress:
            report.print()
        return report

    def _log_launch(self, paths: RunPaths) -> None:
        """One line per launch in ``launches.jsonl``: when, where, how, with which library versions (a
        resumed run may mix launches)."""
        launch = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "executor": type(self).__name__,
            "workers": self.workers,
            "python": platform.python_version(),
            "versions": _versions(),
        }
        with (paths.root / "launches.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(launch) + "\n")

    def run_tasks(
        self, pipeline: Pipeline, run_dir: str, stage: int, tasks: list[int], finished: TaskDone
    ) -> dict[int, str]:
        """Run ``tasks`` of ``stage``, calling ``finished(marker or None)`` as each ends; return the
        failures as ``{task: error}``."""
        raise NotImplementedError

    def reduce(self, pipeline: Pipeline, run_dir: str, stage: int) -> None:
        """The barrier; a sharded one runs its parts on the workers (one part each), then the merge."""
        n_parts = self.workers if pipeline.global_step(stage).sharded_reduce and self.workers > 1 else 0
        if n_parts:
            failures = self.run_reduce_parts(pipeline, run_dir, stage, n_parts)
            if failures:
                lines = "\n".join(f"  part {k}: {err}" for k, err in sorted(failures.items()))
                raise PipelineError(
                    f"{len(failures)} reduce part(s) of stage {stage} failed; relaunch to redo only those:\n{lines}"
                )
        self.merge(pipeline, run_dir, stage, n_parts)

    def run_reduce_parts(self, pipeline: Pipeline, run_dir: str, stage: int, n_parts: int) -> dict[int, str]:
        """Run the ``n_parts`` parts of a sharded barrier; return the failures as ``{part: error}``."""
        raise NotImplementedError

    def merge(self, pipeline: Pipeline, run_dir: str, stage: int, n_parts: int) -> None:
        pipeline.reduce(run_dir, stage, n_parts)


# --- local ----------------------------------------------------------------------------------------------

_WORKER_PIPELINE: Pipeline | None = None


def _init_worker(pipeline_bytes: bytes) -> None:
    global _WORKER_PIPELINE
    _die_with_parent()
    _WORKER_PIPELINE = pickle.loads(pipeline_bytes)


def _die_with_parent() -> None:
    """On Linux, have the kernel kill this worker when the driver dies (a killed run leaves no orphans
    still writing into the run folder while it is relaunched)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _run_in_worker(run_dir: str, stage: int, task: int) -> dict[str, Any]:
    assert _WORKER_PIPELINE is not None
    return _WORKER_PIPELINE.run_task(run_dir, stage, task)


def _reduce_part_in_worker(run_dir: str, stage: int, part: int, n_parts: int) -> None:
    assert _WORKER_PIPELINE is not None
    _WORKER_PIPELINE.reduce_part(run_dir, stage, part, n_parts)


class LocalExecutor(Executor):
    """``workers`` processes on this machine (``workers=1`` runs in the calling process).

    One pool serves every stage, so steps load their models once per worker. Processes are spawned,
    not forked: the driver may hold threads (progress bar, Ray, torch) that fork would copy mid-state.
    """

    _pool: ProcessPoolExecutor | None = None

    def run(self, pipeline: Pipeline, run_dir: str | os.PathLike[str], *, progress: bool = True) -> RunReport:
        if self.workers == 1:
            return super().run(pipeline, run_dir, progress=progress)
        with ProcessPoolExecutor(
            max_workers=min(self.workers, len(pipeline.tasks())),
            mp_context=get_context("spawn"),
            initializer=_init_worker,
            initargs=(pickle.dumps(pipeline),),
        ) as pool:  # workers start on the first submitted task, so a finished run starts none
            self._pool = pool
            try:
                return super().run(pipeline, run_dir, progress=progress)
            except KeyboardInterrupt:
                pool.shutdown(wait=False, cancel_futures=True)  # do not wait for the queued tasks
                raise
            finally:
                self._pool = None

    def run_tasks(
        self, pipeline: Pipeline, run_dir: str, stage: int, tasks: list[int], finished: TaskDone
    ) -> dict[int, str]:
        failures: dict[int, str] = {}
        if self._pool is None:
            for task in tasks:
                try:
                    marker = pipeline.run_task(run_dir, stage, task)
                except Exception as err:
                    failures[task], marker = f"{type(err).__name__}: {err}", None
                finished(marker)
            return failures
        futures = {self._pool.submit(_run_in_worker, run_dir, stage, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                marker = future.result()
            except Exception as err:
                failures[futures[future]], marker = f"{type(err).__name__}: {err}", None
            finished(marker)
        return failures

    def run_reduce_parts(self, pipeline: Pipeline, run_dir: str, stage: int, n_parts: int) -> dict[int, str]:
        assert self._pool is not None  # parts are only asked for with several workers
        futures = {
            self._pool.submit(_reduce_part_in_worker, run_dir, stage, part, n_parts): part
            for part in range(n_parts)
        }
        failures: dict[int, str] = {}
        for future in as_completed(futures):
            try:
                future.result()
            except Exception as err:
                failures[futures[future]] = f"{type(err).__name__}: {err}"
        return failures


# --- Ray ------------------------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError("executor: ray needs Ray installed: pip install 'lmforge[ray]'") from err
    return ray


DriverIdentity = tuple[str, int, str]  # (host, pid, process start time)


def _process_start(pid: int) -> str | None:
    """The start time of a live process (``/proc/<pid>/stat`` field 22), None once it has exited; with
    the pid it identifies a process even after the pid is reused."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def driver_identity() -> DriverIdentity | None:
    """This process, as a worker on the same machine can watch it (None where /proc is missing)."""
    started = _process_start(os.getpid())
    return None if started is None else (platform.node(), os.getpid(), started)


def _exit_with_driver(driver: DriverIdentity | None, interval_s: float = 0.5) -> None:
    """Exit this worker process as soon as the driver is gone (killed with its process group, say), so
    no worker goes on writing into a run folder that a relaunch is redoing. A worker on another machine
    cannot see the driver's pid and relies on Ray's own fate sharing."""
    if driver is None or driver[0] != platform.node():
        return
    _, pid, started = driver

    def watch() -> None:
        while _process_start(pid) == started:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="lmforge-driver-watch", daemon=True).start()


class _RayWorker:
    """One Ray actor per worker: the pipeline (and whatever its steps load lazily) lives across tasks
    and stages. It exits when the driver process dies (see :func:`_exit_with_driver`)."""

    def __init__(self, pipeline: Pipeline, driver: DriverIdentity | None = None) -> None:
        self.pipeline = pipeline
        _exit_with_driver(driver)

    def run(self, run_dir: str, stage: int, task: int) -> dict[str, Any]:
        return self.pipeline.run_task(run_dir, stage, task)

    def reduce_part(self, run_dir: str, stage: int, part: int, n_parts: int) -> None:
        self.pipeline.reduce_part(run_dir, stage, part, n_parts)

    def reduce(self, run_dir: str, stage: int, n_parts: int) -> None:
        self.pipeline.reduce(run_dir, stage, n_parts)


class RayExecutor(Executor):
    """Tasks as calls on a pool of Ray actors. Connects to ``address`` (or ``RAY_ADDRESS``) when given,
    uses an already initialised Ray, or starts a local Ray with ``workers`` CPUs. The run folder must be
    on a filesystem every node sees (output paths may be any fsspec URL), and modules with your own steps
    importable on every node (an installed package, or Ray's ``runtime_env``)."""

    def __init__(self, workers: int = 1, address: str | None = None) -> None:
        super().__init__(workers)
        self.address = address

    def _ray(self) -> tuple[Any, bool]:
        ray = _import_ray()
        if ray.is_initialized():
            return ray, False
        if self.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=self.address, log_to_driver=False)
        else:
            ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
        return ray, True

    def run(self, pipeline: Pipeline, run_dir: str | os.PathLike[str], *, progress: bool = True) -> RunReport:
        ray, started_here = self._ray()
        self._actors: list[Any] = []
        try:
            self._pipeline_ref = ray.put(pipeline)
            return super().run(pipeline, str(Path(run_dir).resolve()), progress=progress)
        finally:
            for actor in self._actors:
                ray.kill(actor)
            if started_here:
                ray.shutdown()

    def _actor(self, index: int, replace: bool = False) -> Any:
        """The ``index``-th actor, started on first use (or again after it died)."""
        ray = _import_ray()
        if index == len(self._actors) or replace:
            actor = ray.remote(num_cpus=1)(_RayWorker).remote(self._pipeline_ref, driver_identity())
            if replace:
                ray.kill(self._actors[index])
                self._actors[index] = actor
            else:
                self._actors.append(actor)
        return self._actors[index]

    def run_tasks(
        self, pipeline: Pipeline, run_dir: str, stage: int, tasks: list[int], finished: TaskDone
    ) -> dict[int, str]:
        ray = _import_ray()
        from ray.exceptions import RayActorError, RayError

        queue = list(reversed(tasks))
        running: dict[Any, tuple[int, int]] = {}  # object ref -> (actor index, task)
        failures: dict[int, str] = {}
        for index in range(min(self.workers, len(tasks))):
            task = queue.pop()
            running[self._actor(index).run.remote(run_dir, stage, task)] = (index, task)
        while running:
            [ready], _ = ray.wait(list(running), num_returns=1)
            index, task = running.pop(ready)
            marker = None
            try:
                marker = ray.get(ready)
            except RayActorError as err:  # the worker process died: a fresh one takes the next task
                failures[task] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
                self._actor(index, replace=True)
            except RayError as err:
                failures[task] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
            finished(marker)
            if queue:
                next_task = queue.pop()
                running[self._actor(index).run.remote(run_dir, stage, next_task)] = (index, next_task)
        return failures

    def run_reduce_parts(self, pipeline: Pipeline, run_dir: str, stage: int, n_parts: int) -> dict[int, str]:
        ray = _import_ray()
        from ray.exceptions import RayError

        refs = {
            self._actor(part).reduce_part.remote(run_dir, stage, part, n_parts): part
            for part in range(n_parts)
        }
        failures: dict[int, str] = {}
        for ref, part in refs.items():
            try:
                ray.get(ref)
            except RayError as err:
                failures[part] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
        return failures

    def merge(self, pipeline: Pipeline, run_dir: str, stage: int, n_parts: int) -> None:
        ray = _import_ray()
        ray.get(self._actor(0).reduce.remote(run_dir, stage, n_parts))


def make_executor(name: str = "local", workers: int = 1, ray_address: str | None = None) -> Executor:
    """The executor a recipe names: ``local`` (worker processes on this machine) or ``ray``."""
    if name not in EXECUTORS:
        raise ValueError(f"executor: {name!r} is not one of {', '.join(EXECUTORS)}")
    return LocalExecutor(workers) if name == "local" else RayExecutor(workers, ray_address)
