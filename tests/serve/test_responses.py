"""Engine outputs into OpenAI bodies and chunks: each choice's deltas add up, a finish is reported once,
usage counts what was generated, and the stream follows OpenAI's order (role chunk, content, finish, usage, DONE)."""

from __future__ import annotations

import asyncio
import json

from lmforge.infer import CompletionOutput, RequestOutput
from lmforge.serve.responses import ChatAssembler, ChoiceState, Prompt, apply_step
from lmforge.serve.schemas import ChatCompletionRequest


def step(texts: list[str], tokens: list[list[int]], finish: list[str | None]) -> RequestOutput:
    outputs = [
        CompletionOutput(i, [], "", new_ids, text, None, None, 0.0, reason)
        for i, (text, new_ids, reason) in enumerate(zip(texts, tokens, finish))
    ]
    return RequestOutput("r", [1, 2, 3], outputs, all(finish))


STEPS = [
    step(["Hel", "A"], [[10, 11], [20]], [None, None]),
    step(["lo", ""], [[12], []], ["stop", None]),
    step(["ignored", "B"], [[13], [21]], ["stop", "length"]),  # a choice already finished reports nothing
]


def test_apply_step_accumulates_each_choice_and_reports_a_finish_once() -> None:
    states = [ChoiceState(), ChoiceState()]
    deltas = [apply_step(states, 0, s) for s in STEPS]
    assert [(d.index, d.text, d.text_start) for d in deltas[0]] == [(0, "Hel", 0), (1, "A", 0)]
    assert [(d.index, d.text, d.finish_reason, d.text_start) for d in deltas[1]] == [(0, "lo", "stop", 3)]
    assert [(d.index, d.text, d.finish_reason) for d in deltas[2]] == [(1, "B", "length")]
    assert (states[0].text, states[0].token_ids, states[0].finish_reason) == ("Hello", [10, 11, 12], "stop")
    assert (states[1].text, states[1].token_ids, states[1].finish_reason) == ("AB", [20, 21], "length")


async def outputs():
    for s in STEPS:
        yield 0, s


def test_chat_body_and_stream_carry_the_same_choices_and_usage() -> None:
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=2, stream=True,
                                stream_options={"include_usage": True})  # fmt: skip
    whole = asyncio.run(ChatAssembler("m", None, req, Prompt([1, 2, 3], "hi"), "chat-1").whole(outputs()))
    assert [(c.message.content, c.finish_reason) for c in whole.choices] == [
        ("Hello", "stop"),
        ("AB", "length"),
    ]
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (3, 5, 8)

    async def collect() -> list[str]:
        assembler = ChatAssembler("m", None, req, Prompt([1, 2, 3], "hi"), "chat-1")
        return [event async for event in assembler.events(outputs())]

    events = asyncio.run(collect())
    assert events[-1].strip() == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    text = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[2:-1]:
        (choice,) = chunk["choices"]
        text[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert text == {0: "Hello", 1: "AB"} and finishes == {0: "stop", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
