"""No bad request reaches a 500 or another client: poison values next to long streams, an engine failure
confined to one request, hostile text, and oversized requests."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.serve.live_server import MODEL_ID, StepDelay, build_engine, running_server

STREAM_TOKENS = 40
POISONS = [
    ({"temperature": 1e-300}, {200}),  # below the greedy floor: greedy, computed safely
    ({"temperature": 5e-324}, {200}),
    ({"repetition_penalty": 1e-300}, {400}),
    ({"top_k": 2**64}, {400}),
    ({"top_k": 10**6, "temperature": 0.7}, {200}),  # larger than the vocabulary: the whole vocabulary
    ({"use_beam_search": True, "n": 2, "length_penalty": 1e308}, {400}),
    ({"use_beam_search": True, "n": 2, "length_penalty": "NaN"}, {400}),
    ({"temperature": "Infinity"}, {400}),
    ({"logit_bias": {"١٢": 5}}, {400}),  # Arabic-Indic digits are not a token id
    ({"presence_penalty": -1e309}, {400}),
]


async def long_stream(client: httpx.AsyncClient, index: int) -> tuple[int, str | None]:
    body = {"model": MODEL_ID, "prompt": f"Stream number {index}", "max_tokens": STREAM_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    tokens, finish = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                finish = choice["finish_reason"] or finish
    return tokens, finish


async def poison(client: httpx.AsyncClient, fields: dict) -> int:
    await asyncio.sleep(0.05)  # while the streams are decoding
    raw = json.dumps({"model": MODEL_ID, "prompt": "poison", "max_tokens": 8, **fields})
    raw = raw.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")  # non-standard JSON numbers, as sent
    response = await client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    return response.status_code


@pytest.fixture(scope="module")
def slow_server(tokenizer):
    def load():
        engine = build_engine(tokenizer, max_model_len=256)
        StepDelay(engine, 0.003)
        return engine

    with running_server(load) as running:
        yield running


@pytest.mark.parametrize(("fields", "statuses"), POISONS, ids=[json.dumps(f) for f, _ in POISONS])
def test_innocent_streams_finish_with_all_their_tokens_next_to_a_poison_request(
    slow_server, fields, statuses
):
    async def main():
        async with httpx.AsyncClient(base_url=slow_server.base_url, timeout=60) as client:
            return await asyncio.gather(*(long_stream(client, i) for i in range(4)), poison(client, fields))

    *streams, status = asyncio.run(main())
    assert status in statuses
    assert streams == [(STREAM_TOKENS, "length")] * 4


def test_an_engine_failure_of_one_request_leaves_the_others_running(tokenizer):
    def load():
        engine = build_engine(tokenizer, max_model_len=256)
        StepDelay(engine, 0.003)
        sample = engine.sampler

        def sampler(logits, seqs):
            if any(s.params.seed == 666 for s in seqs):
                raise RuntimeError("simulated kernel failure")
            return sample(logits, seqs)

        engine.sampler = sampler
        return engine

    async def failing(client: httpx.AsyncClient) -> httpx.Response:
        await asyncio.sleep(0.05)
        body = {"model": MODEL_ID, "prompt": "fail me", "max_tokens": 8, "temperature": 0.5, "seed": 666}
        return await client.post("/v1/completions", json=body)

    with running_server(load) as server:

        async def main():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                return await asyncio.gather(*(long_stream(client, i) for i in range(4)), failing(client))

        *streams, failed = asyncio.run(main())
        assert streams == [(STREAM_TOKENS, "length")] * 4
        assert failed.status_code == 500
        assert "simulated kernel failure" in failed.json()["error"]["message"]
        assert server.engine.block_manager.num_used_blocks == 0


def test_lone_surrogates_are_a_bad_request_not_a_server_error(server):
    headers = server.headers() | {"Content-Type": "application/json"}
    for path, body in [
        ("/v1/completions", '{"prompt": "bad \\ud800 text", "max_tokens": 2}'),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "x\\udfff"}]}',
        ),
        ("/tokenize", '{"prompt": "a\\ud83d"}'),
    ]:
        response = httpx.post(f"{server.base_url}{path}", content=body, headers=headers, timeout=30)
        assert response.status_code == 400, (path, response.text)
        assert "surrogate" in response.json()["error"]["message"]


def test_more_prompts_than_the_server_ever_runs_is_a_400_not_a_429(tokenizer):
    with running_server(lambda: build_engine(tokenizer), max_active_requests=4) as server:
        body = {"model": MODEL_ID, "prompt": ["a"] * 5, "max_tokens": 1}
        response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt"


def test_the_key_is_checked_before_the_body_and_metrics_and_docs_can_be_protected(tokenizer):
    with running_server(
        lambda: build_engine(tokenizer), api_key="k", protect_metrics=True, protect_docs=True
    ) as server:
        url = server.base_url
        broken = httpx.post(
            f"{url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert broken.status_code == 401  # not 400: an unauthenticated client learns nothing of the schema
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(f"{url}{path}").status_code == 401, path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer k"}).status_code == 200, path
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(url).status_code == 200
    with running_server(lambda: build_engine(tokenizer), api_key="k") as server:  # default: metrics open
        assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_oversized_bodies_get_413_whether_declared_or_streamed(tokenizer):
    with running_server(lambda: build_engine(tokenizer), max_body_bytes=10_000) as server:
        url = f"{server.base_url}/v1/completions"
        body = json.dumps({"model": MODEL_ID, "prompt": "x" * 20_000, "max_tokens": 1}).encode()
        declared = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"

        def chunks():
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        streamed = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
        assert streamed.status_code == 413
        small = httpx.post(url, json={"model": MODEL_ID, "prompt": "hello", "max_tokens": 1})
        assert small.status_code == 200


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(tokenizer, monkeypatch):
    with running_server(lambda: build_engine(tokenizer)) as server:
        serving = server.state.serving
        calls = []
        encode = serving.tokenizer.encode
        monkeypatch.setattr(
            serving.tokenizer, "encode", lambda text, *a: calls.append(len(text)) or encode(text, *a)
        )
        huge = "a" * (serving.max_prompt_chars + 1)  # one word, as the 20 MB trial sent
        response = httpx.post(
            f"{server.base_url}/v1/completions", json={"model": MODEL_ID, "prompt": huge}, timeout=60
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert calls == []


def test_tokenizing_runs_off_the_event_loop(tokenizer, monkeypatch):
    import threading

    with running_server(lambda: build_engine(tokenizer)) as server:
        serving = server.state.serving
        release = threading.Event()
        encode = serving.tokenizer.encode

        def slow_encode(text, *args):
            if text.startswith("slow"):
                release.wait(30)  # a tokenization that takes as long as the test wants
            return encode(text, *args)

        monkeypatch.setattr(serving.tokenizer, "encode", slow_encode)

        async def main():
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
                slow = asyncio.create_task(
                    client.post("/v1/completions", json={"prompt": "slow prompt", "max_tokens": 1})
                )
                await asyncio.sleep(0.2)
                health = await client.get("/health")  # answered while the tokenization is still running
                assert not slow.done()
                release.set()
                return health.status_code, (await slow).status_code

        assert asyncio.run(main()) == (200, 200)
