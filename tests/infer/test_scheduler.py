"""The scheduler alone, driven by a fake model runner that 'computes' whatever it is given."""

import pytest

from lmforge.infer.block_manager import BlockManager
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.scheduler import QueueFullError, Scheduler, SchedulerOutput
from lmforge.infer.sequence import SequenceGroup, SequenceStatus


def _group(request_id: str, prompt_len: int, max_tokens: int = 8) -> SequenceGroup:
    return SequenceGroup(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def _run(scheduler: Scheduler, plan: SchedulerOutput) -> None:
    """Fake runner: mark the chunks computed; a completed chunk samples token 0; finished requests leave."""
    for item in plan.scheduled:
        completes = item.completes
        item.seq.num_computed += item.num_tokens
        scheduler.block_manager.register_computed(item.seq)
        if completes:
            item.seq.append_token(0, None)
    for group in list(scheduler.running):
        seq = group.seqs[0]
        if seq.num_output_tokens >= group.params.max_tokens:
            seq.finish("length")
            scheduler.finish(group)


def test_budget_decodes_first_then_chunked_prefill():
    scheduler = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=16)
    scheduler.add(_group("a", 6))
    scheduler.add(_group("b", 30))
    plan = scheduler.schedule()
    assert [(i.seq.prompt_len, i.num_tokens) for i in plan.scheduled] == [(6, 6), (30, 10)]
    assert plan.num_tokens == 16
    _run(scheduler, plan)
    plan = scheduler.schedule()  # a decodes (1 token) before b's next chunk (15 tokens)
    assert [i.num_tokens for i in plan.scheduled] == [1, 15] and plan.scheduled[0].seq.prompt_len == 6
    _run(scheduler, plan)
    scheduler.add(_group("c", 3))  # joins at the next step, after the running ones
    plan = scheduler.schedule()
    assert [(i.seq.prompt_len, i.num_tokens) for i in plan.scheduled] == [(6, 1), (30, 5), (3, 3)]


def test_decodes_go_before_unfinished_prefills_whatever_the_admission_order():
    scheduler = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=16)
    scheduler.add(_group("short", 4))
    scheduler.add(_group("long", 40))
    _run(scheduler, scheduler.schedule())  # short: whole prompt, now decoding; long: first 12 tokens
    scheduler.running.reverse()  # as if the long prefill had been admitted first
    plan = scheduler.schedule()
    assert [(i.seq.prompt_len, i.num_tokens) for i in plan.scheduled] == [(4, 1), (40, 15)]


def test_finished_requests_leave_and_free_their_blocks():
    scheduler = Scheduler(BlockManager(50, 4), max_num_seqs=4, max_num_batched_tokens=64)
    scheduler.add(_group("a", 5, max_tokens=1))
    scheduler.add(_group("b", 5, max_tokens=3))
    _run(scheduler, scheduler.schedule())
    assert [g.request_id for g in scheduler.running] == ["b"]
    while scheduler.has_work():
        _run(scheduler, scheduler.schedule())
    assert scheduler.block_manager.num_used_blocks == 0


def test_preemption_takes_the_latest_admitted_and_requeues_it_first():
    scheduler = Scheduler(
        BlockManager(8, 4, enable_prefix_caching=False), max_num_seqs=4, max_num_batched_tokens=64
    )
    for name in ("a", "b", "c"):
        scheduler.add(_group(name, 8, max_tokens=10))  # 2 full blocks each: 6 of the 7 usable blocks
    plan = scheduler.schedule()
    assert [g.request_id for g in scheduler.running] == ["a", "b", "c"]
    _run(scheduler, plan)
    scheduler.add(_group("d", 2))
    plan = (
        scheduler.schedule()
    )  # each decode needs a third block; one is free: a takes it, c is preempted for b
    assert [g.request_id for g in plan.preempted] == ["c"]
    assert [g.request_id for g in scheduler.waiting] == ["c", "d"]  # ahead of requests that arrived later
    assert all(s.status is SequenceStatus.WAITING and s.num_computed == 0 for s in plan.preempted[0].seqs)
    assert [i.num_tokens for i in plan.scheduled] == [1, 1]  # no admission in a step that preempted


def test_admission_limits():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=64, max_waiting=3)
    for name in "abc":
        scheduler.add(_group(name, 4))
    with pytest.raises(QueueFullError):
        scheduler.add(_group("d", 4))
    scheduler.schedule()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 1  # max_num_seqs
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(10, 4), max_num_seqs=8, max_num_batched_tokens=4)


def _admitted(scheduler: Scheduler, group: SequenceGroup) -> None:
    scheduler.add(group)
    _run(scheduler, scheduler.schedule())  # prefill (samples token 0)


@pytest.mark.parametrize(
    ("params", "token", "reason", "stop_reason"),
    [
        (SamplingParams(max_tokens=8), 2, "stop", None),  # EOS
        (SamplingParams(max_tokens=8, ignore_eos=True), 2, None, None),  # EOS ignored: still running
        (SamplingParams(max_tokens=8, stop_token_ids=[5]), 5, "stop", 5),
        (SamplingParams(max_tokens=2), 7, "length", None),  # the prefill's token + this one
    ],
)
def test_append_token_ends_the_sequence_when_the_token_or_length_says_so(params, token, reason, stop_reason):
    scheduler = Scheduler(BlockManager(50, 4), eos_token_ids=[2])
    group = SequenceGroup("a", [1, 3, 4], params)
    _admitted(scheduler, group)
    used = scheduler.block_manager.num_used_blocks
    seq = group.seqs[0]
    scheduler.append_token(group, seq, token, None)
    assert seq.token_ids[-1] == token and scheduler.num_generated_tokens == 1
    assert seq.finish_reason == reason and seq.stop_reason == stop_reason
    if reason is None:
        assert group in scheduler.running and scheduler.num_finished_requests == 0
    else:  # the request retires at once and its blocks are free
        assert group not in scheduler.running and scheduler.num_finished_requests == 1
        assert used > 0 and scheduler.block_manager.num_used_blocks == 0


def test_append_token_stops_at_the_context_length():
    scheduler = Scheduler(BlockManager(50, 4), max_model_len=5)
    group = SequenceGroup("a", [1, 3, 4], SamplingParams(max_tokens=100))
    _admitted(scheduler, group)  # 4 tokens now
    scheduler.append_token(group, group.seqs[0], 9, None)
    assert group.seqs[0].finish_reason == "length" and group.seqs[0].num_tokens == 5


def test_a_failed_request_is_finished_with_error_and_counted():
    scheduler = Scheduler(BlockManager(50, 4))
    group = SequenceGroup("a", [1, 3, 4], SamplingParams(max_tokens=8))
    _admitted(scheduler, group)
    scheduler.fail(group)
    assert group.seqs[0].finish_reason == "error" and not scheduler.has_work()
    assert scheduler.num_finished_requests == 1 and scheduler.block_manager.num_used_blocks == 0
