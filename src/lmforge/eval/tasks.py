"""Evaluation tasks read from JSONL, one example per line.

Two kinds of task, told apart by the record's fields:

- generation (scored by exact match): ``{"prompt": "What is 2 + 3?", "answer": "5"}``; ``answer`` may be
  a list of accepted answers;
- multiple choice (scored by log-likelihood): ``{"prompt": "...", "choices": ["a", "b"], "label": 0}``.

Either may carry a ``rationale`` (the worked reasoning a chain-of-thought demonstration shows).

A record may instead carry ``messages`` (chat format) whose last turn is the assistant's answer; the
preceding user turn is then the prompt. Malformed lines are counted and skipped, never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.io import Reject, read_records


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answers: tuple[str, ...] = ()  # generation: accepted answers
    choices: tuple[str, ...] = ()  # multiple choice: the options
    label: int = -1  # multiple choice: index of the right option
    rationale: str = ""  # worked reasoning shown when the example is a chain-of-thought demonstration

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def target(self) -> str:
        """The answer shown when this example is used as a few-shot demonstration."""
        return self.choices[self.label] if self.is_multiple_choice else self.answers[0]


@dataclass
class TaskFile:
    path: str
    examples: list[TaskExample] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.examples and all(e.is_multiple_choice for e in self.examples):
            return "multiple_choice"
        return "generate"


def parse_example(record: Any) -> TaskExample:
    """Build an example from one JSON record; ``ValueError`` names what is wrong."""
    if not isinstance(record, dict):
        raise ValueError("not an object")
    prompt = record.get("prompt")
    answer = record.get("answer")
    messages = record.get("messages")
    if prompt is None and isinstance(messages, list) and len(messages) >= 2:
        last, before = messages[-1], messages[-2]
        if not (isinstance(last, dict) and last.get("role") == "assistant"):
            raise ValueError("the last message is not the assistant's")
        prompt = before.get("content") if isinstance(before, dict) else None
        answer = answer if answer is not None else last.get("content")
    if not isinstance(prompt, str):
        raise ValueError("no prompt")
    rationale = record.get("rationale", "")
    if not isinstance(rationale, str):
        raise ValueError("rationale must be a string")
    if "choices" in record:
        choices, label = record["choices"], record.get("label")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError("choices must be a non-empty list of strings")
        if not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError("label must index into choices")
        return TaskExample(prompt=prompt, choices=tuple(choices), label=label, rationale=rationale)
    answers = [answer] if isinstance(answer, str) else answer
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("answer must be a string or a non-empty list of strings")
    return TaskExample(prompt=prompt, answers=tuple(answers), rationale=rationale)


def load_task(path: str | Path, where: dict[str, Any] | None = None) -> TaskFile:
    """Read a task file; ``where`` keeps only records whose fields equal the given values."""
    task = TaskFile(path=str(path))
    for record in read_records(path):
        if isinstance(record, Reject):  # unreadable line or file: counted by kind (malformed_json, ...)
            reason = record.reason.split(":")[0]
        else:
            if where and any(record.get(k) != v for k, v in where.items()):
                continue
            try:
                task.examples.append(parse_example(record))
                continue
            except (ValueError, AttributeError) as err:
                reason = str(err)
        task.rejected[reason] = task.rejected.get(reason, 0) + 1
    kinds = {e.is_multiple_choice for e in task.examples}
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes generation and multiple-choice records")
    return task
