import pytest
import torch

from lmforge.infer import SamplingParams
from lmforge.infer.speculative import speculative_generate, verify
from lmforge.model import ModelConfig, Transformer

from .helpers import random_prompts, reference_greedy


def _model(seed: int, layers: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        ModelConfig(vocab_size=97, d_model=32, n_layers=layers, n_heads=2, max_seq_len=128)
    ).eval()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_target_greedy(k):
    target, draft = _model(0, 2), _model(1, 1)
    prompt = random_prompts([9])[0]
    params = SamplingParams(max_tokens=20, temperature=0.0)
    result = speculative_generate(target, draft, prompt, params, num_draft_tokens=k)
    assert result.token_ids == reference_greedy(target, prompt, 20)
    assert result.finish_reason == "length" and result.proposed > 0


def test_identical_draft_accepts_everything():
    target = _model(0, 2)
    params = SamplingParams(max_tokens=15, temperature=0.8, seed=3)
    result = speculative_generate(target, target, random_prompts([5])[0], params, num_draft_tokens=4)
    assert result.acceptance_rate == 1.0 and len(result.token_ids) == 15


@pytest.mark.parametrize("k", [1, 3])
def test_acceptance_rule_preserves_the_target_distribution(k):
    """Chi-square test: the first emitted token must follow p_1 exactly, whatever q is."""
    vocab, trials = 6, 5000
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(k + 1, vocab, generator=g) * 1.5, dim=-1)
    q = torch.softmax(torch.randn(k, vocab, generator=g) * 1.5, dim=-1)
    counts = torch.zeros(vocab)
    for _ in range(trials):
        drafted = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        out, _ = verify(p, q, drafted, g)
        counts[out[0]] += 1
    expected = p[0] * trials
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # 99.9% quantile of chi-square with 5 degrees of freedom
    # and the draft alone would have been caught: its distribution is far from p_1
    draft_chi2 = float(((q[0] * trials - expected) ** 2 / expected).sum())
    assert draft_chi2 > 100


def test_stop_tokens_end_generation():
    target, draft = _model(0, 2), _model(1, 1)
    prompt = random_prompts([9])[0]
    free = reference_greedy(target, prompt, 12)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    result = speculative_generate(target, draft, prompt, params, eos_token_ids=[free[4]])
    assert result.token_ids == free[: free.index(free[4]) + 1] and result.finish_reason == "stop"


def decode(ids: list[int]) -> str:
    """A toy decoder: token i is the letter 'a' + i % 26 (no tokenizer needed)."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_end_generation_where_the_engine_would():
    target, draft = _model(0, 2), _model(1, 1)
    prompt = random_prompts([9])[0]
    free = reference_greedy(target, prompt, 12)
    stop = decode(free[5:7])  # completed by the 7th token
    params = SamplingParams(max_tokens=12, temperature=0.0, stop=[stop])
    result = speculative_generate(target, draft, prompt, params, decode=decode)
    first = decode(free).index(stop)
    assert result.finish_reason == "stop" and result.stop_reason == stop
    assert result.text == decode(free)[:first]  # cut before the stop string
    assert decode(result.token_ids).endswith(stop) and len(result.token_ids) <= 7
    with pytest.raises(ValueError, match="decoder"):
        speculative_generate(target, draft, prompt, params)
