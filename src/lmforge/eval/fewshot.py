"""Zero-, one- and few-shot prompts built from a task's own examples (in-context learning).

A prompt has up to five parts: a persona or system prompt (``description``), an ``instruction`` (what to
do), a ``context`` (background the task needs), the input data (each question through ``template``) and
the output indicator (the end of ``template``, ``Answer:`` by default, where the model's reply starts).

Plain prompts follow lm-evaluation-harness: the description comes first as written, then the instruction
and the context as blocks separated by the few-shot delimiter; each demonstration is ``template(prompt)`` +
target delimiter + answer, demonstrations are joined by the few-shot delimiter, and the question comes last
without its answer. Chat prompts put the description in a system message, the instruction and context at
the head of the first user turn, each demonstration in a user/assistant pair of messages, and end with the
question as the user's turn; the tokenizer's chat template renders them. Demonstrations are drawn without
replacement from a pool, never including the question itself, with a generator seeded per question so the
same question always sees the same demonstrations.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.eval.tasks import TaskExample


@dataclass(frozen=True)
class PromptFormat:
    template: str = "{prompt}\nAnswer:"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""  # persona: text placed before everything else (plain) or as a system message (chat)
    instruction: str = ""
    context: str = ""

    def question(self, example: TaskExample) -> str:
        return self.template.format(prompt=example.prompt)

    @property
    def header(self) -> list[str]:
        return [part for part in (self.instruction, self.context) if part]


def sample_demonstrations(
    pool: Sequence[TaskExample], k: int, question: TaskExample, seed: int, index: int
) -> list[TaskExample]:
    """``k`` examples from ``pool`` other than ``question``, chosen by a generator seeded on (seed, index)."""
    if k <= 0:
        return []
    candidates = [e for e in pool if e != question]
    if len(candidates) < k:
        raise ValueError(f"{k}-shot prompts need {k} demonstrations, the pool has {len(candidates)}")
    return random.Random(f"{seed}:{index}").sample(candidates, k)


def plain_prompt(question: TaskExample, demonstrations: Sequence[TaskExample], fmt: PromptFormat) -> str:
    shots = [fmt.question(d) + fmt.target_delimiter + d.target for d in demonstrations]
    body = fmt.fewshot_delimiter.join([*fmt.header, *shots, fmt.question(question)])
    return fmt.description + body


def chat_messages(
    question: TaskExample, demonstrations: Sequence[TaskExample], fmt: PromptFormat
) -> list[dict[str, str]]:
    """Chat turns; the questions are raw prompts (the chat template supplies the framing)."""
    messages = [{"role": "system", "content": fmt.description}] if fmt.description else []
    for demo in demonstrations:
        messages.append({"role": "user", "content": demo.prompt})
        messages.append({"role": "assistant", "content": demo.target})
    messages.append({"role": "user", "content": question.prompt})
    first_user = 1 if fmt.description else 0
    head = "\n\n".join([*fmt.header, messages[first_user]["content"]])
    messages[first_user] = {"role": "user", "content": head}
    return messages
