"""Beam search, step for step the algorithm of Hugging Face ``generate`` (transformers >= 4.50).

Each step takes the processed log-probabilities of the running beams, keeps the ``2 * num_beams`` best
continuations of all beams, moves those ending in EOS (or reaching ``max_tokens``) to the finished hypotheses
(score = sum of log-probabilities / generated_length ** length_penalty) when they rank among the first
``num_beams``, and continues with the best ``num_beams`` unfinished ones. ``early_stopping`` follows HF:
True stops once ``num_beams`` hypotheses are finished; False stops when the best running beam, at its current
length, can no longer beat the worst finished one; "never" makes that estimate at ``max_tokens`` when the
length penalty is positive. ``BeamSearch`` only decides; ``advance_beams`` carries a decision out on the
request's sequences (forking the parents that continue more than once, freeing the blocks of those that do not
continue, finishing the request when the search is done).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.infer.sampler import process_logits
from lmforge.infer.scheduler import Scheduler
from lmforge.infer.sequence import Sequence, SequenceGroup

_NEG = -1.0e9  # HF's "impossible" score offset


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens (EOS included when it ended the hypothesis)
    score: float  # sum of log-probabilities / length ** length_penalty


class BeamSearch:
    def __init__(
        self,
        num_beams: int,
        max_tokens: int,
        eos_token_ids: list[int],
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
    ) -> None:
        self.num_beams = num_beams
        self.max_tokens = max_tokens
        self.eos_token_ids = torch.tensor(eos_token_ids, dtype=torch.long)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_generated = 0
        self.running_scores = torch.tensor([0.0] + [_NEG] * (num_beams - 1))
        self.running_tokens: list[list[int]] = [[] for _ in range(num_beams)]
        self.finished_scores = torch.full((num_beams,), _NEG)
        self.finished_flags = torch.zeros(num_beams, dtype=torch.bool)
        self.finished_tokens: list[list[int]] = [[] for _ in range(num_beams)]
        self.improvement_possible = True
        self.done = False

    def step(self, logprobs: Tensor) -> list[tuple[int, int]]:
        """Advance with ``logprobs`` (live_beams, vocab); returns the next beams as (parent row, token).

        On the first step there is one live row (the prompt); HF's other ``num_beams - 1`` copies, scored
        -1e9, are materialised here so the top-k sees exactly HF's candidate list.
        """
        logprobs = logprobs.float()
        if logprobs.shape[0] == 1 and self.num_generated == 0:
            parent_of_row = [0] * self.num_beams
            logprobs = logprobs.expand(self.num_beams, -1)
        else:
            parent_of_row = list(range(logprobs.shape[0]))
        nb, vocab = logprobs.shape
        keep = 2 * nb if self.eos_token_ids.numel() <= 1 else (1 + self.eos_token_ids.numel()) * nb
        scores = (logprobs + self.running_scores[:, None]).reshape(-1)
        top_scores, top_index = scores.topk(keep)
        top_rows = (top_index // vocab).tolist()
        top_tokens = top_index % vocab
        hits = torch.isin(top_tokens, self.eos_token_ids)
        if self.num_generated + 1 >= self.max_tokens:
            hits[:] = True
        tokens = top_tokens.tolist()

        # continue with the best num_beams unfinished candidates
        running = top_scores + hits.float() * _NEG
        next_index = running.topk(nb).indices.tolist()
        next_beams = [(parent_of_row[top_rows[i]], tokens[i]) for i in next_index]

        # finished hypotheses: candidates ranking among the first num_beams that hit a stop
        candidate = top_scores / ((self.num_generated + 1) ** self.length_penalty)
        if bool(self.finished_flags.all()) and self.early_stopping is True:
            candidate = candidate + _NEG
        if not self.improvement_possible:
            candidate = candidate + _NEG
        just_finished = hits & (torch.arange(keep) < nb)
        candidate = candidate + (~just_finished).float() * _NEG
        merged_scores = torch.cat([self.finished_scores, candidate])
        merged_flags = torch.cat([self.finished_flags, just_finished])
        merged_tokens = self.finished_tokens + [
            self.running_tokens[top_rows[i]] + [tokens[i]] for i in range(keep)
        ]
        best = merged_scores.topk(nb).indices
        self.finished_scores = merged_scores[best]
        self.finished_flags = merged_flags[best]
        self.finished_tokens = [merged_tokens[i] for i in best.tolist()]

        self.running_scores = running[next_index]
        self.running_tokens = [self.running_tokens[top_rows[i]] + [tokens[i]] for i in next_index]
        self.num_generated += 1
        self._update_stop(bool(hits.all()))
        return next_beams

    def _update_stop(self, all_hit: bool) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.num_generated
        best_running = self.running_scores[0] / (best_length**self.length_penalty)
        worst_finished = torch.where(self.finished_flags, self.finished_scores.min(), torch.tensor(_NEG))
        self.improvement_possible = self.improvement_possible and bool((best_running > worst_finished).any())
        all_finished = bool(self.finished_flags.all())
        self.done = (
            (not self.improvement_possible) or (all_finished and self.early_stopping is True) or all_hit
        )

    def best(self, n: int) -> list[Hypothesis]:
        """The ``n`` best finished hypotheses, best first."""
        return [
            Hypothesis(self.finished_tokens[i], float(self.finished_scores[i]))
            for i in range(min(n, self.num_beams))
            if bool(self.finished_flags[i])
        ]


def advance_beams(group: SequenceGroup, entries: list[tuple[Sequence, Tensor]], scheduler: Scheduler) -> None:
    """One beam-search step of ``group`` from the logits of its live beams (``entries``: sequence, logits)."""
    beam: BeamSearch = group.beam
    live = [seq for seq, _ in entries]
    logprobs = torch.log_softmax(torch.stack([lg for _, lg in entries]).float().cpu(), dim=-1)
    next_beams = beam.step(process_logits(logprobs, live))
    scheduler.num_generated_tokens += len(next_beams)
    if beam.done:
        for seq in live:
            seq.finish("stop")
            scheduler.free_seq(seq)
        scheduler.finish(group)
        return
    claimed: set[int] = set()
    children: list[tuple[Sequence, int]] = []
    for index, (parent_row, token) in enumerate(next_beams):
        parent = live[parent_row]
        if parent_row in claimed:
            seq = parent.fork(index)
            scheduler.block_manager.fork(parent, seq)
        else:
            claimed.add(parent_row)
            seq = parent
        children.append((seq, token))
    for row, seq in enumerate(live):
        if row not in claimed:
            scheduler.free_seq(seq)
    for index, (seq, token) in enumerate(children):
        seq.index = index
        seq.append_token(token, None)
    group.seqs = [seq for seq, _ in children]
