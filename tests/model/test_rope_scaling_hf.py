"""Logit parity with transformers for every rope_type it implements, past the original training length."""

import dataclasses
import json

import pytest
import torch
import transformers

from lmforge.model import ContiguousKVCache, ModelConfig
from lmforge.model.hf import ModelLoadError, config_from_hf, hf_family, load_pretrained, save_pretrained

ORIGINAL = 16  # training length the scalings extend; the test runs 40 positions
SCALINGS = {
    "linear": ({"rope_type": "linear", "factor": 4.0}, 64),
    # dynamic extends from max_position_embeddings itself
    "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, ORIGINAL),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 64),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
        64,
    ),
    # no factor: transformers derives it (64 / 16) and the attention factor from it
    "longrope": (
        {
            "rope_type": "longrope",
            "short_factor": [1.0, 1.1, 1.3, 1.6],
            "long_factor": [1.0, 2.0, 4.0, 8.0],
            "original_max_position_embeddings": ORIGINAL,
        },
        64,
    ),
}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
TOLERANCE = 1e-4


def _hf_model(family: str, kind: str, folder):
    scaling, max_positions = SCALINGS[kind]
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        rope_scaling=dict(scaling),
        rope_theta=1000.0,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    model.save_pretrained(folder)
    return model


def _max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", sorted(SCALINGS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scaled_rope_logits_match_transformers_past_the_training_length(family, kind, tmp_path):
    """Full forward, cached decoding (prefill inside the training length, then one token at a time past
    it, so dynamic/longrope switch mid-cache exactly as transformers does) and the exported folder."""
    hf = _hf_model(family, kind, tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.cfg.rope_scaling["rope_type"] == kind
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        step = hf(ids[:, :12], use_cache=True)
        want_cached = [step.logits]
        for i in range(12, 40):
            step = hf(ids[:, i : i + 1], cache=step.cache, use_cache=True)
            want_cached.append(step.logits)
        want = hf(ids).logits

        assert _max_diff(ours(ids).logits, want) <= TOLERANCE
        cache = ContiguousKVCache.for_model(ours.cfg, batch=2, max_len=40)
        pieces = [ours(ids[:, :12], cache=cache).logits]
        pieces += [ours(ids[:, i : i + 1], cache=cache).logits for i in range(12, 40)]
        assert _max_diff(torch.cat(pieces, dim=1), torch.cat(want_cached, dim=1)) <= TOLERANCE

    assert save_pretrained(ours, tmp_path / "out") == family
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["rope_scaling"]["rope_type"] == kind
    reloaded = FAMILIES[family][1].from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert _max_diff(reloaded(ids).logits, want) <= TOLERANCE


def test_rope_parameters_format_and_a_top_level_original_length_are_read():
    hf = {
        "model_type": "llama",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 8,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0},
    }
    cfg = config_from_hf(hf)
    assert cfg.rope_theta == 500.0
    assert cfg.rope_scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8}
    with pytest.raises(ModelLoadError, match="'su'"):
        config_from_hf({**hf, "rope_parameters": {"rope_type": "su"}})


def test_base_truncation_has_no_hugging_face_family():
    cfg = ModelConfig(
        vocab_size=128, d_model=32, n_heads=4, n_layers=1, rope_scaling={"rope_type": "truncate"}
    )
    assert hf_family(cfg) is None
    assert hf_family(dataclasses.replace(cfg, rope_scaling=None)) == "llama"
