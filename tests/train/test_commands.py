"""``lmforge train``: SIGKILL at a random step, relaunch, and the loss sequence is bitwise the same."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.config import load_config
from lmforge.train import train
from lmforge.train.config import TrainConfig
from lmforge.train.metrics import read_jsonl
from tests.train.conftest import tiny_data

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def launch(recipe: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "lmforge.cli", "train", "--config", str(recipe), "log.progress=false"]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.multiprocess
def test_sigkill_then_relaunch_gives_the_uninterrupted_loss_sequence(tmp_path: Path, shards: Path) -> None:
    overrides = {"max_steps": STEPS, "checkpoint.every_steps": 3, "model.dropout": 0.1}
    straight = train(load_config(TrainConfig, data=tiny_data(tmp_path / "straight", shards, **overrides)))
    expected = [r["loss"] for r in read_jsonl(straight.run_dir / "metrics.jsonl")]

    run = tmp_path / "killed"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_data(run, shards, **overrides)))
    kill_after = random.Random(os.getpid()).randint(4, STEPS - 10)
    proc = launch(recipe)
    deadline = time.monotonic() + 120
    while len(read_jsonl(run / "metrics.jsonl")) < kill_after and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(read_jsonl(run / "metrics.jsonl"))
    assert killed_at < STEPS

    proc = launch(recipe)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert '"step": 40' in output
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == expected  # bitwise, CPU fp32


def test_bad_recipe_values_are_reported_as_config_errors(tmp_path: Path, capsys) -> None:
    from lmforge.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"optim": {"name": "sgd"}}))
    assert main(["train", "--config", str(recipe)]) == 2
    assert "optim.name" in capsys.readouterr().err
    assert main(["train", "--config", str(recipe), "optim.name=adamw", "stability.nonfinite=ignore"]) == 2
    assert "stability.nonfinite" in capsys.readouterr().err
