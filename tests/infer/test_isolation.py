"""One request never fails another: whatever breaks while the engine processes one request fails that
request alone, frees its blocks, and every other request in the batch gets exactly the tokens it would
have got without it."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.model import ModelConfig, Transformer

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]
POISON = [40, 41, 42, 43, 44, 45]


def engine() -> LLMEngine:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128)
    return LLMEngine(Transformer(cfg), None, EngineConfig(block_size=8, num_blocks=128), eos_token_ids=[])


def run(eng: LLMEngine, params: list[SamplingParams], prompts: list[list[int]]) -> dict[str, object]:
    ids = [eng.add_request(None, p, sp).request_id for p, sp in zip(prompts, params)]
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out
    return {i: final[i] for i in ids}


def innocent_params() -> list[SamplingParams]:
    # greedy, sampled with a seed, and with penalties: each goes through a different part of the sampler
    return [
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, detokenize=False),
        SamplingParams(max_tokens=24, temperature=0.8, seed=3, detokenize=False),
        SamplingParams(
            max_tokens=24, temperature=0.9, top_k=5, seed=4, repetition_penalty=1.3, detokenize=False
        ),
        SamplingParams(max_tokens=24, temperature=0.0, n=2, detokenize=False, presence_penalty=0.5),
    ]


@pytest.fixture(scope="module")
def reference() -> list[list[list[int]]]:
    outs = run(engine(), innocent_params(), PROMPTS)
    return [[c.token_ids for c in o.outputs] for o in outs.values()]


def poison_run(patch) -> tuple[list, object, LLMEngine]:
    eng = engine()
    patch(eng)
    params = [*innocent_params(), SamplingParams(max_tokens=24, temperature=0.7, seed=9, detokenize=False)]
    outs = list(run(eng, params, [*PROMPTS, POISON]).values())
    return outs[:-1], outs[-1], eng


def is_poison(seqs) -> bool:
    return any(s.token_ids[: len(POISON)] == POISON for s in seqs)


def test_a_request_whose_sampling_raises_fails_alone(reference) -> None:
    def patch(eng: LLMEngine) -> None:
        sample = eng.sampler

        def sampler(logits, seqs):
            if is_poison(seqs):
                raise RuntimeError("probability tensor contains inf or nan")
            return sample(logits, seqs)

        eng.sampler = sampler

    innocent, poison, eng = poison_run(patch)
    assert [[c.token_ids for c in o.outputs] for o in innocent] == reference
    assert all(len(c.token_ids) == 24 for o in innocent for c in o.outputs)
    assert poison.finished and poison.outputs[0].finish_reason == "error"
    assert "inf or nan" in poison.error
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished()


def test_a_request_whose_forward_raises_fails_alone(reference) -> None:
    def patch(eng: LLMEngine) -> None:
        execute = eng.runner.execute
        calls = {"n": 0}

        def runner(items, all_logits):
            calls["n"] += 1
            # the poison raises in its third forward, after it has tokens and blocks of its own
            if calls["n"] >= 3 and is_poison([it.seq for it in items]):
                raise IndexError("index out of range in self")
            return execute(items, all_logits)

        eng.runner.execute = runner

    innocent, poison, eng = poison_run(patch)
    assert [[c.token_ids for c in o.outputs] for o in innocent] == reference
    assert poison.outputs[0].finish_reason == "error" and "IndexError" in poison.error
    assert eng.block_manager.num_used_blocks == 0


def test_a_request_whose_output_building_raises_fails_alone(reference) -> None:
    def patch(eng: LLMEngine) -> None:
        make_output = eng._make_output

        def build(group):
            if group.prompt_token_ids == POISON and group.seqs[0].num_output_tokens >= 5:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return make_output(group)

        eng._make_output = build

    innocent, poison, eng = poison_run(patch)
    assert [[c.token_ids for c in o.outputs] for o in innocent] == reference
    assert poison.outputs[0].finish_reason == "error"
    assert eng.block_manager.num_used_blocks == 0


def test_values_that_used_to_break_a_step_are_refused_or_computed_safely(reference) -> None:
    eng = engine()
    with pytest.raises(ValueError, match=r"^repetition_penalty"):
        eng.add_request(None, POISON, SamplingParams(repetition_penalty=1e-300))
    with pytest.raises(ValueError, match=r"^top_k"):
        eng.add_request(None, POISON, SamplingParams(top_k=2**64))
    with pytest.raises(ValueError, match=r"^length_penalty"):
        eng.add_request(None, POISON, SamplingParams(use_beam_search=True, n=2, length_penalty=1e308))
    tiny = [SamplingParams(max_tokens=24, temperature=t, detokenize=False) for t in (1e-300, 5e-324)]
    huge_k = SamplingParams(max_tokens=24, temperature=0.5, top_k=10**6, seed=1, detokenize=False)
    outs = list(run(eng, [*innocent_params(), *tiny, huge_k], [*PROMPTS, POISON, POISON, POISON]).values())
    assert [[c.token_ids for c in o.outputs] for o in outs[:4]] == reference
    greedy = run(engine(), [SamplingParams(max_tokens=24, temperature=0.0, detokenize=False)], [POISON])
    assert (
        outs[4].outputs[0].token_ids
        == outs[5].outputs[0].token_ids
        == next(iter(greedy.values())).outputs[0].token_ids
    )
    assert len(outs[6].outputs[0].token_ids) == 24 and outs[6].error is None
