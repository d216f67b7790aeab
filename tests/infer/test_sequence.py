"""Sequence state: tokens and log-probabilities, n-gram bans, forks that share history but not state."""

from __future__ import annotations

import torch

from lmforge.infer.outputs import TokenLogprob
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.sequence import Sequence, SequenceGroup


def test_appending_tracks_outputs_and_the_cumulative_logprob() -> None:
    seq = Sequence([5, 6, 7], SamplingParams(logprobs=0))
    seq.append_token(8, TokenLogprob(8, -0.5))
    seq.append_token(9, TokenLogprob(9, -1.25))
    assert seq.num_tokens == 5 and seq.output_token_ids == [8, 9] and seq.num_output_tokens == 2
    assert seq.cumulative_logprob == -1.75 and [lp.token_id for lp in seq.logprobs] == [8, 9]
    assert seq.num_uncomputed == 5  # nothing is in the cache yet
    seq.num_computed = 4
    assert seq.num_uncomputed == 1


def test_banned_tokens_are_those_that_would_repeat_an_ngram() -> None:
    # n = 3 over 1 2 3 1 2: the prefix (1, 2) was followed by 3, so 3 is banned next
    seq = Sequence([1, 2, 3, 1], SamplingParams(no_repeat_ngram_size=3))
    seq.append_token(2, None)
    assert seq.banned_ngram_tokens() == {3}
    seq.append_token(4, None)  # (2, 4): never seen, nothing banned
    assert seq.banned_ngram_tokens() == set()
    assert Sequence([1, 1, 1], SamplingParams()).banned_ngram_tokens() == set()  # off by default


def test_a_fork_shares_history_but_not_state_and_reseeds_per_index() -> None:
    parent = Sequence([1, 2], SamplingParams(seed=7, logprobs=1, no_repeat_ngram_size=2))
    parent.append_token(3, TokenLogprob(3, -1.0))
    parent.block_table = [4]
    child = parent.fork(1)
    assert child.seq_id != parent.seq_id and child.index == 1
    assert child.token_ids == parent.token_ids and child.block_table == [4]
    child.append_token(9, TokenLogprob(9, -2.0))
    child.block_table.append(5)
    assert parent.token_ids == [1, 2, 3] and parent.block_table == [4] and len(parent.logprobs) == 1
    assert child.ngrams[(3,)] == {9} and (3,) not in parent.ngrams  # the n-gram index was copied, not shared
    # completion i of a seeded request draws from seed + 1_000_003 * i, whoever forked it
    expected = torch.Generator().manual_seed(7 + 1_000_003)
    assert torch.rand(1, generator=child.generator).item() == torch.rand(1, generator=expected).item()


def test_a_group_expands_after_prefill_only_when_sampling_several() -> None:
    assert SequenceGroup("a", [1], SamplingParams(n=3)).expands_after_prefill
    assert not SequenceGroup("b", [1], SamplingParams(n=1)).expands_after_prefill
    beam = SequenceGroup("c", [1], SamplingParams(n=2, use_beam_search=True, best_of=4))
    assert not beam.expands_after_prefill and beam.max_seqs == 4
    group = SequenceGroup("d", [1, 2], SamplingParams(n=2))
    assert not group.is_finished
    group.seqs[0].finish("length")
    assert group.is_finished and group.seqs[0].finish_reason == "length" and not group.live_seqs
