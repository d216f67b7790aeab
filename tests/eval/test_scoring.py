import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lmforge.eval.scoring import (
    LoglikelihoodRequest,
    continuation_logprobs,
    document_windows,
    language_modeling_score,
    sequence_logprobs,
    shards_language_modeling_score,
    split_request,
)
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer


class BigramModel(nn.Module):
    """Logits of the next token depend on the current token only: log-probs are read off a table."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))
        self.cfg = SimpleNamespace(max_seq_len=64)

    def forward(self, input_ids, position_ids=None, segment_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])

    def logprob(self, prev: int, nxt: int) -> float:
        return float(torch.log_softmax(self.table[prev].detach(), -1)[nxt])


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Question: what is the sky? Answer: blue. The grass is green and the sun is yellow."] * 20
    return train_tokenizer(texts, TokenizerTrainConfig(vocab_size=300, add_bos_token=False))


def test_sequence_logprobs_match_hand_computation_and_ignore_batching():
    model = BigramModel(10)
    sequences = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 1, 2, 3]]
    batched = sequence_logprobs(model, sequences, pad_id=0, batch_size=3)
    single = [sequence_logprobs(model, [s], batch_size=1)[0] for s in sequences]
    for seq, got, alone in zip(sequences, batched, single):
        expected = [model.logprob(a, b) for a, b in itertools.pairwise(seq)]
        assert got.tolist() == pytest.approx(expected, abs=1e-5)
        assert torch.allclose(got, alone)


def test_split_request_moves_trailing_space_to_continuation(tokenizer):
    context_ids, continuation_ids, text = split_request(tokenizer, LoglikelihoodRequest("Answer: ", "blue"))
    assert text == " blue"
    assert context_ids == tokenizer.encode("Answer:")
    assert context_ids + continuation_ids == tokenizer.encode("Answer: blue")


def test_continuation_logprobs_sum_continuation_tokens_only(tokenizer):
    model = BigramModel(tokenizer.vocab_size, seed=1)
    requests = [
        LoglikelihoodRequest("Question: what is the sky? Answer:", c) for c in (" blue", " green sun")
    ]
    scores = continuation_logprobs(model, tokenizer, requests, batch_size=2)
    for request, score in zip(requests, scores):
        context = tokenizer.encode(request.context)
        whole = tokenizer.encode(request.context + request.continuation)
        expected = sum(model.logprob(whole[t - 1], whole[t]) for t in range(len(context), len(whole)))
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.n_tokens == len(whole) - len(context)
        assert score.text == request.continuation


def test_document_windows_predict_each_token_once():
    tokens = list(range(11))
    windows = document_windows(tokens, seq_len=4)
    assert windows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10]]
    assert sum(len(w) - 1 for w in windows) == len(tokens) - 1


def test_uniform_model_gives_vocab_perplexity_and_formula_bits_per_byte(tokenizer):
    model = BigramModel(tokenizer.vocab_size)
    with torch.no_grad():
        model.table.zero_()  # uniform next-token distribution
    texts = ["the sky is blue", "grass is green and the sun is yellow"]
    score = language_modeling_score(model, tokenizer, texts, seq_len=5, batch_size=2)
    n_tokens = sum(len(tokenizer.encode(t)) for t in texts)  # every token follows an EOS or a token
    n_bytes = sum(len(t.encode()) for t in texts)
    assert score.n_tokens == n_tokens and score.n_bytes == n_bytes
    assert score.perplexity == pytest.approx(tokenizer.vocab_size, rel=1e-5)
    assert score.bits_per_byte == pytest.approx(
        n_tokens * math.log2(tokenizer.vocab_size) / n_bytes, rel=1e-5
    )


def test_shards_score_uniform_model_and_token_accounting(tmp_path, tokenizer):
    import json

    from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards

    texts = ["the sky is blue", "grass is green and the sun is yellow", "what is the sky? blue"] * 4
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    tokenizer.save(tmp_path / "tok")
    manifest = tokenize_to_shards(
        TokenizeConfig(inputs=[str(docs)], tokenizer=str(tmp_path / "tok"), output=str(tmp_path / "shards")),
        progress=False,
    )
    model = BigramModel(tokenizer.vocab_size)
    with torch.no_grad():
        model.table.zero_()
    score = shards_language_modeling_score(
        model, tokenizer, [str(tmp_path / "shards")], seq_len=8, batch_size=2
    )
    total = manifest["totals"]["tokens"]
    # One pass predicts every token once except the tail that does not fill a sequence.
    assert total - 9 <= score.n_tokens <= total
    assert score.perplexity == pytest.approx(tokenizer.vocab_size, rel=1e-5)
    text_bytes = sum(len(t.encode()) for t in texts)
    assert text_bytes - 8 * 4 <= score.n_bytes <= text_bytes
    held = shards_language_modeling_score(
        model, tokenizer, [str(tmp_path / "shards")], seq_len=8, batch_size=2, val_fraction=0.25
    )
    assert 0 < held.n_tokens < score.n_tokens / 2
