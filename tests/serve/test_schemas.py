import json

import pytest
from pydantic import ValidationError

from lmforge.serve.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    TokenizeRequest,
    template_messages,
)


@pytest.mark.parametrize(
    "prompt",
    ["hello", ["a", "b"], [1, 2, 3], [[1, 2], [3]]],
)
def test_completion_prompt_forms_are_kept_as_given(prompt):
    assert CompletionRequest(prompt=prompt).prompt == prompt


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1], []]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"١٢": 1}}, "logit_bias"),  # non-ASCII digits are not token ids
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, None),  # only allowed with echo
        ({"prompt": "x", "use_beam_search": True, "logprobs": 1}, None),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, None),  # needs stream
    ],
)
def test_completion_rejects_malformed_fields(fields, param):
    """The wire format (types, shapes, combinations); the ranges are SamplingParams' (tests/infer/test_sampling.py)."""
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**fields)
    if param is not None:
        assert info.value.errors()[0]["loc"][0] == param


def test_completion_defaults_follow_openai():
    req = CompletionRequest(prompt="x")
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.stream, req.echo) == (
        16,
        1.0,
        1.0,
        1,
        False,
        False,
    )
    assert req.stop == []
    assert CompletionRequest(prompt="x", stop="END").stop == ["END"]
    assert CompletionRequest(prompt="x", echo=True, max_tokens=0).max_tokens == 0


def test_unknown_fields_are_ignored_like_openai():
    req = CompletionRequest(prompt="x", user="someone", suffix=None)
    assert not hasattr(req, "user")


def test_chat_messages_and_max_tokens_aliases():
    req = ChatCompletionRequest(
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=5,
    )
    assert template_messages(req.messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    assert req.requested_max_tokens == 5
    both = ChatCompletionRequest(
        messages=[{"role": "user", "content": "x"}], max_tokens=5, max_completion_tokens=7
    )
    assert both.requested_max_tokens == 7


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3},  # needs logprobs=true
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 21, "logprobs": True},
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "x"}], "use_beam_search": True, "logprobs": True},
    ],
)
def test_chat_rejects_invalid_requests(fields):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**fields)


def test_tokenize_needs_exactly_one_input():
    with pytest.raises(ValidationError):
        TokenizeRequest()
    with pytest.raises(ValidationError):
        TokenizeRequest(messages=[])
    with pytest.raises(ValidationError):
        TokenizeRequest(prompt="a", messages=[{"role": "user", "content": "b"}])


def test_chat_chunk_serializes_like_openai():
    # OpenAI deltas carry only the keys that changed; logprobs and finish_reason are explicit nulls.
    first = ChatCompletionChunk(
        id="c",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    body = json.loads(first.model_dump_json())
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}  # fmt: skip
    last = ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason="stop")
    assert json.loads(last.model_dump_json())["delta"] == {}
