"""Session-wide servers for the serve tests (see ``live_server``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from lmforge.tokenizer import Tokenizer
from tests.serve.live_server import API_KEY, RunningServer, build_engine, running_server, train_test_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_test_tokenizer()


@pytest.fixture(scope="session")
def server(tokenizer: Tokenizer) -> Iterator[RunningServer]:
    """The shared server (with an API key, so every client test also exercises authentication)."""
    torch.set_num_threads(1)
    with running_server(lambda: build_engine(tokenizer), api_key=API_KEY) as running:
        yield running
