"""The official ``openai`` client against a running server: completions, chat, streaming, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch

from lmforge.infer import SamplingParams
from lmforge.serve.async_engine import AsyncEngine
from lmforge.serve.completions import OpenAIServing
from lmforge.serve.errors import APIError
from lmforge.serve.responses import Prompt
from tests.serve.live_server import (
    API_KEY,
    MAX_MODEL_LEN,
    MODEL_ID,
    SPLIT_CHARACTER,
    RunningServer,
    build_engine,
    running_server,
)


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=30)


def reference_logprobs(server: RunningServer, token_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of each token given the ones before it, from one plain forward of the model."""
    model = server.engine.model
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs[:-1].gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


def test_models_lists_the_folder_name(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID


def test_completion_text_and_usage(client, server):
    result = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=5, temperature=0)
    (choice,) = result.choices
    assert result.object == "text_completion" and result.model == MODEL_ID
    prompt_ids = server.engine.tokenizer.encode("Hello world", add_special_tokens=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= result.usage.completion_tokens <= 5
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert result.usage.completion_tokens == 5


def test_completion_prompt_forms(client, server):
    tok = server.engine.tokenizer
    ids = tok.encode("The quick brown fox", add_special_tokens=True)
    as_text = client.completions.create(
        model=MODEL_ID, prompt="The quick brown fox", max_tokens=4, temperature=0
    )
    as_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=4, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text  # same tokens in, same greedy tokens out
    several = client.completions.create(
        model=MODEL_ID, prompt=["The quick brown fox", "Hello world"], max_tokens=4, temperature=0
    )
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].text == as_text.choices[0].text
    id_lists = client.completions.create(model=MODEL_ID, prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert id_lists.choices[0].text == as_text.choices[0].text
    assert id_lists.usage.prompt_tokens == len(ids) + 3


def test_echo_with_logprobs_scores_every_prompt_token_like_lm_eval(client, server):
    """lm-evaluation-harness sends token ids with echo + logprobs and reads prompt-length + 1 entries."""
    ids = server.engine.tokenizer.encode("A journey of a thousand miles", add_special_tokens=True)
    result = client.completions.create(
        model=MODEL_ID, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    lp = result.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = reference_logprobs(server, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1 : len(ids)]), expected, atol=1e-4)
    # top_logprobs holds the requested alternative plus the chosen token (OpenAI's legacy format).
    for top, token, logprob in zip(lp.top_logprobs[1:], lp.tokens[1:], lp.token_logprobs[1:]):
        assert 1 <= len(top) <= 2 and top[token] == pytest.approx(logprob)
    assert result.choices[0].text.startswith(server.engine.tokenizer.decode(ids))  # echoed as given
    assert lp.text_offset == sorted(lp.text_offset)


def test_echo_logprobs_are_complete_when_the_prompt_is_in_the_prefix_cache(client, server):
    ids = server.engine.tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 3))
    assert len(ids) > 2 * server.engine.block_manager.block_size  # whole blocks the cache can serve
    client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=1)  # fills the prefix cache
    result = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=1, echo=True, logprobs=0)
    token_logprobs = result.choices[0].logprobs.token_logprobs[: len(ids)]
    assert token_logprobs[0] is None
    assert torch.allclose(torch.tensor(token_logprobs[1:]), reference_logprobs(server, ids), atol=1e-4)


def test_echo_with_max_tokens_zero_returns_only_the_prompt(client, server):
    ids = server.engine.tokenizer.encode("Hello world", add_special_tokens=True)
    result = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    lp = result.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) and lp.token_logprobs[0] is None
    assert result.usage.completion_tokens == 0


def test_generated_logprobs_are_the_models(client, server):
    ids = server.engine.tokenizer.encode("Hello world", add_special_tokens=True)
    result = client.completions.create(
        model=MODEL_ID, prompt=ids, max_tokens=4, temperature=0, logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )  # fmt: skip
    lp = result.choices[0].logprobs
    generated = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert server.engine.tokenizer.decode(generated, skip_special_tokens=True) == result.choices[0].text
    expected = reference_logprobs(server, ids + generated)[len(ids) - 1 :]
    assert torch.allclose(torch.tensor(lp.token_logprobs), expected, atol=1e-4)
    for top, logprob in zip(lp.top_logprobs, lp.token_logprobs):
        assert max(top.values()) == pytest.approx(logprob)  # greedy picks the most likely token


