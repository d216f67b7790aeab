import json
import re
from collections import Counter

import pytest

from lmforge.data.io import write_records
from lmforge.demo.tasks import RL_EXTRA_WORDS, TASKS, generate_tasks, multiple_choice_records, rl_prompts


def test_answers_are_correct_for_every_task():
    train, heldout = generate_tasks(200, 50, seed=3)
    assert len(train) == 4 * 200 and len(heldout) == 4 * 50
    for record in train + heldout:
        prompt, answer = record["prompt"], record["answer"]
        assert record["messages"] == [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
        if record["task"] == "addition":
            a, b = map(int, re.fullmatch(r"What is (\d\d) \+ (\d\d)\?", prompt).groups())
            assert int(answer) == a + b
        elif record["task"] == "reverse_words":
            words = prompt.split(": ", 1)[1].split()
            assert answer.split() == words[::-1]
        elif record["task"] == "count_letter":
            letter, word = re.fullmatch(
                r"How many times does the letter (\w) appear in (\w+)\?", prompt
            ).groups()
            assert int(answer) == word.count(letter)
        else:
            sentence = prompt.split(". ", 1)[0]
            assert answer in sentence.split() or f"{answer} " in sentence


def test_deterministic_from_seed_and_different_across_seeds():
    assert generate_tasks(30, 10, seed=1) == generate_tasks(30, 10, seed=1)
    assert generate_tasks(30, 10, seed=1) != generate_tasks(30, 10, seed=2)


def test_heldout_addition_pairs_never_seen_in_training():
    train, heldout = generate_tasks({"addition": 3000}, {"addition": 300}, seed=0, tasks=["addition"])
    assert len(train) == 3000 and len(heldout) == 300
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == 3000
    assert not train_prompts & {r["prompt"] for r in heldout}


def test_small_key_space_yields_what_exists_and_unknown_task_raises():
    # count_letter has a few hundred distinct prompts; asking for more must terminate.
    train, _ = generate_tasks({"count_letter": 2000}, 0, tasks=["count_letter"])
    assert 0 < len(train) < 2000
    with pytest.raises(ValueError, match="unknown task"):
        generate_tasks(1, 1, tasks=["nope"])
    assert set(TASKS) == {"addition", "reverse_words", "count_letter", "read_answer"}


def test_multiple_choice_records_hold_the_answer_once_among_same_kind_choices():
    _, heldout = generate_tasks(0, 40, seed=2)
    mc = multiple_choice_records(heldout)
    originals = [r for r in heldout if r["task"] == "read_answer"]
    assert len(mc) == len(originals) == 40
    for record, original in zip(mc, originals):
        assert record["prompt"] == original["prompt"]
        assert record["choices"][record["label"]] == original["answer"]
        assert len(set(record["choices"])) == 4
    assert {r["label"] for r in mc} == {0, 1, 2, 3}


def test_task_records_written_as_jsonl_round_trip(tmp_path):
    train, _ = generate_tasks(5, 0)
    path = tmp_path / "sub" / "train.jsonl"
    assert write_records(path, train) == len(train)
    assert [json.loads(line) for line in path.read_text().splitlines()] == train


def test_rl_prompts_are_fresh_verifiable_and_never_a_heldout_input():
    _, heldout = generate_tasks(50, 30, seed=3)
    per_task = {"addition": 400, "reverse_words": 200, "count_letter": 150}
    prompts = rl_prompts(heldout, per_task, seed=3)
    assert Counter(r["task"] for r in prompts) == per_task
    reserved = {(r["task"], r["prompt"]) for r in heldout}
    assert not any((r["task"], r["messages"][0]["content"]) in reserved for r in prompts)
    for r in prompts:
        text = r["messages"][0]["content"]
        if r["task"] == "addition":
            a, b = (int(x) for x in text.removeprefix("What is ").removesuffix("?").split(" + "))
            assert r["answer"] == str(a + b)
        elif r["task"] == "count_letter":
            letter, word = (
                text.removeprefix("How many times does the letter ").removesuffix("?").split(" appear in ")
            )
            assert r["answer"] == str(word.count(letter))
        else:
            words = text.removeprefix("Reverse the order of these words: ").split()
            assert r["answer"] == " ".join(reversed(words))
    counted = {
        r["messages"][0]["content"].split()[-1].rstrip("?") for r in prompts if r["task"] == "count_letter"
    }
    assert counted <= set(RL_EXTRA_WORDS)  # words the instruction set never asks about
    assert rl_prompts(heldout, per_task, seed=3) == prompts
    with pytest.raises(ValueError, match="unknown task"):
        rl_prompts(heldout, {"division": 3})
