"""The engine bridge under load: many concurrent streams, clients that leave, blocks that must come back."""

from __future__ import annotations

import asyncio
import gc
import json

import httpx
import openai
import pytest

from lmforge.infer import SamplingParams
from lmforge.serve.async_engine import AsyncEngine
from tests.serve.live_server import (
    MODEL_ID,
    StepDelay,
    build_engine,
    metric_values,
    running_server,
    wait_until_idle,
)

N_CLIENTS = 40
DISCONNECT_EVERY = 4  # every 4th client leaves after its first content chunk


async def stream_chat(client: httpx.AsyncClient, index: int) -> dict:
    leaves_early = index % DISCONNECT_EVERY == 0
    request = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": f"Client {index} says hello."}],
        "max_tokens": 200 if leaves_early else 6 + index % 5,
        "temperature": 0.8,
        "seed": index,
        "stream": True,
        "ignore_eos": leaves_early,  # keeps the abandoned ones running until they are aborted
    }
    events: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=request) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if not line:
                continue
            events.append(line)
            if leaves_early and len(events) >= 2:
                break  # leaving the block closes the connection mid-stream
    return {"status": status, "events": events, "left": leaves_early}


def test_concurrent_streams_with_disconnects_free_every_block(tokenizer):
    engine = build_engine(tokenizer, max_model_len=512)
    StepDelay(engine, seconds=0.005)  # the leavers' 200-token replies are still running when they leave
    with running_server(lambda: engine) as server:
        before = metric_values(server.base_url)

        async def main() -> list[dict]:
            limits = httpx.Limits(max_connections=N_CLIENTS)
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
                return await asyncio.gather(*(stream_chat(client, i) for i in range(N_CLIENTS)))

        results = asyncio.run(main())
        wait_until_idle(server)
        after = metric_values(server.base_url)
        assert server.state.engine.num_active == 0
    assert [r["status"] for r in results] == [200] * N_CLIENTS
    for result in results:
        if result["left"]:
            continue
        assert result["events"][-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in result["events"][:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert after["lmforge_kv_blocks_used"] == 0

    def delta(name: str) -> float:
        return after[name] - before[name]

    # Every request either finished (its latency was recorded) or was aborted, never both, never neither.
    aborted = delta("lmforge_requests_aborted_total")
    assert aborted == N_CLIENTS // DISCONNECT_EVERY
    assert delta("lmforge_e2e_request_latency_seconds_count") + aborted == N_CLIENTS


def test_non_streaming_client_disconnect_aborts_the_request(tokenizer):
    engine = build_engine(tokenizer)
    StepDelay(engine, seconds=0.01)  # 80 steps take ~0.8 s; the client gives up after 0.3 s
    request = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 80, "n": 4, "ignore_eos": True}
    with running_server(lambda: engine) as running:
        before = metric_values(running.base_url)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.base_url}/v1/completions", json=request, timeout=0.3)
        wait_until_idle(running)
        after = metric_values(running.base_url)
    # the request was abandoned, not completed: it was aborted and no e2e latency was recorded for it
    assert after["lmforge_requests_aborted_total"] == before["lmforge_requests_aborted_total"] + 1
    assert (
        after["lmforge_e2e_request_latency_seconds_count"]
        == before["lmforge_e2e_request_latency_seconds_count"]
    )
    assert after["lmforge_kv_blocks_used"] == 0


def test_dropping_an_unread_stream_aborts_its_request(tokenizer):
    """A response body that is never iterated (the client left first) still frees its request."""
    engine = build_engine(tokenizer)
    bridge = AsyncEngine(engine)

    async def main() -> None:
        params = SamplingParams(max_tokens=50, ignore_eos=True)
        stream = await bridge.add_request("dropped", tokenizer.encode("Hello"), params)
        first = await stream.__anext__()
        assert first.outputs[0].new_token_ids
        del stream
        gc.collect()
        for _ in range(200):
            if engine.stats().kv_blocks_used == 0 and not engine.has_unfinished():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"blocks still held: {engine.stats()}")

    try:
        asyncio.run(main())
        assert bridge.num_active == 0
    finally:
        bridge.shutdown()


def test_refused_requests_raise_before_streaming(tokenizer):
    bridge = AsyncEngine(build_engine(tokenizer))

    async def main() -> None:
        with pytest.raises(ValueError, match="prompt"):
            await bridge.add_request("too-long", [1] * 500, SamplingParams(max_tokens=4))
        assert bridge.num_active == 0

    try:
        asyncio.run(main())
    finally:
        bridge.shutdown()


def test_an_engine_failure_fails_its_requests_and_serving_goes_on(tokenizer):
    """Fault injection: one engine step raises. Its requests end with a 500 envelope (or, once a stream
    has started, an error event), and the next request is served normally."""
    engine = build_engine(tokenizer)
    real_step = engine.step
    failures = {"left": 0}

    def step():
        # only a step that serves requests fails (not one that merely reports the last request's abort,
        # which would use up the fault before the next request arrives)
        if failures["left"] and engine.scheduler.has_work():
            failures["left"] -= 1
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = step
    with running_server(lambda: engine) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        failures["left"] = 1
        with pytest.raises(openai.InternalServerError) as info:
            client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4)
        assert info.value.code == "engine_error" and "injected fault" in info.value.message
        failures["left"] = 1
        with pytest.raises(openai.APIError, match="injected fault"):
            list(
                client.chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
        wait_until_idle(running)
        assert client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=4).usage.completion_tokens
