"""The model runner's logits equal one plain forward of the model, however the work is cut: prefill in
chunks, decodes over the decode mirror or gathered from the block pool, several sequences padded together."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.model import ModelConfig, Transformer

PROMPTS = [list(range(3, 40)), [7, 8, 9, 10, 11], list(range(50, 71))]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=128
    )
    return Transformer(cfg).eval()


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("budget", [8, 1024])  # 8 tokens a step: every prompt is prefilled in chunks
def test_prompt_and_generated_logprobs_equal_a_plain_forward(model, mirror: bool, budget: int) -> None:
    config = EngineConfig(
        block_size=4, num_blocks=128, max_num_seqs=4, max_num_batched_tokens=budget, decode_mirror=mirror
    )
    engine = LLMEngine(model, None, config, eos_token_ids=[])
    params = SamplingParams(max_tokens=6, temperature=0.0, prompt_logprobs=0, logprobs=0, detokenize=False)
    for prompt, out in zip(PROMPTS, engine.generate(PROMPTS, params)):
        full = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), dim=-1)
        got_prompt = [lp.logprob for lp in out.prompt_logprobs[1:]]
        expected_prompt = [want[i - 1, t].item() for i, t in enumerate(prompt) if i > 0]
        torch.testing.assert_close(torch.tensor(got_prompt), torch.tensor(expected_prompt), atol=1e-4, rtol=0)
        got = [lp.logprob for lp in out.outputs[0].logprobs]
        expected = [want[len(prompt) + i - 1, t].item() for i, t in enumerate(out.outputs[0].token_ids)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=1e-4, rtol=0)
        # greedy: each generated token is the argmax of the plain forward at its position
        assert out.outputs[0].token_ids == [int(want[len(prompt) + i - 1].argmax()) for i in range(6)]
