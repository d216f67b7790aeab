"""Chain-of-thought prompting, answer extraction and self-consistency.

Chain of thought (Wei et al. 2022; zero-shot: Kojima et al. 2022) asks the model to reason before it
answers: every question is followed by the trigger ``Let's think step by step.``, and each demonstration
shows its worked reasoning (the example's ``rationale``, when it has one) ending in ``The answer is X.``.

Answers are read back from the reply in two ways, as lm-evaluation-harness does for GSM8K:

- ``strict``: only an explicit ``The answer is X`` counts (the last one in the reply); no match, no answer;
- ``flexible``: the strict answer if there is one, else the last number in the reply, else its last
  non-empty line.

Self-consistency (Wang et al. 2023) samples ``k`` reasoning paths at a temperature above zero and keeps the
answer most of them reach (:func:`majority_vote`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from lmforge.eval.fewshot import PromptFormat
from lmforge.eval.metrics import normalize_answer
from lmforge.eval.tasks import TaskExample

COT_TRIGGER = "Let's think step by step."
EXTRACTIONS = ("strict", "flexible")

_STRICT = re.compile(r"the answer is:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def cot_target(example: TaskExample) -> str:
    """A demonstration's reply under chain of thought: its reasoning, then the answer in the strict form."""
    answer = f"The answer is {example.target}."
    return f"{example.rationale} {answer}" if example.rationale else answer


def chain_of_thought(
    fmt: PromptFormat, question: TaskExample, demonstrations: Sequence[TaskExample], chat: bool
) -> tuple[PromptFormat, TaskExample, list[TaskExample]]:
    """The prompt parts rewritten for chain of thought: the trigger follows every question (after the
    output indicator in plain prompts, at the end of the user's turn in chat), and demonstrations answer
    with their reasoning."""
    shots = [replace(d, answers=(cot_target(d),), choices=(), label=-1) for d in demonstrations]
    if chat:
        question = replace(question, prompt=f"{question.prompt}\n\n{COT_TRIGGER}")
        shots = [replace(d, prompt=f"{d.prompt}\n\n{COT_TRIGGER}") for d in shots]
        return fmt, question, shots
    return replace(fmt, template=fmt.template + fmt.target_delimiter + COT_TRIGGER), question, shots


def extract_answer(reply: str, mode: str = "flexible") -> str | None:
    """The answer a reply commits to under ``mode`` (``strict`` or ``flexible``), or None."""
    if mode not in EXTRACTIONS:
        raise ValueError(f"extraction must be one of {EXTRACTIONS}, got {mode!r}")
    matches = _STRICT.findall(reply)
    if matches:
        return matches[-1].strip()
    if mode == "strict":
        return None
    numbers = _NUMBER.findall(reply)
    if numbers:
        return numbers[-1].replace(",", "")
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    return lines[-1] if lines else None


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (compared after :func:`normalize_answer`); ties go to the answer reached
    first; None answers do not vote. None when no answer votes."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(normalize_answer(a) for a in votes)
    best = max(counts.values())
    return next(a for a in votes if counts[normalize_answer(a)] == best)
