import pytest

from lmforge.eval.fewshot import PromptFormat, chat_messages, plain_prompt, sample_demonstrations
from lmforge.eval.tasks import TaskExample

POOL = [TaskExample(prompt=f"q{i}", answers=(f"a{i}",)) for i in range(6)]


def test_plain_prompt_layout_matches_harness_convention():
    fmt = PromptFormat(description="Answer.\n\n")
    prompt = plain_prompt(POOL[0], [POOL[1], POOL[2]], fmt)
    assert prompt == "Answer.\n\nq1\nAnswer: a1\n\nq2\nAnswer: a2\n\nq0\nAnswer:"
    assert plain_prompt(POOL[0], [], PromptFormat()) == "q0\nAnswer:"


def test_multiple_choice_demonstrations_show_the_right_choice():
    mc = TaskExample(prompt="pick", choices=("x", "y"), label=1)
    assert (
        plain_prompt(POOL[0], [mc], PromptFormat(template="Q: {prompt}\nA:")) == "Q: pick\nA: y\n\nQ: q0\nA:"
    )


def test_chat_messages_alternate_and_end_with_the_question():
    messages = chat_messages(POOL[0], [POOL[3]], PromptFormat(description="sys"))
    assert messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q3"},
        {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "q0"},
    ]


def test_demonstrations_exclude_the_question_and_are_stable():
    for index in range(20):
        shots = sample_demonstrations(POOL, 5, POOL[0], seed=1, index=index)
        assert POOL[0] not in shots and len(set(shots)) == 5
    assert sample_demonstrations(POOL, 3, POOL[0], 1, 7) == sample_demonstrations(POOL, 3, POOL[0], 1, 7)
    assert sample_demonstrations(POOL, 0, POOL[0], 1, 7) == []
    with pytest.raises(ValueError, match="pool has 5"):
        sample_demonstrations(POOL, 6, POOL[0], 1, 0)
