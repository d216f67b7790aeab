"""Tiny random Hugging Face Llama and Qwen2 models (fp32), built offline in the test."""

import json

import pytest
import torch
import transformers

from lmforge.model.hf import load_pretrained, save_pretrained

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


CHATS = [
    [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    for a, b in [(12, 34), (40, 2), (7, 8), (25, 25)]
]


def sft_recipe(tmp_path, base, **peft):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    return {
        "init_from": str(base),
        "run_dir": str(tmp_path / "sft"),
        "max_steps": 6,
        "data": {"seq_len": 64},
        "batch": {"micro_batch_size": 2},
        "optim": {"lr": 1e-2},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "sft": {"paths": [str(data)]},
        "log": {"every_steps": 3, "plots": False, "progress": False},
        "checkpoint": {"every_steps": 0},
        "peft": peft,
    }


@pytest.fixture()
def chat_base(tmp_path, tokenizer):
    folder = build_base(tmp_path / "base", "llama")
    model = load_pretrained(folder)  # a vocabulary the test tokenizer fits in
    model.embed_tokens.weight.data = torch.randn(tokenizer.vocab_size, 32) * 0.02
    model.lm_head.weight.data = torch.randn(tokenizer.vocab_size, 32) * 0.02
    model.cfg.vocab_size = tokenizer.vocab_size
    save_pretrained(model, folder)
    tokenizer.save(folder)
    return folder
