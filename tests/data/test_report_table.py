"""The run report's table, printed to a pipe or a file (no terminal), keeps every removal reason whole."""

from collections import Counter

from lmforge.data.report import RunReport
from lmforge.data.step import StepStats

LONG = "gopher_repetition_duplicate_line_character_fraction_above_threshold"


def test_report_table_in_a_pipe_is_not_cut_at_80_columns(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    step = StepStats("gopher_repetition", docs_in=9, kept=2, removed=Counter({LONG: 5, "another_reason": 2}))
    RunReport(tasks=1, stages=1, docs_in=9, kept=2, steps=[step]).print()
    out = capsys.readouterr().out  # captured: not a terminal, as with `lmforge data run ... > log`
    row = next(line for line in out.splitlines() if "gopher_repetition " in line)
    assert f"{LONG} 5, another_reason 2" in row and len(row) > 80
