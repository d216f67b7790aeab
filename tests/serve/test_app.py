"""Endpoints around generation: health while loading, tokenizer utilities, auth, metrics, overload, page."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.serve.live_server import (
    MAX_MODEL_LEN,
    MODEL_ID,
    StepDelay,
    build_engine,
    metric_values,
    running_server,
    wait_until_idle,
)


def test_health_is_503_until_the_model_is_loaded(tokenizer):
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return build_engine(tokenizer)

    with running_server(slow_load, wait_healthy=False) as running:
        health = httpx.get(f"{running.base_url}/health")
        assert health.status_code == 503
        assert health.json()["error"]["code"] == "model_loading"
        assert httpx.get(f"{running.base_url}/v1/models").status_code == 503
        assert httpx.get(f"{running.base_url}/metrics").status_code == 200  # scrapable while loading
        release.set()
        deadline = time.monotonic() + 30
        while httpx.get(f"{running.base_url}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"{running.base_url}/v1/models").json()["data"][0]["id"] == MODEL_ID


def test_health_reports_a_failed_load():
    def broken_load():
        raise FileNotFoundError("no weights in /nowhere")

    with running_server(broken_load, wait_healthy=False) as running:
        deadline = time.monotonic() + 10
        while (body := httpx.get(f"{running.base_url}/health").json())["error"]["code"] == "model_loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert body["error"]["code"] == "model_load_failed"
        assert "no weights in /nowhere" in body["error"]["message"]


def test_tokenize_and_detokenize_round_trip(server):
    tok = server.engine.tokenizer
    text = "Le café est très bon"
    response = httpx.post(f"{server.base_url}/tokenize", json={"prompt": text}, headers=server.headers())
    body = response.json()
    assert body["tokens"] == tok.encode(text, add_special_tokens=True)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    plain = httpx.post(
        f"{server.base_url}/tokenize",
        json={"prompt": text, "add_special_tokens": False},
        headers=server.headers(),
    ).json()
    back = httpx.post(
        f"{server.base_url}/detokenize", json={"tokens": plain["tokens"]}, headers=server.headers()
    )
    assert back.json() == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(
        f"{server.base_url}/tokenize", json={"messages": messages}, headers=server.headers()
    ).json()
    assert chat["tokens"] == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    bad = httpx.post(f"{server.base_url}/detokenize", json={"tokens": [10**7]}, headers=server.headers())
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_tokenizer_info_lets_a_client_tokenize_like_the_server(server):
    """The contract lm-evaluation-harness's remote tokenizer relies on: /tokenizer_info names the special
    tokens and the chat template, and /tokenize of the EOS text gives the EOS id."""
    tok = server.engine.tokenizer
    info = httpx.get(f"{server.base_url}/tokenizer_info", headers=server.headers()).json()
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == (
        tok.eos_token,
        tok.bos_token,
        tok.chat_template,
    )
    assert info["model_max_length"] == MAX_MODEL_LEN and info["vocab_size"] == tok.vocab_size
    eos = httpx.post(
        f"{server.base_url}/tokenize",
        json={"prompt": info["eos_token"], "add_special_tokens": False},
        headers=server.headers(),
    ).json()["tokens"]
    assert eos == [tok.eos_id]


def test_api_key_guards_the_api_but_not_health_metrics_or_page(server):
    for path in ("/v1/models", "/tokenizer_info"):
        assert httpx.get(f"{server.base_url}{path}").status_code == 401
    denied = httpx.post(
        f"{server.base_url}/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer no"}
    )
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(f"{server.base_url}{path}").status_code == 200


def test_chat_page_is_self_contained(server):
    page = httpx.get(f"{server.base_url}/")
    assert page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text
    # nothing is fetched from elsewhere: no external scripts, styles or URLs
    assert "http://" not in page.text and "https://" not in page.text and "src=" not in page.text


def test_metrics_follow_the_traffic(server):
    before = metric_values(server.base_url)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0)
    result = client.completions.create(model=MODEL_ID, prompt="Hello world", max_tokens=5, temperature=0)
    after = metric_values(server.base_url)
    generated = after["lmforge_generation_tokens_total"] - before["lmforge_generation_tokens_total"]
    assert generated == result.usage.completion_tokens
    prompt = after["lmforge_prompt_tokens_total"] - before["lmforge_prompt_tokens_total"]
    assert prompt == result.usage.prompt_tokens
    for name in ("lmforge_time_to_first_token_seconds_count", "lmforge_e2e_request_latency_seconds_count"):
        assert after[name] == before.get(name, 0) + 1
    assert after["lmforge_generation_tokens_per_second"] > 0
    wait_until_idle(server)
    idle = metric_values(server.base_url)
    assert idle["lmforge_kv_blocks_used"] == 0 and idle["lmforge_requests_running"] == 0
    assert idle["lmforge_kv_blocks_free"] == server.engine.block_manager.num_blocks - 1  # block 0 is padding
    for name in ("lmforge_requests_waiting", "lmforge_prefix_cache_hit_rate"):
        assert name in idle


def test_requests_beyond_the_limit_get_429(tokenizer):
    engine = build_engine(tokenizer)
    StepDelay(engine, seconds=0.01)  # the first request runs ~0.8 s: still in flight when the second comes
    with running_server(lambda: engine, max_active_requests=1) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        long_stream = client.completions.create(
            model=MODEL_ID, prompt="Hello", max_tokens=80, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(long_stream))  # the first request is now in flight
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2)
        assert info.value.code == "server_overloaded"
        long_stream.close()
        wait_until_idle(running)
        assert client.completions.create(model=MODEL_ID, prompt="Hello", max_tokens=2).choices


def test_default_max_tokens_fits_the_kv_pool(tokenizer):
    """Without max_tokens a reply may use the rest of the context, but never more than the KV pool holds
    (the engine refuses requests that could not fit)."""
    with running_server(lambda: build_engine(tokenizer, num_blocks=5)) as running:  # 4 usable blocks of 16
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        one = client.chat.completions.create(
            model=MODEL_ID, messages=messages, extra_body={"ignore_eos": True}
        )
        assert one.usage.total_tokens == 64 < MAX_MODEL_LEN
        two = client.chat.completions.create(
            model=MODEL_ID, messages=messages, n=2, extra_body={"ignore_eos": True}
        )
        assert two.usage.prompt_tokens + two.usage.completion_tokens // 2 == 32


def test_a_full_engine_queue_gets_429(tokenizer):
    """One sequence may run and one request may wait: a third request finds the engine's queue full."""
    engine = build_engine(tokenizer, max_num_seqs=1, max_waiting=1)
    StepDelay(engine, seconds=0.01)  # the running request lasts ~0.8 s
    with running_server(lambda: engine) as running:
        client = openai.OpenAI(base_url=f"{running.base_url}/v1", api_key="unused", max_retries=0)
        long = dict(
            model=MODEL_ID, prompt="Hello", max_tokens=80, stream=True, extra_body={"ignore_eos": True}
        )
        running_stream = client.completions.create(**long)
        next(iter(running_stream))  # running
        waiting_stream = client.completions.create(**long)  # accepted into the waiting queue
        assert running.engine.scheduler.waiting
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        assert info.value.code == "server_overloaded"
        running_stream.close()
        waiting_stream.close()
        wait_until_idle(running)


MALFORMED_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"text"',
    b"{}",
    b'{"prompt": null}',
    b'{"prompt": [[]]}',
    b'{"prompt": [1.5]}',
    b'{"prompt": "x", "n": "many"}',
    b'{"prompt": "x", "max_tokens": -1}',
    b'{"prompt": "x", "stop": 3}',
    b'{"prompt": "x", "logit_bias": {"1": "high"}}',
    b'{"prompt": "x", "stream_options": {"include_usage": true}}',
    b'{"messages": []}',
    b'{"messages": [{"content": "no role"}]}',
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": -1, "logprobs": true}',
    b'{"tokens": ["a"]}',
    b'{"tokens": [-1]}',
    b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}]}',
]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
def test_malformed_requests_never_get_a_5xx(server, path):
    headers = {**server.headers(), "Content-Type": "application/json"}
    for body in MALFORMED_BODIES:
        response = httpx.post(f"{server.base_url}{path}", content=body, headers=headers)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
