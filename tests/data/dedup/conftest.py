from pathlib import Path

import pytest

from lmforge.data.document import Document
from lmforge.data.step import GlobalStep


def run_two_passes(step: GlobalStep, tasks: list[list[Document]], workdir: Path) -> list[list[Document]]:
    """Drive a dataset-level step the way the executor does: pass 1 per task, reduce once, pass 2 per task."""
    artifacts = []
    for t, docs in enumerate(tasks):
        artifact = workdir / f"artifact-{t}"
        assert list(step.collect_stream(iter(docs), t, artifact)) == docs  # pass 1 changes nothing
        artifacts.append(artifact)
    decision = workdir / "decision"
    decision.mkdir()
    step.reduce(artifacts, decision)
    step.reset_stats()
    return [list(step.apply_stream(iter(docs), decision, t)) for t, docs in enumerate(tasks)]


@pytest.fixture
def two_passes(tmp_path):
    return lambda step, tasks: run_two_passes(step, tasks, tmp_path)
