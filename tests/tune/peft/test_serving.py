"""A peft LoRA folder read as served-adapter tensors gives peft's own logits once folded into the weights."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from lmforge.model.hf import load_pretrained
from lmforge.tune.peft.config import AdapterConfigError
from lmforge.tune.peft.serving import lora_weights
from tests.tune.peft.conftest import hf_model, randomize_trainable


@pytest.mark.parametrize("use_rslora", [False, True])
def test_the_tensors_reproduce_the_peft_model(base_dir, tmp_path, input_ids, use_rslora):
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3},
        use_rslora=use_rslora,
    )
    wrapped = peft.get_peft_model(hf_model(base_dir), config)
    randomize_trainable(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = wrapped(input_ids).logits

    model = load_pretrained(base_dir).eval()
    weights = lora_weights(model.cfg, tmp_path / "adapter")
    assert len(weights) == 3 * model.cfg.n_layers
    assert weights["blocks.0.mlp.down_proj"][0].shape[0] == 2  # rank_pattern
    with torch.no_grad():
        for name, (a, b, scale) in weights.items():
            model.get_submodule(name).weight += scale * (b @ a)
        got = model(input_ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_adapters_that_cannot_be_served_side_by_side_are_refused(base_dir, tmp_path):
    model = load_pretrained(base_dir)
    for name, config in {
        "dora": peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "ia3": peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    }.items():
        peft.get_peft_model(hf_model(base_dir), config).save_pretrained(tmp_path / name)
        with pytest.raises(AdapterConfigError, match="merge"):
            lora_weights(model.cfg, tmp_path / name)
    peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "other"
    )
    config = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    small = model.cfg.__class__(**{**model.cfg.__dict__, "d_model": 16, "n_heads": 2, "n_kv_heads": 1})
    with pytest.raises(AdapterConfigError, match="different base model"):
        lora_weights(small, tmp_path / "other")
    assert config["peft_type"] == "LORA"
