"""A seeded random mix of everything at once through a small block pool: the engine must not crash, must
finish or abort every request, keep greedy requests exact, and hand every block back."""

import random

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams

from .helpers import random_prompts, reference_greedy


def _random_params(rng: random.Random) -> SamplingParams:
    kind = rng.choice(["greedy", "sample", "n", "beam", "penalties"])
    common = dict(max_tokens=rng.randint(1, 24), detokenize=False, ignore_eos=True)
    if kind == "greedy":
        return SamplingParams(temperature=0.0, logprobs=rng.choice([None, 2]), **common)
    if kind == "sample":
        return SamplingParams(
            temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, seed=rng.randint(0, 9), **common
        )
    if kind == "n":
        return SamplingParams(n=rng.randint(2, 3), temperature=1.0, **common)
    if kind == "beam":
        return SamplingParams(n=2, best_of=3, use_beam_search=True, length_penalty=0.8, **common)
    return SamplingParams(
        temperature=0.0,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        no_repeat_ngram_size=2,
        logit_bias={5: 2.0},
        prompt_logprobs=1,
        **common,
    )


def test_random_traffic_through_a_small_pool(tiny_model):
    rng = random.Random(0)
    engine = LLMEngine(
        tiny_model, None, EngineConfig(num_blocks=36, block_size=4, max_num_seqs=8, max_num_batched_tokens=24)
    )
    prompts = random_prompts([rng.randint(1, 20) for _ in range(30)], seed=11)
    requests = {str(i): (p, _random_params(rng)) for i, p in enumerate(prompts)}
    pending = list(requests)
    finals, aborted = {}, set()
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 4)):
            if pending:
                request_id = pending.pop(0)
                engine.add_request(request_id, *requests[request_id])
        if rng.random() < 0.05 and engine.scheduler.running:
            victim = rng.choice(engine.scheduler.running).request_id
            assert engine.abort(victim)
            aborted.add(victim)
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert set(finals) == set(requests)
    assert engine.block_manager.num_used_blocks == 0
    assert engine.scheduler.num_preemptions > 0 and aborted
    for request_id, out in finals.items():
        prompt, params = requests[request_id]
        if request_id in aborted:
            assert all(c.finish_reason == "abort" for c in out.outputs if c.finish_reason != "length")
            continue
        assert len(out.outputs) == params.n
        if params.temperature == 0.0 and not params.use_beam_search and not params.needs_token_history:
            assert out.outputs[0].token_ids == reference_greedy(tiny_model, prompt, params.max_tokens)
        if params.prompt_logprobs is not None:
            assert len(out.prompt_logprobs) == len(prompt)
