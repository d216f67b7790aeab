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
    sections = [r["section"] for r in rows]
    assert sections == ["paths", "decode", "decode", "stream", "stream", "train"]  # graphs on, then off
    assert not [r for r in rows if r["what"] == "FAILED"]
    assert "equal to transformers in 3/3" in rows[0]["value"]
    decode = [r["value"] for r in rows if r["section"] == "decode"]
    assert all("same tokens in 8/8" in v for v in decode)  # the engine's greedy tokens equal transformers'
    assert "graphs on/off agree in 8/8" in decode[1]
    assert "section  what" in run.stdout  # the table a person reads
