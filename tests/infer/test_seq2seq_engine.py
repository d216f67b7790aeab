"""An encoder-decoder (T5) served by the engine: each request's source encoded once, the decoder batched in
the paged cache; greedy outputs equal transformers' generate on the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from lmforge.infer import EngineConfig, LLMEngine, SamplingParams
from lmforge.infer.sampling_params import InvalidRequestError
from lmforge.model import load_pretrained

MAX_NEW = 12


@pytest.fixture(scope="module", params=["t5", "t5-v1_1"])
def folder(request, tmp_path_factory):
    torch.manual_seed(0)
    style = {
        "t5": {"feed_forward_proj": "relu"},
        "t5-v1_1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
    }
    cfg = transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, **style[request.param],
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # sharper logits than the default init, so EOS comes at different steps
        model.lm_head.weight.mul_(8.0)
        model.shared.weight.mul_(2.0)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    return out


def sources() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 96, (n,), generator=g).tolist() for n in (5, 19, 11, 30)]


def test_greedy_serving_equals_transformers_generate(folder):
    hf = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    engine = LLMEngine(
        load_pretrained(folder), None, EngineConfig(num_blocks=64, block_size=4, max_num_seqs=3)
    )
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, detokenize=False)
    outs = engine.generate(sources(), params)  # four requests, three at a time
    for source, out in zip(sources(), outs):
        with torch.no_grad():
            want = hf.generate(torch.tensor([source]), max_new_tokens=MAX_NEW, do_sample=False)[
                0, 1:
            ].tolist()
        assert out.outputs[0].token_ids == want[: len(out.outputs[0].token_ids)]
        stopped = out.outputs[0].finish_reason == "stop"
        assert len(out.outputs[0].token_ids) == (want.index(1) + 1 if stopped else MAX_NEW)
        assert out.prompt_token_ids == source
    assert engine.stats().kv_blocks_used == 0 and not engine.cross.kv


def test_sampled_requests_run_and_unsupported_ones_are_refused(folder):
    engine = LLMEngine(load_pretrained(folder), None, EngineConfig(num_blocks=64, block_size=4))
    out = engine.generate(
        sources()[:2], SamplingParams(max_tokens=6, temperature=1.0, seed=1, detokenize=False)
    )
    assert all(1 <= len(o.outputs[0].token_ids) <= 6 for o in out)
    with pytest.raises(InvalidRequestError, match="encoder-decoder"):
        engine.make_request(None, [5, 6], SamplingParams(n=2))
