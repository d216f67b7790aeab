"""A generated instruction set of small, verifiable tasks: the demo's SFT data and its held-out exam.

Every example has one exact answer, so exact match is a fair score. Four task families:

- ``addition``: two-digit addition (``What is 37 + 48?`` -> ``85``);
- ``reverse_words``: reverse the order of a few words;
- ``count_letter``: how often a letter occurs in a word;
- ``read_answer``: answer a question from a given sentence (who/what/where).

Generation is deterministic from a seed. Held-out examples never share their defining inputs with the
training examples (for addition: the operand pair; for the others: the exact prompt), so a held-out score
measures generalisation, not recall. Records are JSON-ready dicts in the ``messages`` chat format that
``lmforge sft`` reads, plus ``task``, ``prompt`` and ``answer`` fields that ``lmforge eval`` reads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Container, Iterable
from typing import Any

TASKS = ("addition", "reverse_words", "count_letter", "read_answer")

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "window",
    "garden",
    "silver",
    "music",
    "paper",
    "candle",
    "forest",
    "orange",
    "yellow",
    "bridge",
    "rabbit",
    "pencil",
    "winter",
    "summer",
    "castle",
    "rocket",
    "planet",
    "violet",
    "basket",
    "dragon",
    "kettle",
    "ladder",
    "marble",
    "needle",
    "pocket",
    "saddle",
    "tunnel",
    "wallet",
    "anchor",
    "button",
    "carpet",
    "dinner",
    "engine",
    "flower",
    "guitar",
    "hammer",
    "island",
    "jacket",
    "lemon",
    "mirror",
    "number",
    "ocean",
    "pepper",
    "rubber",
    "sister",
    "tomato",
    "velvet",
    "wizard",
]
NAMES = [
    "Anna",
    "Ben",
    "Clara",
    "David",
    "Emma",
    "Felix",
    "Grace",
    "Henry",
    "Iris",
    "Jack",
    "Kate",
    "Leo",
    "Maria",
    "Noah",
    "Olga",
    "Paul",
]
OBJECTS = ["ball", "book", "cup", "hat", "kite", "lamp", "map", "pen", "ring", "shoe"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
PLACES = ["kitchen", "garden", "library", "park", "school", "station", "market", "beach"]


def _addition(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", f"What is {a} + {b}?", str(a + b)


def _reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    prompt = f"Reverse the order of these words: {' '.join(words)}"
    return prompt, prompt, " ".join(reversed(words))


def _count_letter(rng: random.Random, words: list[str] = WORDS) -> tuple[str, str, str]:
    word = rng.choice(words)
    # Ask about a letter of the word most of the time, sometimes about one it lacks (answer 0).
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    prompt = f"How many times does the letter {letter} appear in {word}?"
    return prompt, prompt, str(word.count(letter))


def _read_answer(rng: random.Random) -> tuple[str, str, str]:
    name, obj, color, place = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(COLORS), rng.choice(PLACES)
    sentence = f"{name} left a {color} {obj} in the {place}."
    question, answer = rng.choice(
        (
            (f"What color is the {obj}?", color),
            (f"Where is the {obj}?", place),
            (f"Who left the {obj}?", name),
            (f"What did {name} leave?", obj),
        )
    )
    prompt = f"{sentence} {question}"
    return prompt, prompt, answer


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "addition": _addition,
    "reverse_words": _reverse_words,
    "count_letter": _count_letter,
    "read_answer": _read_answer,
}


def make_record(task: str, prompt: str, answer: str) -> dict[str, Any]:
    return {
        "task": task,
        "prompt": prompt,
        "answer": answer,
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
    }


def generate_tasks(
    n_train: dict[str, int] | int,
    n_heldout: dict[str, int] | int,
    seed: int = 0,
    tasks: Iterable[str] = TASKS,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return ``(train, heldout)`` records; per-task counts may be a dict or one int for every task.

    Held-out examples are drawn first and their keys reserved, then training examples are drawn among the
    remaining keys. When a task has fewer distinct keys than requested, it yields as many as exist.
    """
    train: list[dict[str, Any]] = []
    heldout: list[dict[str, Any]] = []
    for index, task in enumerate(tasks):
        if task not in GENERATORS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        want_train = n_train if isinstance(n_train, int) else n_train.get(task, 0)
        want_heldout = n_heldout if isinstance(n_heldout, int) else n_heldout.get(task, 0)
        rng = random.Random(f"{seed}:{index}:{task}")
        seen: set[str] = set()
        for want, out in ((want_heldout, heldout), (want_train, train)):
            drawn = _draw(GENERATORS[task], rng, want, seen)
            out.extend(make_record(task, prompt, answer) for prompt, answer in drawn)
    random.Random(seed).shuffle(train)
    return train, heldout


