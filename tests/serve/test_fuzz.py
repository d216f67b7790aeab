"""Property test over the request schema: whatever a client sends, the answer is never a 5xx, and a
concurrent innocent stream is never affected (it finishes with all its tokens)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.serve.live_server import MODEL_ID, StepDelay, build_engine, running_server  # noqa: E402

NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2, 20, 21, 128, 129, 1e-300, 5e-324, 1e308, -1e308, 2**63, 2**64]),
)
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "ok\udfff", "", " ", "<|im_end|>"]))
ANYTHING = st.one_of(
    NUMBERS, TEXT, st.none(), st.booleans(), st.lists(NUMBERS, max_size=3), st.lists(TEXT, max_size=3)
)
FIELDS = [
    "n", "best_of", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "length_penalty", "logprobs", "top_logprobs", "stop",
    "stop_token_ids", "ignore_eos", "use_beam_search", "echo", "stream", "logit_bias", "max_completion_tokens",
]  # fmt: skip
REQUEST = st.fixed_dictionaries(
    {},
    optional={
        **{name: st.one_of(ANYTHING, NUMBERS) for name in FIELDS},
        "prompt": st.one_of(TEXT, st.lists(st.integers(-5, 10**6), max_size=4), ANYTHING),
        "logit_bias": st.dictionaries(
            st.one_of(TEXT, st.sampled_from(["1", "١٢", "-3", "99999999999"])), NUMBERS, max_size=3
        ),
    },
)


@pytest.fixture(scope="module")
def fuzz_server(tokenizer):
    def load():
        engine = build_engine(tokenizer, max_model_len=128)
        StepDelay(engine, 0.002)
        return engine

    with running_server(load) as running:
        yield running


def innocent_streams(base_url: str, stop: threading.Event, results: list[tuple[int, object]]) -> None:
    """Innocent streams one after another for as long as the fuzzing runs: (tokens, error) of each."""

    async def one(client: httpx.AsyncClient) -> tuple[int, object]:
        body = {"model": MODEL_ID, "prompt": "innocent", "max_tokens": 60, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        tokens, error = 0, None
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    error = error or chunk.get("error")
                    tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        return tokens, error

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            while not stop.is_set():
                results.append(await one(client))

    asyncio.run(main())


@pytest.mark.slow
def test_no_request_gets_a_5xx_or_disturbs_a_concurrent_stream(fuzz_server):
    stop, innocent = threading.Event(), []
    thread = threading.Thread(target=innocent_streams, args=(fuzz_server.base_url, stop, innocent))
    thread.start()
    statuses: list[int] = []
    client = httpx.Client(base_url=fuzz_server.base_url, timeout=60)

    @settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=REQUEST, chat=st.booleans())
    # the values that broke a step (and every stream in it) before, always tried
    @example(request={"prompt": "p", "temperature": 1e-300}, chat=False)
    @example(request={"prompt": "p", "temperature": 5e-324}, chat=False)
    @example(request={"prompt": "p", "repetition_penalty": 1e-300}, chat=False)
    @example(request={"prompt": "p", "top_k": 2**64}, chat=False)
    @example(request={"prompt": "p", "use_beam_search": True, "n": 2, "length_penalty": 1e308}, chat=False)
    @example(request={"prompt": "bad \ud800"}, chat=True)
    @example(request={"prompt": "p", "logit_bias": {"١٢": 1}}, chat=False)
    def send(request: dict, chat: bool) -> None:
        body = dict(request)
        if chat:
            body["messages"] = [
                {
                    "role": "user",
                    "content": body.pop("prompt", "hi") if isinstance(body.get("prompt"), str) else "hi",
                }
            ]
        body = json.dumps(body, allow_nan=True)  # NaN / Infinity as some clients send them
        path = "/v1/chat/completions" if chat else "/v1/completions"
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        if "text/event-stream" in response.headers.get("content-type", ""):
            assert "internal error" not in response.text
        statuses.append(response.status_code)
        assert response.status_code < 500, (body, response.text[:500])

    try:
        send()
    finally:
        stop.set()
        thread.join(timeout=120)
        client.close()
    assert len(innocent) >= 3 and set(innocent) == {(60, None)}
    assert len(statuses) >= 100 and {200, 400} <= set(statuses)