def test_n_choices_and_seeds(client):
    kwargs = dict(model=MODEL_ID, prompt="Hello", max_tokens=8, temperature=1.0, n=4, seed=1234)
    first = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert first.usage.completion_tokens == 32
    assert len({c.text for c in first.choices}) > 1  # independent samples
    again = client.completions.create(**kwargs, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # same seed, same samples


def test_streamed_completion_equals_the_whole_one(client):
    kwargs = dict(model=MODEL_ID, prompt=["Hello world", "The quick"], max_tokens=6, temperature=0)
    whole = client.completions.create(**kwargs)
    texts = {0: "", 1: ""}
    finishes = {}
    usage = None
    for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage == whole.usage


def test_streamed_echo_and_logprobs_equal_the_whole_response(client, server):
    ids = server.engine.tokenizer.encode("Hello world", add_special_tokens=True)
    kwargs = dict(model=MODEL_ID, prompt=ids, max_tokens=5, temperature=0, echo=True, logprobs=2, n=2)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True))
    for index, expected in enumerate(whole.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].text == server.engine.tokenizer.decode(ids)  # the echoed prompt comes first
        assert "".join(c.text for c in mine) == expected.text
        streamed = [lp for c in mine if c.logprobs for lp in c.logprobs.token_logprobs]
        assert streamed == expected.logprobs.token_logprobs
        assert [c.finish_reason for c in mine if c.finish_reason] == [expected.finish_reason]


def chat(client, **kwargs):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **kwargs)


def test_chat_prompt_is_the_tokenizer_chat_template(client, server):
    result = chat(client, max_tokens=3, temperature=0)
    tok = server.engine.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}],
        add_generation_prompt=True,
    )
    assert result.usage.prompt_tokens == len(tok.encode(rendered))
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant"


def test_chat_stream_follows_openai_chunk_order(client):
    whole = chat(client, max_tokens=6, temperature=0)
    chunks = list(
        chat(client, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content_chunks = chunks[1:-2]
    assert all(c.choices[0].delta.role is None and c.choices[0].finish_reason is None for c in content_chunks)
    final, usage = chunks[-2], chunks[-1]
    assert (
        final.choices[0].finish_reason == whole.choices[0].finish_reason
        and not final.choices[0].delta.content
    )
    assert usage.choices == [] and usage.usage == whole.usage
    assert "".join(c.choices[0].delta.content for c in content_chunks) == whole.choices[0].message.content
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_usage_appears_in_chunks_only_when_asked_for(server):
    request = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }

    def chunks(**extra) -> list[dict]:
        with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json={**request, **extra},
                          headers=server.headers()) as response:  # fmt: skip
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]

    assert all("usage" not in c for c in chunks())
    with_usage = chunks(stream_options={"include_usage": True})
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] > 0


def test_chat_logprobs_and_top_logprobs(client):
    result = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the top one is chosen
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert entry.bytes == list(entry.token.encode("utf-8"))
    streamed = []
    for chunk in chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_chat_n_choices_stream(client):
    chunks = list(chat(client, max_tokens=5, temperature=1.0, seed=7, n=3, stream=True))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(roles) == [0, 1, 2] and sorted(finishes) == [0, 1, 2]


def test_streamed_multibyte_characters_are_never_split(client, server):
    """Force "日" as three byte-level tokens in order (logit_bias decreasing by 0.5, frequency_penalty 2
    makes the greedy choice cycle through them): every delta must hold whole characters."""
    tok = server.engine.tokenizer
    byte_tokens = tok.encode(SPLIT_CHARACTER)
    assert len(byte_tokens) == 3
    bias = {str(t): 100.0 - 0.5 * i for i, t in enumerate(byte_tokens)}
    kwargs = dict(max_tokens=12, temperature=0, logit_bias=bias, frequency_penalty=2.0)
    whole = chat(client, **kwargs)
    assert whole.choices[0].message.content == SPLIT_CHARACTER * 4
    deltas = [c.choices[0].delta.content for c in chat(client, **kwargs, stream=True) if c.choices]
    deltas = [d for d in deltas if d]
    assert "".join(deltas) == SPLIT_CHARACTER * 4
    assert all(d == SPLIT_CHARACTER * len(d) for d in deltas)  # no U+FFFD, no half character