def _draw(
    generator: Callable[[random.Random], tuple[str, str, str]],
    rng: random.Random,
    want: int,
    seen: set[str],
    reserved: Container[str] = frozenset(),
) -> list[tuple[str, str]]:
    """Up to ``want`` (prompt, answer) draws whose keys are not in ``seen`` (which they join) and whose
    prompts are not ``reserved``. Attempts are bounded: small key spaces (e.g. count_letter) run out."""
    drawn: list[tuple[str, str]] = []
    attempts = 0
    while len(drawn) < want and attempts < 50 * want + 1000:
        attempts += 1
        key, prompt, answer = generator(rng)
        if key in seen or prompt in reserved:
            continue
        seen.add(key)
        drawn.append((prompt, answer))
    return drawn


def multiple_choice_records(
    records: Iterable[dict[str, Any]], n_choices: int = 4, seed: int = 0
) -> list[dict[str, Any]]:
    """``read_answer`` questions as multiple choice: the answer among distractors of the same kind
    (colors, places, names or objects), in a seeded order. Records of other tasks are skipped."""
    pools = (COLORS, PLACES, NAMES, OBJECTS)
    out = []
    for index, record in enumerate(records):
        if record["task"] != "read_answer":
            continue
        answer = record["answer"]
        pool = next(p for p in pools if answer in p)
        rng = random.Random(f"{seed}:{index}")
        choices = [answer, *rng.sample([c for c in pool if c != answer], n_choices - 1)]
        rng.shuffle(choices)
        out.append(
            {
                "task": "read_answer_mc",
                "prompt": record["prompt"],
                "choices": choices,
                "label": choices.index(answer),
            }
        )
    return out


# Words the instruction set never counts letters in: RL prompts of count_letter draw from these, since the
# instruction set's (letter, word) pairs are nearly all used by its training and held-out splits.
RL_EXTRA_WORDS = sorted({w.lower() for w in NAMES + OBJECTS + COLORS + PLACES} - set(WORDS))


def rl_prompts(
    heldout: Iterable[dict[str, Any]], per_task: dict[str, int], seed: int = 0
) -> list[dict[str, Any]]:
    """Fresh prompts for online RL (``{"task", "messages", "answer"}``, shuffled): new draws of each task's
    generator from their own seed, never one whose defining input is a held-out example's (for addition the
    operand pair, otherwise the prompt). ``count_letter`` asks about words outside the instruction set
    (:data:`RL_EXTRA_WORDS`). Draws may repeat training examples; a small key space yields fewer prompts."""
    reserved: dict[str, set[str]] = {}  # task -> its held-out prompts
    for r in heldout:
        reserved.setdefault(r["task"], set()).add(r["prompt"])
    rl_generators = {
        **GENERATORS,
        "count_letter": lambda rng: _count_letter(rng, RL_EXTRA_WORDS),
    }
    records: list[dict[str, Any]] = []
    for task, want in per_task.items():
        if task not in rl_generators:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        rng = random.Random(f"rl:{seed}:{task}")
        drawn = _draw(rl_generators[task], rng, want, set(), reserved.get(task, set()))
        records.extend(
            {"task": task, "messages": [{"role": "user", "content": prompt}], "answer": answer}
            for prompt, answer in drawn
        )
    random.Random(seed).shuffle(records)
    return records


def exam_tasks(heldout_path: str, tasks: Iterable[str]) -> list[Any]:
    """The demo's held-out exam as ``lmforge eval`` tasks (``TaskConfig``): each task's examples,
    chat-templated, greedy, scored by exact match."""
    from lmforge.eval.runner import TaskConfig

    return [
        TaskConfig(name=task, path=heldout_path, where={"task": task}, chat=True, max_tokens=24)
        for task in tasks
    ]
