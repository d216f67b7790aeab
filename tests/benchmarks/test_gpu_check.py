"""The GPU check stays runnable where no GPU is lent: its CPU dry run completes every section."""

from __future__ import annotations

import json
import subprocess
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
    assert [r["section"] for r in rows] == ["train", "decode", "stream", "paths"]
    assert not [r for r in rows if r["what"] == "FAILED"]
    assert "same tokens in 8/8" in rows[1]["value"]  # the engine's greedy tokens equal transformers'
    assert "equal to transformers in 3/3" in rows[3]["value"]
    assert "section  what" in run.stdout  # the table a person reads
