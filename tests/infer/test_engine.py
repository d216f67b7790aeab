"""The engine against cache-free full forwards: batching, prefix caching, chunking and preemption must not
change a single greedy token."""

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, QueueFullError, SamplingParams
from lmforge.model import ModelConfig, Transformer

from .helpers import random_prompts, reference_greedy

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, detokenize=False)
LENGTHS = [5, 17, 33, 2, 40, 9, 64, 16]


def _engine(model, **kwargs) -> LLMEngine:
    defaults = dict(num_blocks=256, block_size=4, max_num_seqs=16, max_num_batched_tokens=256)
    return LLMEngine(model, None, EngineConfig(**{**defaults, **kwargs}))


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def expected(tiny_model):
    return [reference_greedy(tiny_model, p, GREEDY.max_tokens) for p in random_prompts(LENGTHS)]


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"max_num_batched_tokens": 24, "max_num_seqs": 4},  # long prompts are chunked over several steps
        {"enable_prefix_caching": False},
        {"num_blocks": 24, "max_num_seqs": 8},  # 23 usable blocks of 4 tokens: forces preemption
        {
            "chunked_prefill": False,
            "max_num_batched_tokens": 24,
            "max_num_seqs": 4,
        },  # whole prompts, one by one
        {"decode_mirror": False},  # decodes gather their keys/values from the blocks every step
        {"decode_mirror": False, "num_blocks": 24, "max_num_seqs": 8},
    ],
    ids=[
        "batched",
        "chunked-prefill",
        "no-prefix-cache",
        "preemption",
        "unchunked-prefill",
        "gather",
        "gather-preemption",
    ],
)
def test_batched_greedy_equals_each_request_alone(tiny_model, expected, settings):
    engine = _engine(tiny_model, **settings)
    outs = engine.generate(random_prompts(LENGTHS), GREEDY)
    assert _tokens(outs) == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    if settings.get("num_blocks") == 24:
        assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits_give_the_same_tokens(tiny_model):
    shared = random_prompts([20], seed=5)[0]
    prompts = [shared + tail for tail in random_prompts([3, 7, 1, 12], seed=6)]
    engine = _engine(tiny_model)
    first = engine.generate(prompts[:1], GREEDY)
    assert first[0].num_cached_tokens == 0
    rest = engine.generate(prompts[1:], GREEDY)
    # 20 shared tokens = 5 full blocks of 4, computed once by the first request
    assert [o.num_cached_tokens for o in rest] == [20, 20, 20]
    assert engine.block_manager.stats.hits >= 15
    assert _tokens(first + rest) == [reference_greedy(tiny_model, p, GREEDY.max_tokens) for p in prompts]


def test_requests_join_while_others_decode(tiny_model, expected):
    engine = _engine(tiny_model, max_num_batched_tokens=32)
    prompts = random_prompts(LENGTHS)
    finals = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:  # one new request per step
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, GREEDY)
        for out in engine.step():
            if out.finished:
                finals[int(out.request_id)] = out.outputs[0].token_ids
    assert [finals[i] for i in range(len(prompts))] == expected


def test_streamed_deltas_add_up_to_the_final_output(tiny_model):
    engine = _engine(tiny_model)
    engine.add_request("a", random_prompts([6])[0], SamplingParams(max_tokens=7, temperature=0.0, logprobs=2))
    deltas, logprob_deltas, final = [], [], None
    while engine.has_unfinished():
        for out in engine.step():
            deltas += out.outputs[0].new_token_ids
            logprob_deltas += out.outputs[0].new_logprobs
            final = out
    assert final.finished and deltas == final.outputs[0].token_ids
    assert [lp.token_id for lp in logprob_deltas] == deltas


def test_same_seed_same_samples_whatever_the_batch(tiny_model):
    prompt = random_prompts([8])[0]
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, detokenize=False)
    alone = _engine(tiny_model).generate([prompt], seeded)[0].outputs[0].token_ids
    others = random_prompts([3, 30, 11], seed=9)
    unseeded = SamplingParams(max_tokens=5, temperature=1.0, detokenize=False)
    engine = _engine(tiny_model)
    outs = engine.generate([others[0], prompt, others[1], others[2]], [unseeded, seeded, unseeded, unseeded])
    assert outs[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=99, detokenize=False)
    assert _engine(tiny_model).generate([prompt], other_seed)[0].outputs[0].token_ids != alone


def test_n_samples_fork_after_one_prefill(tiny_model):
    engine = _engine(tiny_model)
    params = SamplingParams(n=4, max_tokens=6, temperature=1.0, seed=7, detokenize=False)
    out = engine.generate([random_prompts([13])[0]], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=3, detokenize=False),
        SamplingParams(
            n=2, best_of=3, use_beam_search=True, max_tokens=12, detokenize=False, ignore_eos=True
        ),
    ],
    ids=["n-samples", "beam-search"],
)
def test_forked_requests_survive_preemption(tiny_model, params):
    prompts = random_prompts([30, 22, 41, 35, 28])
    roomy = _engine(tiny_model).generate(prompts, params)
    cramped_engine = _engine(tiny_model, num_blocks=48, max_num_seqs=16)
    cramped = cramped_engine.generate(prompts, params)
    assert cramped_engine.scheduler.num_preemptions > 0
    assert [[c.token_ids for c in o.outputs] for o in cramped] == [
        [c.token_ids for c in o.outputs] for o in roomy
    ]
    assert cramped_engine.block_manager.num_used_blocks == 0


