from collections import Counter

from lmforge.data.report import RunReport


def marker(stage, read, written, rejects, steps, seconds=1.0, input_bytes=0):
    return {"stage": stage, "read": read, "written": written, "reader_rejects": rejects, "steps": steps,
            "seconds": seconds, "input_bytes": input_bytes}  # fmt: skip


def step(index, name, docs_in, kept, removed, errors=0, seconds=0.5):
    return {"index": index, "name": name, "in": docs_in, "kept": kept, "removed": removed,
            "errors": errors, "seconds": seconds, "counters": {}}  # fmt: skip


def test_report_sums_tasks_across_stages_and_checks_the_balance(capsys):
    markers = [  # two tasks, a global step (index 1) between stage 0 and stage 1
        marker(
            0,
            10,
            7,
            {"malformed_json": 1},
            [step(0, "f", 9, 8, {"short": 1}), step(1, "g", 1, 0, {}, 1)],
            input_bytes=100,
        ),
        marker(0, 5, 5, {}, [step(0, "f", 5, 5, {})], input_bytes=50),
        marker(1, 7, 6, {}, [step(1, "g", 7, 6, {"dup": 1})]),
        marker(1, 5, 4, {}, [step(1, "g", 5, 4, {"dup": 1})]),
    ]
    report = RunReport.from_markers(["f", "g"], 2, 2, markers, [{"step": 1, "seconds": 2.0}])
    assert (report.docs_in, report.kept, report.removed, report.rejected) == (15, 10, 3, 2)
    assert report.balanced and report.input_bytes == 150
    f, g = report.steps
    assert (f.docs_in, f.kept, f.removed, f.seconds) == (14, 13, Counter(short=1), 1.0)
    assert (g.docs_in, g.kept, g.removed, g.errors, g.seconds) == (13, 10, Counter(dup=2), 1, 3.5)
    assert report.task_seconds == 6.0
    totals = report.to_dict()["totals"]
    assert totals == {"in": 15, "kept": 10, "removed": 3, "rejected": 2, "balanced": True}
    report.print()
    out = " ".join(capsys.readouterr().out.split())
    assert "in 15 = kept 10 + removed 3 + rejected 2 (balanced)" in out and "dup 2" in out

    report.kept -= 1
    assert not report.balanced and report.to_dict()["totals"]["balanced"] is False
