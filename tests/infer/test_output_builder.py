"""Request outputs: cumulative state plus exactly what is new since the last report."""

from __future__ import annotations

from lmforge.infer.output_builder import final_output, step_output
from lmforge.infer.outputs import TokenLogprob
from lmforge.infer.sampling_params import SamplingParams
from lmforge.infer.sequence import SequenceGroup


def test_each_step_reports_only_the_new_tokens_and_logprobs():
    group = SequenceGroup("r", [1, 2], SamplingParams(max_tokens=5, logprobs=0, detokenize=False))
    seq = group.seqs[0]
    seq.append_token(7, TokenLogprob(7, -0.5))
    first = step_output(group, None)
    seq.append_token(8, TokenLogprob(8, -0.25))
    second = step_output(group, None)
    assert first.outputs[0].new_token_ids == [7] and second.outputs[0].new_token_ids == [8]
    assert second.outputs[0].token_ids == [7, 8]
    assert [lp.token_id for lp in second.outputs[0].new_logprobs] == [8]
    assert second.outputs[0].cumulative_logprob == -0.75 and not second.finished
    seq.finish("length")
    last = step_output(group, None)
    assert last.finished and last.outputs[0].new_token_ids == [] and last.outputs[0].finish_reason == "length"


def test_incomplete_prompt_logprobs_are_held_back():
    group = SequenceGroup("r", [1, 2, 3], SamplingParams(max_tokens=5, prompt_logprobs=0, detokenize=False))
    assert step_output(group, None).prompt_logprobs is None  # only [None] of 3 entries so far
    group.prompt_logprobs += [TokenLogprob(2, -1.0), TokenLogprob(3, -2.0)]
    assert [lp.token_id for lp in step_output(group, None).prompt_logprobs[1:]] == [2, 3]


def test_a_final_output_finishes_running_sequences_with_the_reason_and_carries_the_error():
    group = SequenceGroup("r", [1, 2], SamplingParams(max_tokens=5, n=2, detokenize=False))
    group.seqs.append(group.seqs[0].fork(1))
    group.seqs[0].finish("stop")
    out = final_output(group, "error", "ValueError: boom")
    assert [c.finish_reason for c in out.outputs] == ["stop", "error"]
    assert out.finished and out.error == "ValueError: boom" and out.outputs[1].new_token_ids == []
