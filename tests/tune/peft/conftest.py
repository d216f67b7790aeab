"""Tiny random Hugging Face Llama and Qwen2 models (fp32), built offline in the test."""

import pytest
import torch
import transformers

SIZES = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
}


def build_base(folder, family: str):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = model_cls(config_cls(**SIZES, **extra)).eval()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(params=sorted(FAMILIES))
def base_dir(request, tmp_path):
    return build_base(tmp_path / request.param, request.param)


@pytest.fixture()
def llama_dir(tmp_path):
    return build_base(tmp_path / "llama", "llama")


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def randomize_trainable(model, std: float = 0.1, seed: int = 1) -> None:
    """Give every trainable tensor (adapter, modules_to_save) non-trivial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture()
def input_ids():
    return torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
