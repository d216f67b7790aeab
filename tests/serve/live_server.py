"""A tiny random model + a tiny trained tokenizer behind a real uvicorn server on 127.0.0.1 (free port)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from lmforge.infer import EngineConfig, LLMEngine
from lmforge.model import ModelConfig, Transformer
from lmforge.serve.app import ServerState, create_app
from lmforge.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

MODEL_ID = "tiny-test-model"
API_KEY = "sk-test-key"
MAX_MODEL_LEN = 96
# "日" (3 bytes in UTF-8) never occurs in the training text, so it stays three byte-level tokens.
SPLIT_CHARACTER = "日"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "Le café est très bon à Paris, où il fait beau.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein.",
    "Hello world! How are you today? I am fine, thank you.",
    "Streaming servers send tokens one by one to their clients.",
]


def build_engine(
    tokenizer: Tokenizer, max_model_len: int = MAX_MODEL_LEN, **engine_overrides: int
) -> LLMEngine:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        max_seq_len=max_model_len,
    )
    config = EngineConfig(**{"block_size": 16, "num_blocks": 256, "max_num_seqs": 64, **engine_overrides})
    return LLMEngine(Transformer(cfg), tokenizer, config)


class StepDelay:
    """Slows an engine's steps by ``seconds`` each (a stand-in for a big model), so that a request is
    reliably still running when a test acts on it, however fast the machine."""

    def __init__(self, engine: LLMEngine, seconds: float = 0.0) -> None:
        self.seconds = seconds
        step = engine.step

        def slow_step():
            time.sleep(self.seconds)
            return step()

        engine.step = slow_step


@dataclass
class RunningServer:
    base_url: str
    state: ServerState
    api_key: str | None

    @property
    def engine(self) -> LLMEngine:
        assert self.state.engine is not None
        return self.state.engine.engine

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@contextmanager
def running_server(
    load_engine: Callable[[], LLMEngine], api_key: str | None = None, wait_healthy: bool = True, **app_kwargs
) -> Iterator[RunningServer]:
    """Serve the app with uvicorn in a thread on a socket bound to a free port; wait until /health is 200
    (or, with ``wait_healthy=False``, only until the server answers)."""
    app = create_app(load_engine, MODEL_ID, api_key=api_key, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                health = httpx.get(f"{base_url}/health", timeout=2)
                if health.status_code == 200 or not wait_healthy:
                    break
                if health.json()["error"]["code"] == "model_load_failed":
                    raise RuntimeError(health.json()["error"]["message"])
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the test server did not become healthy in 30 s")
            time.sleep(0.05)
        yield RunningServer(base_url, app.state.server, api_key)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until_idle(running: RunningServer, timeout_s: float = 10.0) -> None:
    """Wait until the engine holds no request and no KV block (aborts land at the engine's next step)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = running.state.engine_stats()
        engine = running.state.engine
        idle = stats is not None and (stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0)
        if idle and engine is not None and engine.num_active == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"engine still busy after {timeout_s} s: {running.state.engine_stats()}")


def train_test_tokenizer() -> Tokenizer:
    return train_tokenizer(
        SENTENCES * 4, TokenizerTrainConfig(kind="byte_bpe", vocab_size=400, min_frequency=1)
    )


def metric_values(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def build_slow_engine(tokenizer: Tokenizer, step_delay_s: float, **engine_overrides: int) -> LLMEngine:
    """``build_engine`` with every step slowed by ``step_delay_s`` (a module-level function, so that
    ``functools.partial`` of it can be sent to an engine process)."""
    engine = build_engine(tokenizer, **engine_overrides)
    StepDelay(engine, step_delay_s)
    return engine


POISON_PROMPT = [7, 7, 7, 7, 7]  # a prompt that makes the next engine step of build_faulty_engine raise


def build_faulty_engine(tokenizer: Tokenizer, step_delay_s: float) -> LLMEngine:
    """``build_slow_engine`` whose step raises "injected fault" while a request with ``POISON_PROMPT`` is
    scheduled (fault injection that survives being sent to an engine process)."""
    engine = build_slow_engine(tokenizer, step_delay_s)
    step = engine.step

    def faulty_step():
        groups = (*engine.scheduler.waiting, *engine.scheduler.running)
        if any(list(g.prompt_token_ids) == POISON_PROMPT and not g.aborted for g in groups):
            raise RuntimeError("injected fault")
        return step()

    engine.step = faulty_step
    return engine
