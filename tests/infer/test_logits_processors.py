"""Batched logits processors against transformers' LogitsProcessor classes, row by row, on random logits."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmforge.infer import logits_processors as lp

VOCAB = 50


def _rows(n: int = 4) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(3)) * 3


def test_repetition_penalty_matches_hf_per_row():
    logits = _rows()
    history = [[1, 2, 2, 7], [3], [4, 5, 6, 7, 8, 9], [0, 49]]
    penalties = [1.3, 0.7, 2.0, 1.1]
    ours = logits.clone()
    lp.apply_repetition_penalty(ours, history, penalties)
    for i in range(4):
        ref = RepetitionPenaltyLogitsProcessor(penalties[i])(
            torch.tensor([history[i]]), logits[i : i + 1].clone()
        )
        torch.testing.assert_close(ours[i], ref[0])


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = _rows(2)
    outputs = [[5, 5, 5, 9], []]
    ours = logits.clone()
    lp.apply_presence_frequency_penalties(ours, outputs, [0.5, 0.5], [0.25, 0.25])
    expected = logits.clone()
    expected[0, 5] -= 3 * 0.25 + 0.5
    expected[0, 9] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_no_repeat_ngram_bans_match_hf(ngram):
    from lmforge.infer.sampling_params import SamplingParams
    from lmforge.infer.sequence import Sequence

    tokens = [1, 2, 3, 1, 2, 4, 1, 2]
    seq = Sequence(tokens[:3], SamplingParams(no_repeat_ngram_size=ngram))
    for t in tokens[3:]:
        seq.append_token(t, None)
    ours = _rows(1)
    ref = NoRepeatNGramLogitsProcessor(ngram)(torch.tensor([tokens]), ours.clone())
    lp.apply_banned_tokens(ours, [seq.banned_ngram_tokens()])
    torch.testing.assert_close(ours, ref)


def test_temperature_top_k_top_p_min_p_match_hf_with_per_row_settings():
    logits = _rows()
    temps, ks, ps, mins = [0.5, 1.0, 1.7, 0.9], [0, 5, 1, 20], [0.9, 1.0, 0.5, 0.3], [0.0, 0.1, 0.05, 0.3]
    ours = lp.apply_temperature(logits, torch.tensor(temps))
    ours = lp.apply_top_k(ours, torch.tensor(ks))
    ours = lp.apply_top_p(ours, torch.tensor(ps))
    ours = lp.apply_min_p(ours, torch.tensor(mins))
    for i in range(4):
        ref = TemperatureLogitsWarper(temps[i])(None, logits[i : i + 1].clone())
        if ks[i]:
            ref = TopKLogitsWarper(ks[i])(None, ref)
        ref = TopPLogitsWarper(ps[i])(None, ref)
        ref = MinPLogitsWarper(mins[i])(None, ref)
        torch.testing.assert_close(ours[i], ref[0])


def test_top_k_keeps_ties_like_hf():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    ours = lp.apply_top_k(logits, torch.tensor([2]))
    torch.testing.assert_close(ours, TopKLogitsWarper(2)(None, logits.clone()))
    assert torch.isfinite(ours).sum() == 3


def test_logit_bias_adds_offsets():
    logits = torch.zeros(2, VOCAB)
    lp.apply_logit_bias(logits, [{3: 5.0, 7: -100.0}, {}])
    assert logits[0, 3] == 5.0 and logits[0, 7] == -100.0 and logits[1].abs().sum() == 0
