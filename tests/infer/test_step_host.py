"""The host-side shortcuts of an engine step: the blocked greedy argmax, logits kept as (block, row) and gathered
once per forward, and the scheduler's running token count. Each must give exactly what the plain version does."""

import random

import pytest
import torch

from lmforge.infer.block_manager import BlockManager
from lmforge.infer.model_runner import ChunkLogits, stack_last
from lmforge.infer.sampler import ARGMAX_BLOCK, greedy_argmax
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.scheduler import Scheduler
from lmforge.infer.sequence import SequenceGroup


@pytest.mark.parametrize("rows,vocab", [(64, 8192), (5, 4 * ARGMAX_BLOCK), (3, 8192), (8, 1000)])
def test_greedy_argmax_is_argmax(rows: int, vocab: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab)
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))


def test_greedy_argmax_ties_nan_and_inf_rows_match_argmax() -> None:
    logits = torch.randn(6, 8192)
    logits[0, [9000 % 8192, 7000, 100, 129]] = 50.0  # ties across and inside slices: the first one wins
    logits[1, [300, 5000]] = float("nan")  # NaN counts as the maximum, the first NaN wins
    logits[2] = 1.0  # all equal
    logits[3] = float("-inf")
    logits[4, -1] = 1e9  # the last position
    logits[5, 127:129] = 77.0  # a tie straddling a slice boundary
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    wide = torch.randn(8, 2 * 8192)[:, ::2]  # not contiguous: the plain argmax
    assert torch.equal(greedy_argmax(wide), wide.argmax(dim=-1))


def test_stack_last_gathers_rows_of_several_forwards_in_order() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(5, 16), torch.randn(3, 16)
    chunks = [ChunkLogits(block=a, row=4), ChunkLogits(block=b, row=0), ChunkLogits(block=a, row=1)]
    chunks += [ChunkLogits(block=b, row=2), ChunkLogits(block=a, row=4)]  # a row twice (n > 1 forks)
    assert torch.equal(stack_last(chunks), torch.stack([c.last for c in chunks]))
    whole = [ChunkLogits(block=b, row=i) for i in range(3)]
    assert stack_last(whole) is b  # every row in order: the block itself, no copy
    assert torch.equal(stack_last(whole[::-1]), b.flip(0))
    two = [ChunkLogits(block=a, row=i) for i in range(5)] + whole  # two forwards, each whole and in order
    assert torch.equal(stack_last(two), torch.cat([a, b]))
    assert torch.equal(stack_last(two[:3] + whole), torch.cat([a[:3], b]))


def test_scheduler_fills_the_budget_exactly_when_it_chunks_under_preemption() -> None:
    """Random traffic on a small pool (preemptions happen): a plan never exceeds the token budget, and a
    prefill chunk cut short by the budget leaves none of it unused (the running count stays exact)."""
    rng = random.Random(0)
    budget = 24
    scheduler = Scheduler(BlockManager(40, 4), max_num_seqs=8, max_num_batched_tokens=budget)
    for i in range(30):
        prompt = [rng.randrange(1, 50) for _ in range(rng.randint(1, 40))]
        scheduler.add(SequenceGroup(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 12))))
    chunked_plans = 0
    for _ in range(400):
        if not scheduler.has_work():
            break
        plan = scheduler.schedule()
        assert plan.num_tokens <= budget
        if any(0 < it.num_tokens < it.seq.num_uncomputed for it in plan.scheduled):
            assert plan.num_tokens == budget
            chunked_plans += 1
        for item in plan.scheduled:
            completes = item.completes
            item.seq.num_computed += item.num_tokens
            scheduler.block_manager.register_computed(item.seq)
            if completes:
                group = next(g for g in scheduler.running if item.seq in g.seqs)
                scheduler.append_token(group, item.seq, 7, None)
    assert not scheduler.has_work()
    assert chunked_plans > 0 and scheduler.num_preemptions > 0
