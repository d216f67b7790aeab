"""What a request reports after an engine step: its ``RequestOutput`` built from the request's sequences.

The engine decides *when* a request reports (it produced tokens, finished, was aborted or failed); this module
decides *what* it reports: cumulative token ids, text and log-probabilities, this step's delta (which then
counts as emitted), the prompt log-probabilities once complete, and for beam search the best finished
hypotheses. The data classes themselves live in :mod:`lmforge.infer.outputs`.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.infer.model_runner import ChunkLogits
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.sampler import top_logprobs
from lmforge.infer.scheduler import ScheduledSeq
from lmforge.infer.sequence import Sequence, SequenceGroup


def step_output(group: SequenceGroup, tokenizer: Any | None) -> RequestOutput | None:
    """The request's state after a step that touched it; None for a beam search still running (beam
    requests report once, when finished)."""
    if group.beam is not None:
        return _beam_output(group, tokenizer) if group.is_finished else None
    completions = [_completion_delta(seq) for seq in sorted(group.seqs, key=lambda s: s.index)]
    prompt_logprobs = group.prompt_logprobs
    if prompt_logprobs is not None and len(prompt_logprobs) < len(group.prompt_token_ids):
        prompt_logprobs = None  # not complete yet (chunked prefill)
    return RequestOutput(
        group.request_id,
        group.prompt_token_ids,
        completions,
        group.is_finished,
        prompt_logprobs,
        group.num_cached_tokens,
    )


def final_output(group: SequenceGroup, reason: str = "abort", error: str | None = None) -> RequestOutput:
    """The last output of a request taken out of the engine (aborted, or failed with ``error``): sequences
    still running finish with ``reason``; nothing new is reported."""
    completions = []
    for seq in group.seqs:
        if not seq.is_finished:
            seq.finish(reason)
        completions.append(
            CompletionOutput(
                seq.index,
                seq.output_token_ids,
                seq.text,
                [],
                "",
                seq.logprobs,
                [],
                seq.cumulative_logprob,
                seq.finish_reason,
                seq.stop_reason,
            )
        )
    return RequestOutput(group.request_id, group.prompt_token_ids, completions, True, error=error)


def record_prompt_logprobs(group: SequenceGroup, item: ScheduledSeq, logits: ChunkLogits) -> None:
    """Add the prompt log-probabilities a prefill chunk's logits give (logits at position j score token j+1)."""
    seq, start = item.seq, item.seq.num_computed
    assert group.prompt_logprobs is not None and logits.all is not None
    targets = [j + 1 for j in range(start, start + item.num_tokens) if j + 1 < seq.prompt_len]
    targets = [t for t in targets if t >= len(group.prompt_logprobs)]
    if not targets:
        return
    rows = torch.tensor([t - 1 - start for t in targets])
    logprobs = torch.log_softmax(logits.all.float().cpu().index_select(0, rows), dim=-1)
    chosen = torch.tensor([seq.token_ids[t] for t in targets])
    group.prompt_logprobs.extend(
        top_logprobs(logprobs, chosen, [group.params.prompt_logprobs or 0] * len(rows))
    )


def _completion_delta(seq: Sequence) -> CompletionOutput:
    """A sampled sequence's cumulative state and what it added since its last report (then marked emitted)."""
    new_tokens = seq.output_token_ids[seq.emitted_tokens :]
    seq.emitted_tokens = seq.num_output_tokens
    new_logprobs = None
    if seq.logprobs is not None:
        new_logprobs = seq.logprobs[seq.emitted_logprobs :]
        seq.emitted_logprobs = len(seq.logprobs)
    new_text = seq.detokenizer.take_delta(seq.is_finished) if seq.detokenizer is not None else ""
    return CompletionOutput(
        seq.index,
        seq.output_token_ids,
        seq.text,
        new_tokens,
        new_text,
        seq.logprobs,
        new_logprobs,
        seq.cumulative_logprob,
        seq.finish_reason,
        seq.stop_reason,
    )


def _beam_output(group: SequenceGroup, tokenizer: Any | None) -> RequestOutput:
    """The ``n`` best finished hypotheses, scored by the length-penalised beam score."""
    assert group.beam is not None
    params = group.params
    completions = []
    for index, hyp in enumerate(group.beam.best(params.n)):
        text = ""
        if tokenizer is not None and params.detokenize:
            text = tokenizer.decode(hyp.token_ids, skip_special_tokens=params.skip_special_tokens)
        completions.append(
            CompletionOutput(index, hyp.token_ids, text, hyp.token_ids, text, None, None, hyp.score, "stop")
        )
    return RequestOutput(
        group.request_id,
        group.prompt_token_ids,
        completions,
        True,
        group.prompt_logprobs,
        group.num_cached_tokens,
    )
