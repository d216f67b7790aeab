import json

import pytest

from lmforge.eval.tasks import TaskExample, load_task


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_generation_task_counts_bad_records(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        [
            {"prompt": "2+2?", "answer": "4", "task": "addition"},
            {"prompt": "name?", "answer": ["Bo", "Bob"], "task": "other"},
            {"messages": [{"role": "user", "content": "hi?"}, {"role": "assistant", "content": "hello"}]},
            "{not json",
            {"prompt": "no answer"},
            {"prompt": 3, "answer": "x"},
        ],
    )
    task = load_task(path)
    assert task.kind == "generate"
    assert task.examples == [
        TaskExample("2+2?", ("4",)),
        TaskExample("name?", ("Bo", "Bob")),
        TaskExample("hi?", ("hello",)),
    ]
    assert sum(task.rejected.values()) == 3 and task.rejected["malformed_json"] == 1
    assert load_task(path, where={"task": "addition"}).examples == [TaskExample("2+2?", ("4",))]


def test_multiple_choice_task_and_validation(tmp_path):
    path = write(
        tmp_path / "mc.jsonl",
        [
            {"prompt": "sky?", "choices": ["blue", "red"], "label": 0},
            {"prompt": "bad", "choices": ["a"], "label": 3},
        ],
    )
    task = load_task(path)
    assert task.kind == "multiple_choice"
    assert task.examples[0].target == "blue"
    assert task.rejected == {"label must index into choices": 1}
    mixed = write(
        tmp_path / "mixed.jsonl",
        [{"prompt": "a", "answer": "b"}, {"prompt": "c", "choices": ["d"], "label": 0}],
    )
    with pytest.raises(ValueError, match="mixes"):
        load_task(mixed)
