"""lm-evaluation-harness's ``local-completions`` model against the server, with its remote tokenizer.

This is how a model served by lmforge is evaluated by lm-eval: it tokenizes through /tokenizer_info and
/tokenize, scores continuations through /v1/completions with echo + logprobs, and generates with stops.
The scores must equal log-probabilities computed from the model directly.
"""

from __future__ import annotations

import openai
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.openai_completions import LocalCompletionsAPI

from tests.serve.live_server import API_KEY, MAX_MODEL_LEN, MODEL_ID, RunningServer

PAIRS = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Le café est", " très bon"),
    ("Hello world! How are", " you today?"),
]


@pytest.fixture
def lm(server: RunningServer, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # local-completions sends it as the bearer token
    return LocalCompletionsAPI(
        base_url=f"{server.base_url}/v1/completions",
        model=MODEL_ID,
        tokenizer_backend="remote",
        auth_token=API_KEY,
        max_length=MAX_MODEL_LEN,
        batch_size=2,
        max_retries=1,
    )


def reference_score(server: RunningServer, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's (sum of continuation logprobs, is greedy), from one forward of the model itself."""
    tok, model = server.engine.tokenizer, server.engine.model
    context_ids = tok.encode(context)
    whole = tok.encode(context + continuation)
    continuation_ids = whole[len(context_ids) :]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    rows = logprobs[len(context_ids) - 1 : len(whole) - 1]
    chosen = rows.gather(1, torch.tensor(continuation_ids)[:, None])[:, 0]
    return float(chosen.sum()), bool((rows.argmax(dim=1) == torch.tensor(continuation_ids)).all())


def test_loglikelihood_matches_the_model(lm, server):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    scores = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(PAIRS, scores):
        expected_logprob, expected_greedy = reference_score(server, context, continuation)
        assert logprob == pytest.approx(expected_logprob, abs=1e-3)
        assert greedy == expected_greedy


def test_generate_until_stops_like_the_completions_api(lm, server):
    contexts = ["The quick brown fox", "Hello world!"]
    requests = [
        Instance("generate_until", {}, (context, {"until": ["\n\n"], "max_gen_toks": 6, "temperature": 0}), i)
        for i, context in enumerate(contexts)
    ]
    outputs = lm.generate_until(requests, disable_tqdm=True)
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)
    for context, output in zip(contexts, outputs):
        prompt = server.engine.tokenizer.encode(context)  # lm-eval sends token ids, without BOS
        expected = client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, stop=["\n\n"]
        )
        assert output == expected.choices[0].text
