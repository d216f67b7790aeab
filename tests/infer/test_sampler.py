import pytest
import torch

from lmforge.infer.sampler import Sampler
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.sequence import Sequence

VOCAB = 8


def _seqs(params: list[SamplingParams]) -> list[Sequence]:
    return [Sequence([1, 2, 3], p) for p in params]


def test_sampling_follows_the_tempered_distribution():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)) * 2
    params = SamplingParams(temperature=0.7)
    sampler, trials = Sampler(seed=0), 4000
    rows = logits.expand(trials, -1)
    tokens, _ = sampler(rows, _seqs([params] * trials))
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float()
    expected = torch.softmax(logits[0] / 0.7, dim=-1) * trials
    keep = expected > 5
    chi2 = float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    assert chi2 < 24.3  # 99.9% quantile, 7 degrees of freedom


def test_greedy_and_top_k_1_pick_the_argmax():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(2))
    greedy, _ = Sampler()(logits, _seqs([SamplingParams(temperature=0.0)] * 3))
    top1, _ = Sampler()(logits, _seqs([SamplingParams(temperature=1.5, top_k=1)] * 3))
    assert greedy == top1 == logits.argmax(dim=-1).tolist()


def test_seeded_rows_do_not_depend_on_their_batch():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3))
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler()(logits[1:2], _seqs([seeded]))[0][0]
    other = SamplingParams(temperature=1.0)
    batch = [Sampler(seed=s)(logits, _seqs([other, seeded, other, other]))[0][1] for s in range(3)]
    assert batch == [alone] * 3  # three different shared-generator seeds, one answer for the seeded row


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_the_raw_model_distribution(k):
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=0.0, logprobs=k, repetition_penalty=2.0)
    tokens, infos = Sampler()(logits, _seqs([params] * 2))
    reference = torch.log_softmax(logits, dim=-1)
    for row, (token, info) in enumerate(zip(tokens, infos)):
        assert info.token_id == token and info.logprob == pytest.approx(float(reference[row, token]))
        assert [t for t, _ in info.top] == reference[row].topk(k).indices.tolist()
