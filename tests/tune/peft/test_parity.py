"""Adapters move between lmforge and the peft library with the same logits, both ways."""

import pytest
import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

from lmforge.model.hf import load_pretrained
from lmforge.tune.peft import PeftConfig, apply_peft, load_adapter, read_adapter_config, save_adapter

from .conftest import hf_model, randomize_trainable

TOLERANCE = 1e-4
CONFIGS = {
    "lora": dict(method="lora", r=4, lora_alpha=8),
    "lora-rslora-patterns-embedding-head": dict(
        method="lora",
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"],
        rank_pattern={"o_proj": 2, r"layers\.1\.self_attn\.q_proj": 3},
        alpha_pattern={"v_proj": 4},
        modules_to_save=["lm_head"],
    ),
    "dora-all-linear": dict(method="lora", r=4, lora_alpha=8, use_dora=True, target_modules="all-linear"),
    "lora-regex": dict(method="lora", r=2, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj"),
    "lora-trainable-tokens": dict(method="lora", r=2, lora_alpha=4, trainable_token_indices=[90, 91, 95]),
    "lora-trainable-tokens-head": dict(
        method="lora",
        r=2,
        lora_alpha=4,
        trainable_token_indices={"embed_tokens": [3, 90], "lm_head": [90, 93]},
    ),
    "ia3": dict(method="ia3"),
    "ia3-custom": dict(method="ia3", target_modules=["q_proj", "up_proj"], feedforward_modules=["up_proj"]),
    "prefix-tuning": dict(method="prefix_tuning", num_virtual_tokens=3),
    "prefix-tuning-projection": dict(
        method="prefix_tuning", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    ),
    "prompt-tuning": dict(method="prompt_tuning", num_virtual_tokens=4),
    "p-tuning-mlp": dict(method="p_tuning", num_virtual_tokens=3, encoder_hidden_size=16),
    "p-tuning-lstm": dict(
        method="p_tuning",
        num_virtual_tokens=3,
        encoder_hidden_size=16,
        encoder_reparameterization_type="LSTM",
    ),
}
PEFT_CONFIGS = {
    "lora": LoraConfig,
    "ia3": IA3Config,
    "prompt_tuning": PromptTuningConfig,
    "p_tuning": PromptEncoderConfig,
    "prefix_tuning": PrefixTuningConfig,
}


def _peft_config(spec: dict):
    spec = dict(spec)
    return PEFT_CONFIGS[spec.pop("method")](task_type="CAUSAL_LM", **spec)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_an_lmforge_adapter_loads_in_peft_with_the_same_logits(name, base_dir, tmp_path, input_ids):
    model = apply_peft(load_pretrained(base_dir), PeftConfig(**CONFIGS[name]))
    randomize_trainable(model)
    save_adapter(model, tmp_path / "adapter", str(base_dir))
    with torch.no_grad():
        ours = model(input_ids).logits

    theirs_model = PeftModel.from_pretrained(hf_model(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = theirs_model(input_ids=input_ids).logits[
            :, -input_ids.shape[1] :
        ]  # less soft-prompt positions
        base = hf_model(base_dir)(input_ids=input_ids).logits
    assert (theirs - base).abs().max() > 10 * TOLERANCE  # the adapter is really applied
    assert (ours - theirs).abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_peft_adapter_loads_in_lmforge_with_the_same_logits(name, base_dir, tmp_path, input_ids):
    theirs_model = get_peft_model(hf_model(base_dir), _peft_config(CONFIGS[name])).eval()
    randomize_trainable(theirs_model)
    theirs_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = theirs_model(input_ids=input_ids).logits[:, -input_ids.shape[1] :]

    cfg, base_path = read_adapter_config(tmp_path / "adapter")
    assert base_path == str(base_dir)
    model = load_adapter(load_pretrained(base_dir), tmp_path / "adapter", cfg)
    with torch.no_grad():
        ours = model(input_ids).logits
    assert (ours - theirs).abs().max() <= TOLERANCE
