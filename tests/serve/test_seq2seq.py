"""An encoder-decoder behind /v1/completions: the reply is the model's own greedy decoding of the prompt."""

from __future__ import annotations

import httpx
import torch

from lmforge.infer import EngineConfig, LLMEngine
from lmforge.model.t5 import T5Config, T5Model, generate
from tests.serve.live_server import MODEL_ID, running_server


def test_completions_from_an_encoder_decoder(tokenizer):
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=tokenizer.vocab_size, d_model=32, head_dim=8, d_ff=48, n_layers=2, n_heads=4,
        eos_token_id=tokenizer.eos_id, pad_token_id=0, decoder_start_token_id=0, max_seq_len=96,
        tie_embeddings=False, feed_forward_proj="gated-gelu",
    )  # fmt: skip
    model = T5Model(cfg).eval()
    with torch.no_grad():  # sharper logits than the init's, so the reply is more than one repeated token
        model.lm_head.weight.normal_(0.0, 1.0)
    prompt = "The quick brown fox"
    source = tokenizer.encode(prompt, add_special_tokens=True)  # as the server tokenizes a prompt
    want = generate(model, torch.tensor([source]), max_new_tokens=8)[0, 1:].tolist()
    if tokenizer.eos_id in want:
        want = want[: want.index(tokenizer.eos_id)]
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=64, block_size=8))
    with running_server(lambda: engine) as running:
        body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 8, "temperature": 0}
        reply = httpx.post(f"{running.base_url}/v1/completions", json=body, timeout=30).json()
    assert len(set(want)) > 1
    assert reply["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert reply["usage"]["prompt_tokens"] == len(source)
