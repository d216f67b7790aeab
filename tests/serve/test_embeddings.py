"""/v1/embeddings: OpenAI's shape, the embedding model's own vectors, one bad input fails only its request."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.serve.embeddings import EmbeddingService
from lmforge.tune.embed import EmbeddingModel, encode, load_embedding_model, save_embedding_model
from tests.serve.live_server import MODEL_ID, build_engine, running_server

TEXTS = ["The quick brown fox.", "A journey of a thousand miles.", "Hello world!"]


@pytest.fixture(scope="module")
def embedder(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    folder = tmp_path_factory.mktemp("embedder")
    save_embedding_model(EmbeddingModel(Transformer(cfg), pooling="last"), tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def embedding_server(tokenizer, embedder):
    with running_server(lambda: build_engine(tokenizer), embeddings=EmbeddingService(embedder)) as running:
        yield running


def test_the_openai_client_gets_the_models_normalised_vectors(embedding_server, embedder, tokenizer):
    client = openai.OpenAI(base_url=f"{embedding_server.base_url}/v1", api_key="none")
    result = client.embeddings.create(model=MODEL_ID, input=TEXTS)
    got = torch.tensor([item.embedding for item in result.data])
    expected = encode(load_embedding_model(embedder), tokenizer, TEXTS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = sum(len(tokenizer.encode(t)) + 1 for t in TEXTS)  # last-token pooling appends EOS
    assert result.usage.prompt_tokens == tokens == result.usage.total_tokens
    one = client.embeddings.create(model=MODEL_ID, input=TEXTS[0], encoding_format="base64")
    raw = one.data[0].embedding
    vector = raw if isinstance(raw, list) else np.frombuffer(base64.b64decode(raw), dtype="<f4").tolist()
    assert vector == pytest.approx(got[0].tolist(), abs=1e-6)
    ids = tokenizer.encode(TEXTS[1])
    by_ids = client.embeddings.create(model=MODEL_ID, input=[ids])
    assert by_ids.data[0].embedding == pytest.approx(got[1].tolist(), abs=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"input": []}, 400, "at least one"),
        ({"input": ["ok", ""]}, 400, "input[1]: empty"),
        ({"input": "word " * 200}, 400, "at most 64"),
        ({"input": [[5, 10**6]]}, 400, "token ids must be <"),
        ({"input": "x", "dimensions": 7}, 400, "have 32"),
        ({"input": "x", "model": "other"}, 404, "does not exist"),
    ],
)
def test_bad_inputs_are_refused_with_the_reason(embedding_server, body, status, message):
    reply = httpx.post(f"{embedding_server.base_url}/v1/embeddings", json=body, timeout=30)
    assert reply.status_code == status and message in reply.json()["error"]["message"]
    ok = httpx.post(f"{embedding_server.base_url}/v1/embeddings", json={"input": "fine"}, timeout=30)
    assert ok.status_code == 200  # the server goes on


def test_a_server_without_an_embedding_model_says_so(server):
    reply = httpx.post(
        f"{server.base_url}/v1/embeddings", json={"input": "x"}, headers=server.headers(), timeout=30
    )
    assert reply.status_code == 404 and "does not serve embeddings" in reply.json()["error"]["message"]


def test_an_adapter_name_or_a_folder_that_cannot_embed_is_refused(tokenizer, tmp_path):
    with running_server(lambda: build_engine(tokenizer), embeddings=EmbeddingService(tmp_path)) as running:
        reply = httpx.post(f"{running.base_url}/v1/embeddings", json={"input": "x"}, timeout=30)
        assert reply.status_code == 503 and "embeddings are unavailable" in reply.json()["error"]["message"]
        health = httpx.get(f"{running.base_url}/health", timeout=30)
        assert health.status_code == 200  # the server goes on