def test_logprobs_match_a_full_forward(tiny_model):
    prompt = random_prompts([37])[0]  # prefilled in 3 chunks of at most 16 tokens
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2, detokenize=False)
    out = _engine(tiny_model, max_num_batched_tokens=16).generate([prompt], params)[0]
    tokens = out.outputs[0].token_ids
    with torch.no_grad():
        logits = tiny_model(torch.tensor([prompt + tokens])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for step, info in enumerate(out.outputs[0].logprobs):
        row = reference[len(prompt) - 1 + step]
        assert info.token_id == tokens[step]
        assert info.logprob == pytest.approx(float(row[tokens[step]]), abs=1e-4)
        assert [t for t, _ in info.top] == row.topk(3).indices.tolist()
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        assert out.prompt_logprobs[j].logprob == pytest.approx(float(reference[j - 1, prompt[j]]), abs=1e-4)


def test_stop_token_ids_and_max_tokens_finish_requests(tiny_model):
    prompt = random_prompts([10])[0]
    free_run = reference_greedy(tiny_model, prompt, 8)
    stop_at = free_run[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_at], detokenize=False)
    out = _engine(tiny_model).generate([prompt], params)[0].outputs[0]
    cut = free_run.index(stop_at) + 1
    assert out.token_ids == free_run[:cut] and out.finish_reason == "stop" and out.stop_reason == stop_at
    eos_engine = LLMEngine(
        tiny_model, None, EngineConfig(num_blocks=64, block_size=4), eos_token_ids=[stop_at]
    )
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0].outputs[0]
    assert out.token_ids == free_run[:cut] and out.finish_reason == "stop" and out.stop_reason is None


def test_abort_frees_blocks_and_reports(tiny_model):
    engine = _engine(tiny_model)
    engine.add_request("x", random_prompts([30])[0], SamplingParams(max_tokens=50, temperature=0.0))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    assert engine.abort("x")
    assert engine.block_manager.num_used_blocks == 0
    (out,) = engine.step()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished()


def test_admission_limits_and_bad_requests(tiny_model):
    engine = _engine(tiny_model, max_waiting=2)
    engine.add_request("a", [1, 2], GREEDY)
    engine.add_request("b", [1, 2], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [1, 2], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.make_request("d", [1] * 256, GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.make_request("e", [1, 97], GREEDY)
    with pytest.raises(ValueError, match="KV cache"):
        _engine(tiny_model, num_blocks=4).make_request("f", [1] * 10, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64 - 1, n=2)
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)


def test_offline_generate_is_not_bounded_by_the_waiting_queue(tiny_model, expected):
    # max_waiting is the server's back-pressure limit; an offline batch larger than it still runs whole.
    engine = _engine(tiny_model, max_waiting=2, max_num_seqs=2)
    assert _tokens(engine.generate(random_prompts(LENGTHS), GREEDY)) == expected
    with pytest.raises(ValueError, match="3 prompts, 2 sampling params"):
        engine.generate([[1, 2]] * 3, [GREEDY] * 2)


def test_pool_is_sized_from_a_memory_budget(tiny_model):
    cfg = tiny_model.cfg
    per_block = 2 * cfg.n_layers * 16 * cfg.n_kv_heads * cfg.head_dim * 4
    engine = LLMEngine(tiny_model, None, EngineConfig(kv_cache_memory_bytes=per_block * 50))
    assert engine.block_manager.num_blocks == 50


def test_the_model_is_left_as_it_was_given(tiny_model):
    _engine(tiny_model).generate(random_prompts([9, 20]), GREEDY)
    assert not tiny_model.lm_head._forward_pre_hooks
    assert not tiny_model.training


def test_a_prefix_decoder_is_served_with_its_prompt_bidirectional():
    """Prefill honours the prefix mask (the prompt in one piece) and cached blocks belong to whole prompts."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_seq_len=128, structure="prefix")
    model = Transformer(cfg).eval()

    def reference(prompt: list[int], steps: int, bidirectional: bool = True) -> list[int]:
        ids = list(prompt)
        prefix = torch.tensor([len(prompt)]) if bidirectional else None
        with torch.no_grad():
            for _ in range(steps):
                ids.append(int(model(torch.tensor([ids]), prefix_lengths=prefix).logits[0, -1].argmax()))
        return ids[len(prompt) :]

    engine = LLMEngine(model, None, EngineConfig(num_blocks=64, block_size=8, max_num_batched_tokens=64))
    prompts = random_prompts([5, 20, 41], seed=2)
    outs = engine.generate(prompts, GREEDY)
    expected = [reference(p, GREEDY.max_tokens) for p in prompts]
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert expected != [reference(p, GREEDY.max_tokens, bidirectional=False) for p in prompts]
    hits = engine.stats().prefix_cache_hits
    same_start = prompts[2][:16] + random_prompts([25], seed=3)[0]  # two equal blocks, then other tokens
    assert engine.generate([same_start], GREEDY)[0].outputs[0].token_ids == reference(
        same_start, GREEDY.max_tokens
    )
    assert engine.stats().prefix_cache_hits == hits  # its first blocks saw other tokens after them
    again = engine.generate([prompts[2]], GREEDY)[0]
    assert again.num_cached_tokens == 40 and again.outputs[0].token_ids == expected[2]
