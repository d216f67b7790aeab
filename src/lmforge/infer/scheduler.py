"""Continuous-batching scheduler: which sequences compute how many tokens in the next step.

Every step fills a token budget: decoding requests first (one token per sequence), then the next chunks of
prefills that did not fit in earlier steps, then waiting requests in arrival order, the last admitted one
chunked to whatever budget is left. A request joins at the next step after it arrives and leaves as soon as
it finishes. When the block pool runs dry, the most recently admitted running request is preempted: its
blocks are freed and it goes back to the head of the queue to be recomputed (its prefix blocks usually
survive in the prefix cache, so recomputation is cheap).

The scheduler also owns a sequence's life after sampling: ``append_token`` adds the sampled token and ends
the sequence at EOS, a stop token or stop string, ``max_tokens`` or the context, freeing its blocks at once and
retiring the request when its last sequence ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from lmforge.infer.block_manager import BlockManager
from lmforge.infer.outputs import TokenLogprob
from lmforge.infer.sequence import Sequence, SequenceGroup, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit; the server answers 429."""


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens whose keys/values are computed this step, from seq.num_computed on

    @property
    def completes(self) -> bool:
        """Whether this chunk reaches the sequence's last token, whose logits choose the next token."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """A step's plan. Chunks go in and out through :meth:`add` and :meth:`drop`, which keep ``num_tokens``
    (the step's token total, read once per scheduled group) current without re-summing the list."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    num_tokens: int = 0

    def add(self, items: Seq[ScheduledSeq]) -> None:
        self.scheduled.extend(items)
        self.num_tokens += sum(item.num_tokens for item in items)

    def drop(self, group: SequenceGroup) -> None:
        """Take the group's chunks back out (it was preempted after they were placed)."""
        self.scheduled = [s for s in self.scheduled if s.seq not in group.seqs]
        self.num_tokens = sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        max_waiting: int = 1024,
        chunked_prefill: bool = True,
        eos_token_ids: Seq[int] = (),
        max_model_len: int | None = None,
        max_chunk: int | None = None,
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (every decode needs one token)")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.num_preemptions = 0
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_chunk = max_chunk  # the most tokens of one sequence computed in one step (attention sinks)
        self.max_model_len = max_model_len
        self.num_generated_tokens = 0
        self.num_finished_requests = 0  # finished or failed (aborted requests are not counted)
        # Admissions leave this many blocks free, so running decodes do not immediately preempt them.
        self.watermark_blocks = max(1, block_manager.num_blocks // 100)

    # -- queue -----------------------------------------------------------------------------------------------
    def add(self, group: SequenceGroup) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
        self.waiting.append(group)

    def abort(self, request_id: str) -> SequenceGroup | None:
        for queue in (self.waiting, self.running):
            for group in queue:
                if group.request_id == request_id:
                    queue.remove(group)
                    self._free(group)
                    return group
        return None

    def finish(self, group: SequenceGroup) -> None:
        """Remove a finished request from the running set and free its blocks at once."""
        if group in self.running:
            self.running.remove(group)
        self._free(group)
        self.num_finished_requests += 1

    def fail(self, group: SequenceGroup) -> None:
        """Take a request that broke inside a step out of the engine: blocks freed, live sequences finished
        with "error"."""
        self.abort(group.request_id)
        for seq in group.seqs:
            if not seq.is_finished:
                seq.finish("error")
        self.num_finished_requests += 1

    def append_token(
        self, group: SequenceGroup, seq: Sequence, token: int, logprob: TokenLogprob | None
    ) -> None:
        """Add a sampled token to ``seq`` and end it when the token or the length says so."""
        params = seq.params
        seq.append_token(token, logprob)
        self.num_generated_tokens += 1
        if not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        elif token in params.stop_token_ids:
            seq.finish("stop", token)
        else:
            stop = seq.detokenizer.append(token) if seq.detokenizer is not None else None
            if stop is not None:
                seq.finish("stop", stop)
            elif seq.num_output_tokens >= params.max_tokens or (
                self.max_model_len is not None and seq.num_tokens >= self.max_model_len
            ):
                seq.finish("length")
        if seq.is_finished:
            self.free_seq(seq)
            if group.is_finished:
                self.finish(group)

    def free_seq(self, seq: Sequence) -> None:
        self.block_manager.free(seq)

    def _free(self, group: SequenceGroup) -> None:
        for seq in group.seqs:
            if seq.block_table:
                self.block_manager.free(seq)

    @property
    def num_running_seqs(self) -> int:
        """Sequences the running requests hold or will hold (``n``/beam width once they fork)."""
        return sum(max(len(g.live_seqs), g.max_seqs) for g in self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step --------------------------------------------------------------------------------------------
    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        self.running.remove(group)
        for seq in group.live_seqs:
            self.block_manager.free(seq)
            seq.status = SequenceStatus.WAITING
        out.drop(group)
        out.preempted.append(group)
        self.waiting.appendleft(group)
        self.num_preemptions += 1

    def _schedule_running(self, out: SchedulerOutput) -> None:
        """Decoding requests first (in admission order), then the next chunks of unfinished prefills."""
        decoding = [g for g in self.running if all(s.num_uncomputed == 1 for s in g.live_seqs)]
        decoding_ids = {id(g) for g in decoding}
        prefilling = [g for g in self.running if id(g) not in decoding_ids]
        for group in decoding + prefilling:
            budget = self.max_num_batched_tokens - out.num_tokens
            if budget <= 0:
                return
            if group not in self.running:
                continue  # preempted to make room for an earlier one
            seqs = group.live_seqs
            wanted = [min(s.num_uncomputed, budget) if len(seqs) == 1 else s.num_uncomputed for s in seqs]
            if self.max_chunk is not None:
                wanted = [min(n, self.max_chunk) for n in wanted]
            if sum(wanted) > budget:
                continue
            placed = []
            for seq, n in zip(seqs, wanted):
                while group in self.running and not self.block_manager.ensure_slots(seq, n):
                    self._preempt(self.running[-1], out)
                if group not in self.running:
                    break  # it was the most recently admitted: it preempted itself
                placed.append(ScheduledSeq(seq, n))
            if group in self.running:
                out.add(placed)

    def _admit_waiting(self, out: SchedulerOutput) -> None:
        bm = self.block_manager
        while self.waiting and out.num_tokens < self.max_num_batched_tokens:
            budget = self.max_num_batched_tokens - out.num_tokens
            group = self.waiting[0]
            seqs = group.live_seqs
            if self.num_running_seqs + group.max_seqs > self.max_num_seqs and self.running:
                break
            # prompt logprobs need every prompt position computed, so those requests skip the prefix cache
            use_cache = group.params.prompt_logprobs is None
            for seq in seqs:
                if use_cache:
                    cached = bm.match_prefix(seq) - seq.num_virtual  # (a virtual prefix is not the prompt's)
                    if seq is seqs[0] and not group.num_cached_tokens:
                        group.num_cached_tokens = min(cached, len(group.prompt_token_ids))
                elif not seq.block_table:
                    bm.attach_pinned(seq)
            wanted = [s.num_uncomputed for s in seqs]
            if len(seqs) == 1 and self.chunked_prefill:
                wanted = [min(wanted[0], budget)]
            if self.max_chunk is not None:
                wanted = [min(n, self.max_chunk) for n in wanted]
            new_blocks = sum(
                bm.blocks_for(s.num_computed + n) - len(s.block_table) + bm.copies_on_write(s)
                for s, n in zip(seqs, wanted)
            )
            fits_budget = sum(wanted) <= budget or not out.scheduled
            reserve = self.watermark_blocks if self.running else 0
            if not fits_budget or new_blocks > bm.num_free_blocks - reserve:
                for seq in seqs:
                    bm.free(seq)
                break
            for seq, n in zip(seqs, wanted):
                allocated = bm.ensure_slots(seq, n)  # cannot fail: the free blocks were counted above
                assert allocated
                seq.status = SequenceStatus.RUNNING
                out.add([ScheduledSeq(seq, n)])
            self.waiting.popleft()
            self.running.append(group)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._schedule_running(out)
        if not out.preempted:
            self._admit_waiting(out)
        return out
