"""Virtual tokens (prompt tuning, P-tuning, prefix tuning): text init, KV-cache decoding, SFT, no merging."""

import json

import pytest
import torch

from lmforge.config import load_config
from lmforge.model import ContiguousKVCache
from lmforge.model.hf import load_pretrained
from lmforge.tune.finetune import SFTConfig, run_sft
from lmforge.tune.peft import AdapterConfigError, PeftConfig, apply_peft, merge_adapter, read_adapter_config

from .conftest import sft_recipe


def test_text_init_copies_the_texts_token_embeddings_repeated_to_length(chat_base, tokenizer):
    cfg = PeftConfig(
        method="prompt_tuning",
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Hello world",
        tokenizer_name_or_path=str(chat_base),
    )
    model = apply_peft(load_pretrained(chat_base), cfg)
    ids = tokenizer.encode("Hello world")
    expected = (ids * 7)[:7]
    assert torch.equal(model.prompt_encoder(), model.embed_tokens.weight[expected])


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_cached_decoding_sees_the_prompt_once(llama_dir, method, input_ids):
    model = apply_peft(load_pretrained(llama_dir), PeftConfig(method=method, num_virtual_tokens=3))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = ContiguousKVCache.for_model(model.cfg, batch=2, max_len=32)
        first = model(input_ids[:, :8], cache=cache).logits
        rest = [model(input_ids[:, i : i + 1], cache=cache).logits for i in range(8, input_ids.shape[1])]
    assert torch.allclose(torch.cat([first, *rest], dim=1), full, atol=1e-5)


def test_a_soft_prompt_cannot_be_merged(llama_dir):
    model = apply_peft(load_pretrained(llama_dir), PeftConfig(method="prompt_tuning"))
    with pytest.raises(AdapterConfigError, match="no weights to merge into"):
        merge_adapter(model)


@pytest.mark.parametrize(
    ("method", "peft_type", "token_dim"),
    [("prompt_tuning", "PROMPT_TUNING", 32), ("prefix_tuning", "PREFIX_TUNING", 16)],
)
def test_sft_trains_virtual_tokens_and_exports_them(tmp_path, chat_base, method, peft_type, token_dim):
    torch.set_num_threads(1)
    recipe = sft_recipe(tmp_path, chat_base, method=method, num_virtual_tokens=4)
    recipe["sft"]["pack"] = False
    result, _ = run_sft(load_config(SFTConfig, data=recipe), progress=False)
    cfg, _ = read_adapter_config(result.model_dir)
    assert (cfg.method, cfg.num_virtual_tokens) == (method, 4)
    config = json.loads((result.model_dir / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == peft_type and config["token_dim"] == token_dim
    )  # prefix: the k/v width (GQA)
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").open() if "loss" in line
    ]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_cache_without_lengths_is_refused_not_silently_skipped(llama_dir, method, input_ids):
    class NoLengths:
        def update(self, layer, keys, values, positions):
            raise AssertionError("never reached")

    model = apply_peft(load_pretrained(llama_dir), PeftConfig(method=method))
    with pytest.raises(ValueError, match=r"the KV cache has no lengths\(\)"):
        model(input_ids, position_ids=torch.arange(12).expand(2, 12), cache=NoLengths())
