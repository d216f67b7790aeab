"""The engine in its own process (``engine_mode="process"``, ``lmforge serve``'s default), end to end.

The engine is built in a spawned process from a ``functools.partial`` of a module-level function; the tests
compare what comes over HTTP with the same engine run in-process, and check aborts, 429, the death of the
engine process (503, then a restarted engine) and that stopping the server leaves no process behind.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.cli import build_parser
from lmforge.infer import SamplingParams
from lmforge.serve.app import create_app
from lmforge.serve.engine_process import _encode, _Rebuilder, _Tracker
from lmforge.tokenizer import Tokenizer
from lmforge.tune.peft.serving import lora_weights
from tests.serve.live_server import (
    MODEL_ID,
    POISON_PROMPT,
    RunningServer,
    build_engine,
    build_faulty_engine,
    metric_values,
    running_server,
    wait_until_idle,
)
from tests.serve.test_lora import PROMPT, make_adapter, offline

STEP_DELAY_S = 0.02  # 80 steps take 1.6 s: a request is reliably still running when a test acts on it


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s} s")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def adapters(tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(root / name, tokenizer, seed) for seed, name in enumerate(["alpha", "beta"])}


@pytest.fixture(scope="module")
def server(tokenizer: Tokenizer, adapters: dict[str, Path]) -> Iterator[RunningServer]:
    """One server for the module (an engine process costs seconds to start): its engine's steps are slowed,
    a poisoned prompt makes a step raise, and it serves the adapter alpha, read in the core process."""
    load = functools.partial(build_faulty_engine, tokenizer, STEP_DELAY_S)
    with running_server(
        load,
        engine_mode="process",
        max_active_requests=3,
        loras={"alpha": str(adapters["alpha"])},
        load_lora=lora_weights,
        allow_lora_loading=True,
    ) as running:
        yield running


def completion(server: RunningServer, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", json={"model": MODEL_ID, **body}, timeout=30)


def test_the_engine_runs_in_a_process_unless_asked_for_a_thread():
    assert build_parser().parse_args(["serve", "m"]).engine_in_thread is False
    assert build_parser().parse_args(["serve", "m", "--engine-in-thread"]).engine_in_thread is True
    with pytest.raises(ValueError, match="engine_mode"):
        create_app(lambda: None, MODEL_ID, engine_mode="fork")


def test_delta_messages_rebuild_the_engines_outputs_exactly(tokenizer):
    """What the core sends (deltas, pickled) turns back into the engine's own RequestOutputs, step by step:
    sampled n=2 with logprobs, beam search, stop strings, prompt logprobs."""
    torch.set_num_threads(1)
    engine = build_engine(tokenizer)
    requests = [
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=2, prompt_logprobs=1),
        SamplingParams(max_tokens=7, temperature=1.0, n=2, seed=3, logprobs=0),
        SamplingParams(max_tokens=6, temperature=0.0, n=2, use_beam_search=True),
        SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop=["e", "o"]),
    ]
    prompt = tokenizer.encode("The quick brown fox")
    trackers, rebuilders = {}, {}
    for index, params in enumerate(requests):
        engine.add_request(f"r{index}", prompt, params)
        trackers[f"r{index}"], rebuilders[f"r{index}"] = _Tracker(), _Rebuilder(prompt)
    finished, sent = set(), 0
    while engine.has_unfinished():
        for output in engine.step():
            delta = pickle.loads(pickle.dumps(_encode(output, trackers[output.request_id])))
            assert rebuilders[output.request_id].update(delta) == output
            sent += 1
            if output.finished:
                finished.add(output.request_id)
    assert finished == set(trackers) and sent > len(trackers)


@pytest.mark.multiprocess
def test_completions_over_http_equal_the_engine_in_process(server, tokenizer):
    prompt = tokenizer.encode("Hello world")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    expected = build_engine(tokenizer).generate([prompt], params)[0].outputs[0]
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 2}
    response = completion(server, **body, return_tokens_as_token_ids=True)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]] == expected.token_ids
    assert choice["logprobs"]["token_logprobs"] == pytest.approx([lp.logprob for lp in expected.logprobs])
    plain = completion(server, **body).json()["choices"][0]
    assert plain["text"] == expected.text


@pytest.mark.multiprocess
def test_streaming_and_chat_through_the_engine_process(server, tokenizer):
    body = {"prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json={"model": MODEL_ID, **body}
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1])
    whole = completion(server, **{**body, "stream": False}).json()
    assert text == whole["choices"][0]["text"] and whole["usage"]["completion_tokens"] == 10
    chat = httpx.post(
        f"{server.base_url}/v1/chat/completions",
        json={"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
        timeout=30,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    bad = completion(server, prompt="Hello", max_tokens=2, top_p=0)  # refused by the engine's checks: a 400
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"


@pytest.mark.multiprocess
def test_disconnect_aborts_in_the_engine_process_and_429_beyond_the_limit(server):
    before = metric_values(server.base_url)
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 80, "ignore_eos": True, "stream": True}

    async def main() -> int:
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=30) as client,
            AsyncExitStack() as stack,
        ):

            async def open_stream() -> AsyncIterator[str]:
                response = await stack.enter_async_context(
                    client.stream("POST", "/v1/completions", json=body)
                )
                assert response.status_code == 200
                lines = response.aiter_lines()  # kept: a dropped line iterator closes the response
                await anext(lines)  # running in the engine process now
                return lines

            readers = await asyncio.gather(*(open_stream() for _ in range(3)))
            assert server.state.engine.num_active == len(readers) == 3
            busy = await client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert busy.json()["error"]["code"] == "server_overloaded"
            return busy.status_code  # leaving the stack closes the three streams mid-way

    assert asyncio.run(main()) == 429
    wait_until_idle(server)  # the core freed every KV block of the three aborted requests
    after = metric_values(server.base_url)
    assert after["lmforge_requests_aborted_total"] - before["lmforge_requests_aborted_total"] == 3
    assert after["lmforge_kv_blocks_used"] == 0
    assert completion(server, prompt="Hello", max_tokens=2).status_code == 200


@pytest.mark.multiprocess
def test_a_failing_engine_step_fails_its_requests_with_500_and_the_core_serves_on(server):
    """Fault injection inside the engine process: the step raises; its request gets the error, the core
    lives on (no restart) and serves the next request."""
    pid = server.state.engine.pid
    failed = completion(server, prompt=POISON_PROMPT, max_tokens=4)
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert error["code"] == "engine_error" and "injected fault" in error["message"]
    wait_until_idle(server)
    again = completion(server, prompt="Hello", max_tokens=4, ignore_eos=True)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 4
    assert server.state.engine.pid == pid and server.state.engine.restarts == 0


@pytest.mark.multiprocess
def test_a_killed_engine_process_fails_its_requests_with_503_and_is_restarted_with_its_adapters(
    server, tokenizer, adapters
):
    """(Last of the module's server tests: it changes the served adapters.)"""
    url, engine = server.base_url, server.state.engine
    assert complete_with(url, "alpha") == offline(tokenizer, adapters["alpha"])  # read by the core process
    # adapters change at run time: beta is sent to the core, alpha unloaded there
    beta = str(adapters["beta"])
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": beta}).is_success
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}).status_code == 200
    first_pid = engine.pid
    body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 80, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # running in the engine process
        os.kill(first_pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "engine_unavailable" and "SIGKILL" in error["message"], error
    wait_for(lambda: httpx.get(f"{url}/health").status_code == 200, 60, "the restart")
    assert engine.restarts == 1 and engine.pid != first_pid and not alive(first_pid)
    # the new core serves what the old one served at its death: beta, not alpha
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == [MODEL_ID, "beta"]
    assert complete_with(url, "beta") == offline(tokenizer, adapters["beta"])
    assert "lmforge_requests_running" in metric_values(url)


def complete_with(url: str, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.multiprocess
def test_the_engine_process_is_built_with_lmforge_serves_arguments_and_prompt_adapter(tmp_path, tokenizer):
    """``lmforge serve``'s engine construction (config, dtype, prompt adapter) reaches the engine process."""
    from lmforge.infer import EngineConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.serve.commands import load_served_engine
    from lmforge.tune.peft import PeftConfig, apply_peft, save_adapter

    base = build_engine(tokenizer).model
    save_pretrained(base, tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    adapted = apply_peft(
        build_engine(tokenizer).model, PeftConfig(method="prompt_tuning", num_virtual_tokens=4)
    )
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    adapter = save_adapter(adapted, tmp_path / "adapter", None)
    config = EngineConfig(block_size=8, num_blocks=64, max_num_seqs=4)
    load = functools.partial(load_served_engine, tmp_path / "base", config, "float32", "cpu", str(adapter), 1)
    prompt = tokenizer.encode("Hello world")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = load().generate([prompt], params)[0].outputs[0].token_ids  # the same construction, in-process
    plain = build_engine(tokenizer).generate([prompt], params)[0].outputs[0].token_ids
    assert expected != plain  # the adapter matters
    with running_server(load, engine_mode="process") as running:
        assert running.state.engine.kv_capacity_tokens == 63 * 8  # the config reached the core
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 0}
        response = completion(running, **body, return_tokens_as_token_ids=True)
        assert response.status_code == 200, response.text
        tokens = response.json()["choices"][0]["logprobs"]["tokens"]
        assert [int(t.removeprefix("token_id:")) for t in tokens] == expected


@pytest.mark.multiprocess
def test_lmforge_serve_runs_the_engine_in_a_process_and_sigterm_leaves_none(tmp_path, tokenizer):
    from lmforge.model.hf import save_pretrained

    folder = tmp_path / "tiny"
    save_pretrained(build_engine(tokenizer).model, folder)
    tokenizer.save(folder)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path("src").resolve()), *sys.path])}
    command = [sys.executable, "-m", "lmforge.cli", "serve", str(folder), "--port", str(port),
               "--threads", "1", "--kv-cache-mb", "4", "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert process.poll() is None, "lmforge serve exited"
            try:
                return httpx.get(f"{base_url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, 60, "lmforge serve becoming healthy")
        children = _children(process.pid)  # the engine core and multiprocessing's resource tracker
        cores = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(cores) == 1, children
        response = httpx.post(
            f"{base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "ignore_eos": True}
        )
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        wait_for(lambda: not any(alive(pid) for pid in children), 10, "the children exiting")
    finally:
        if process.poll() is None:
            process.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
