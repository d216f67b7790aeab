import pytest
import torch

from lmforge.model import Transformer
from lmforge.model.presets import get_preset, list_presets

PUBLISHED_PARAMETERS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "mistral-7b": 7_241_732_096,
    "qwen2-7b": 7_615_616_512,
    "qwen2-1.5b": 1_543_714_304,
    "mixtral-8x7b": 46_702_792_704,
}


@pytest.mark.parametrize(("name", "published"), sorted(PUBLISHED_PARAMETERS.items()))
def test_presets_have_the_published_parameter_counts(name, published):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    assert model.num_parameters() == published


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("tiny-")])
def test_tiny_presets_run(name):
    cfg = get_preset(name)
    assert cfg.vocab_size <= 1024 and cfg.d_model <= 64 and cfg.n_layers == 2
    logits = Transformer(cfg)(torch.randint(0, cfg.vocab_size, (1, 5))).logits
    assert logits.shape == (1, 5, cfg.vocab_size) and torch.isfinite(logits).all()


def test_llama3_preset_scales_rope():
    assert get_preset("llama3-8b").rope_scaling["rope_type"] == "llama3"


def test_overrides_and_fresh_copies():
    cfg = get_preset("tiny-llama", n_layers=3)
    assert cfg.n_layers == 3
    cfg.rope_theta = 1.0
    assert get_preset("tiny-llama").rope_theta == 10000.0


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown model preset 'llama9'.*gpt2.*tiny-llama"):
        get_preset("llama9")
