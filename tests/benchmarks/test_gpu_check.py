"""The GPU check stays runnable where no GPU is lent: its CPU dry run completes every section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_cpu_smoke_run_completes_every_section(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "rows.json"
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu/check.sh"), "--cpu-smoke", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    sections = [r["section"] for r in rows]
    assert sections == ["paths", "decode", "decode", "stream", "stream", "train"]  # graphs on, then off
    assert not [r for r in rows if r["what"] == "FAILED"]
    assert "equal to transformers in 3/3" in rows[0]["value"]
    decode = [r["value"] for r in rows if r["section"] == "decode"]
    assert all("same tokens in 8/8" in v for v in decode)  # the engine's greedy tokens equal transformers'
    assert "graphs on/off agree in 8/8" in decode[1]
    assert "section  what" in run.stdout  # the table a person reads


@pytest.mark.slow
def test_the_engine_profile_script_runs_on_the_cpu() -> None:
    pytest.importorskip("transformers")
    script = REPO / "benchmarks/gpu/profile_engine.py"
    command = ["--cpu-smoke", "--batch", "4", "--prompt", "8", "--new", "4"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run(
        [sys.executable, str(script), *command], capture_output=True, text=True, timeout=300, env=env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "CUDA graphs on" in run.stdout and "CUDA graphs off" in run.stdout
    assert len(run.stdout.split("step ms:")[1].split()) >= 4  # one time per engine step