def test_stop_strings_are_removed(client):
    whole = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=10, temperature=0)
    text = whole.choices[0].text
    if len(text) < 3:
        pytest.skip("the random model stopped too early to pick a stop string")
    stop = text[1:3]
    stopped = client.completions.create(
        model=MODEL_ID, prompt="Hello world", max_tokens=10, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_beam_search_returns_n_best(client):
    result = client.completions.create(
        model=MODEL_ID,
        prompt="Hello world",
        max_tokens=4,
        n=2,
        extra_body={"use_beam_search": True, "best_of": 3},
    )
    assert [c.index for c in result.choices] == [0, 1]
    assert result.choices[0].text != result.choices[1].text


# -- errors arrive as the client's exception types ---------------------------------------------------------


def test_wrong_or_missing_api_key(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key or "x", max_retries=0)
        if not key:
            bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                                default_headers={"Authorization": ""})  # fmt: skip
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(temperature=3.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=0), "n"),
        (dict(logprobs=50), "logprobs"),
        (dict(max_tokens=MAX_MODEL_LEN + 1), "max_tokens"),
        (dict(prompt="word " * MAX_MODEL_LEN), "prompt"),
        (dict(prompt=[10**6]), "prompt"),
        (dict(logit_bias={"999999": 1}), "logit_bias"),
        (dict(extra_body={"stop_token_ids": [10**6]}), "stop_token_ids"),
        (dict(stop=["a"] * 20), "stop"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_invalid_completion_requests_are_bad_requests(client, kwargs, param):
    request = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_invalid_chat_requests_are_bad_requests(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, max_completion_tokens=MAX_MODEL_LEN)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="Hello", max_tokens=2)
    assert info.value.code == "model_not_found"


def test_raw_error_envelope_and_malformed_json(server):
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        content=b"{not json",
        headers={**server.headers(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    response = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": 5}, headers=server.headers())
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("prompt")


def test_admission_counts_prompts_still_being_added(tokenizer):
    """Two 2-prompt requests arrive together under a limit of 3: exactly one is admitted, although the
    first is still handing its prompts to the engine when the second is checked."""
    bridge = AsyncEngine(build_engine(tokenizer))
    serving = OpenAIServing(bridge, MODEL_ID, max_active_requests=3)
    params = SamplingParams(max_tokens=2)
    prompts = [(Prompt([1, 2, 3], ""), params), (Prompt([4, 5], ""), params)]

    async def main() -> list:
        results = await asyncio.gather(
            serving.start("first", prompts), serving.start("second", prompts), return_exceptions=True
        )
        for result in results:
            for stream in result if isinstance(result, list) else []:
                stream.abort()
        return results

    try:
        results = asyncio.run(main())
    finally:
        bridge.shutdown()
    admitted = [r for r in results if isinstance(r, list)]
    refused = [r for r in results if isinstance(r, APIError)]
    assert len(admitted) == 1 and len(admitted[0]) == 2
    assert len(refused) == 1 and refused[0].status == 429


@pytest.mark.slow
def test_a_hugging_face_checkpoint_is_served_with_transformers_greedy_tokens(tmp_path, tokenizer):
    """A Llama folder written by transformers, served from disk: greedy tokens over the API equal
    transformers' own ``generate`` on the same weights."""
    import transformers

    from lmforge.infer import LLMEngine

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    hf_model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path / "tiny-hf-llama"
    hf_model.save_pretrained(folder)
    tokenizer.save(folder)
    prompt = tokenizer.encode("The quick brown fox", add_special_tokens=True)
    with torch.no_grad():
        input_ids = torch.tensor([prompt])
        expected = hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(
                input_ids
            ),  # the BOS id is 0, which transformers would take for padding
            max_new_tokens=8,
            eos_token_id=None,  # like ignore_eos: never stop early, never suppress EOS either
            do_sample=False,
            pad_token_id=tokenizer.pad_id,
        )[0, len(prompt) :].tolist()
    with running_server(lambda: LLMEngine.from_pretrained(folder)) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        result = client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, logprobs=0,
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
        )  # fmt: skip
    tokens = [int(t.removeprefix("token_id:")) for t in result.choices[0].logprobs.tokens]
    assert tokens == expected
