"""Golden decoding tests: the engine against ``transformers`` ``generate`` on the same weights.

A tiny random ``LlamaForCausalLM`` is saved with ``save_pretrained`` and loaded with our ``load_pretrained``;
greedy, penalties, n-gram blocking and beam search must give identical token ids. The vocabulary is small so
that EOS is a frequent candidate and beams really finish (and early stopping really matters).
"""

import pytest
import torch
import transformers

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.model.hf import load_pretrained

from .helpers import random_prompts

VOCAB, EOS = 32, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(folder)
    ours = load_pretrained(folder)
    engine = LLMEngine(ours, None, EngineConfig(num_blocks=512, block_size=4), eos_token_ids=[EOS])
    return hf, engine


PROMPTS = random_prompts([6, 11, 3], vocab=VOCAB, seed=4)


def _hf_generate(hf, prompt: list[int], **kwargs) -> torch.Tensor:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        return hf.generate(
            ids, attention_mask=torch.ones_like(ids), eos_token_id=EOS, pad_token_id=0, **kwargs
        )


def _hf_new_tokens(row: torch.Tensor, prompt_len: int) -> list[int]:
    """Generated ids up to and including the first EOS (HF pads finished rows afterwards)."""
    new = row[prompt_len:].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"repetition_penalty": 1.5},
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 0.8, "no_repeat_ngram_size": 3},
    ],
    ids=["greedy", "repetition-penalty", "no-repeat-2gram", "penalty-and-3gram"],
)
def test_greedy_family_matches_transformers(models, settings):
    hf, engine = models
    params = SamplingParams(max_tokens=16, temperature=0.0, detokenize=False, **settings)
    outs = engine.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        row = _hf_generate(hf, prompt, do_sample=False, max_new_tokens=16, **settings)[0]
        assert out.outputs[0].token_ids == _hf_new_tokens(row, len(prompt))


@pytest.mark.parametrize(
    ("length_penalty", "early_stopping", "extra"),
    [
        (1.0, False, {}),
        (0.5, True, {}),
        (2.0, "never", {}),
        (1.0, False, {"no_repeat_ngram_size": 2, "repetition_penalty": 1.2}),
    ],
)
def test_beam_search_matches_transformers(models, length_penalty, early_stopping, extra):
    hf, engine = models
    params = SamplingParams(
        n=3,
        best_of=4,
        use_beam_search=True,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        max_tokens=12,
        detokenize=False,
        **extra,
    )
    outs = engine.generate(PROMPTS, params)
    finished_early = 0
    for prompt, out in zip(PROMPTS, outs):
        result = _hf_generate(
            hf,
            prompt,
            do_sample=False,
            num_beams=4,
            num_return_sequences=3,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            max_new_tokens=12,
            output_scores=True,
            return_dict_in_generate=True,
            **extra,
        )
        expected = [_hf_new_tokens(row, len(prompt)) for row in result.sequences]
        assert [c.token_ids for c in out.outputs] == expected
        scores = [c.cumulative_logprob for c in out.outputs]
        assert scores == pytest.approx(result.sequences_scores.tolist(), abs=1e-4)
        finished_early += any(c.token_ids[-1] == EOS for c in out.outputs)
    assert finished_early  # some hypotheses ended with EOS, so the finishing rules were exercised
    assert engine.block_manager.num_used_blocks == 0


FAMILY_CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=EOS
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    ),
    "mistral-sliding-window": lambda: transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=EOS,
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_local_experts=4,
        num_experts_per_tok=2,
        bos_token_id=1,
        eos_token_id=EOS,
    ),
}


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_batched_greedy_matches_transformers_across_families(family, tmp_path):
    """Learned positions (GPT-2), QKV biases (Qwen2), a sliding window shorter than the sequences (Mistral)
    and MoE layers (Mixtral), all through one mixed batch."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(FAMILY_CONFIGS[family]()).eval()
    hf.save_pretrained(tmp_path)
    engine = LLMEngine(load_pretrained(tmp_path), None, EngineConfig(num_blocks=256, block_size=4), [EOS])
    prompts = random_prompts([5, 20, 13, 2], vocab=VOCAB, seed=7)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, detokenize=False))
    for prompt, out in zip(prompts, outs):
        row = _hf_generate(hf, prompt, do_sample=False, max_new_tokens=16)[0]
        assert out.outputs[0].token_ids == _hf_new_tokens(row, len(prompt))
