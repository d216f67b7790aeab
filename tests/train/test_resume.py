"""Relaunching a run: changed settings, a torn metrics line, damaged checkpoints, one that does not load."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.train import TrainingError, train
from lmforge.train.checkpoint import MARKER, list_checkpoints
from lmforge.train.metrics import read_jsonl
from tests.train.conftest import tiny_config

EVERY_2 = {"checkpoint.every_steps": 2, "max_steps": 4}


def recipe(run: Path, shards: Path, **overrides):
    return tiny_config(run, shards, **{**EVERY_2, **overrides})


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def damage(folder: Path) -> None:
    shard = next((folder / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])


@pytest.fixture
def run(tmp_path: Path, shards: Path) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    result = train(recipe(tmp_path / "run", shards))
    return result.run_dir


def test_relaunch_with_other_data_or_model_is_refused_and_writes_nothing(run: Path, shards: Path) -> None:
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"data\.seq_len.*checkpoint\.allow_config_change"):
        train(recipe(run, shards, **{"data.seq_len": 8, "max_steps": 6}))
    with pytest.raises(ConfigError, match=r"model\.d_model, model\.head_dim"):
        train(recipe(run, shards, **{"model.d_model": 48, "max_steps": 6}))
    # allowed, but the checkpoints cannot hold a model of another shape
    allowed = {"checkpoint.allow_config_change": True, "max_steps": 6}
    with pytest.raises(ConfigError, match=r"model\.d_model.*another shape"):
        train(recipe(run, shards, **allowed, **{"model.d_model": 48}))
    assert snapshot(run) == before


def test_relaunch_with_changed_settings_continues_when_allowed(run: Path, shards: Path) -> None:
    # more steps is not a change of the run: no flag needed
    assert train(recipe(run, shards, max_steps=5)).step == 5
    allowed = {"checkpoint.allow_config_change": True, "max_steps": 6, "model.dropout": 0.1}
    result = train(recipe(run, shards, **allowed))
    assert result.step == 6
    [event] = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "config_change"]
    assert event["keys"] == ["model.dropout"]
    assert "dropout: 0.1" in (run / "config.yaml").read_text()


def test_a_torn_last_metrics_line_is_dropped_on_relaunch(run: Path, shards: Path) -> None:
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 2.')  # killed mid-write
    result = train(recipe(run, shards, max_steps=6))
    assert result.step == 6
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 7))


def test_with_every_checkpoint_damaged_the_relaunch_is_refused(run: Path, shards: Path) -> None:
    for folder in list_checkpoints(run / "checkpoints"):
        damage(folder)
    before = snapshot(run)
    with pytest.raises(TrainingError, match=r"step_00000004 \(checksum.*step_00000002 \(checksum"):
        train(recipe(run, shards, max_steps=6))
    assert snapshot(run) == before  # metrics and the damaged checkpoints are untouched


def test_with_the_flag_damaged_checkpoints_are_moved_aside_and_the_run_starts_over(
    run: Path, shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for folder in list_checkpoints(run / "checkpoints"):
        damage(folder)
    first = losses(run)
    with caplog.at_level(logging.WARNING):
        result = train(recipe(run, shards, **{"checkpoint.restart_if_damaged": True}))
    assert result.step == 4 and losses(run) == first  # the same run, from scratch
    moved = sorted(p.name for p in (run / "checkpoints" / "damaged").iterdir())
    assert moved == ["step_00000002", "step_00000004"]
    assert any("unusable" in r.message and "damaged" in r.message for r in caplog.records)
    assert [e["event"] for e in read_jsonl(run / "events.jsonl")] == ["damaged_checkpoints"]


def test_a_checkpoint_that_verifies_but_does_not_load_falls_back_to_an_older_one(
    tmp_path: Path, shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    straight = train(recipe(tmp_path / "straight", shards, max_steps=6))
    run = train(recipe(tmp_path / "run", shards)).run_dir
    newest = run / "checkpoints" / "step_00000004"
    (newest / "trainer.pt").write_bytes(b"not a pickle")  # with a marker that vouches for it
    marker = json.loads((newest / MARKER).read_text())
    marker["sha256"]["trainer.pt"] = hashlib.sha256(b"not a pickle").hexdigest()
    (newest / MARKER).write_text(json.dumps(marker))
    with caplog.at_level(logging.WARNING):
        result = train(recipe(run, shards, max_steps=6))
    assert result.step == 6 and losses(run) == losses(straight.run_dir)
    assert any("step_00000004" in r.message and "does not load" in r.message for r in caplog.records)
