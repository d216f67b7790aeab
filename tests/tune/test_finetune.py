import json

import pytest
import torch

from lmforge.config import ConfigError, load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.tune.finetune import SFTConfig, run_sft
from lmforge.tune.sft import collate, encode_chat

CHATS = [
    [{"role": "user", "content": f"What is {a} + {b}?"}, {"role": "assistant", "content": str(a + b)}]
    for a, b in [(12, 34), (40, 2), (7, 8), (25, 25), (30, 11), (19, 3)]
]


@pytest.fixture()
def base_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=96
    )
    folder = tmp_path / "base"
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def test_packed_row_gives_each_example_the_logits_it_has_alone(base_model, tokenizer):
    model = load_pretrained(base_model)
    examples = [encode_chat(tokenizer, chat) for chat in CHATS[:3]]
    batch = collate([examples], pad_id=tokenizer.eos_id, length=96)
    with torch.no_grad():
        packed = model(
            batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"]
        ).logits
        offset = 0
        for example in examples:
            alone = model(torch.tensor([example.input_ids])).logits[0]
            assert torch.allclose(packed[0, offset : offset + len(example)], alone, atol=1e-5)
            offset += len(example)


def test_sft_runs_in_the_trainer_and_exports_a_chat_model(tmp_path, base_model, tokenizer):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS) + "not json\n")
    cfg = load_config(
        SFTConfig,
        data={
            "init_from": str(base_model),
            "run_dir": str(tmp_path / "sft"),
            "max_steps": 60,
            "data": {"seq_len": 96},
            "batch": {"micro_batch_size": 2},
            "optim": {"lr": 1e-2, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "sft": {"paths": [str(data)], "val_paths": [str(data)]},
            "log": {"every_steps": 10, "val_every_steps": 60, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    torch.set_num_threads(1)
    result, stats = run_sft(cfg, progress=False)
    assert stats.examples == 6 and stats.rejected == {"malformed_json": 1}
    assert json.loads((tmp_path / "sft" / "sft_data.json").read_text())["examples"] == 6
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").open() if "loss" in line
    ]
    assert losses[-1] < 0.5 * losses[0]  # six short replies are memorised
    # The exported folder is a Hugging Face one with the chat template: transformers renders chats like we do.
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(result.model_dir)
    assert hf.apply_chat_template(CHATS[0], tokenize=False) == tokenizer.apply_chat_template(CHATS[0])
    tuned = load_pretrained(result.model_dir)
    prompt = tokenizer.apply_chat_template(CHATS[0][:1], add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        first = int(tuned(torch.tensor([ids])).logits[0, -1].argmax())
    example = encode_chat(tokenizer, CHATS[0])
    assert first == next(i for i, trained in zip(example.input_ids, example.trained) if trained)


def test_sft_config_requires_data_and_model():
    with pytest.raises(ConfigError, match=r"sft\.paths"):
        load_config(SFTConfig, data={"init_from": "x"})
    with pytest.raises(ConfigError, match="init_from"):
        load_config(SFTConfig, data={"sft": {"paths": ["a.jsonl"]}})


def test_sft_from_a_transformers_checkpoint(tmp_path, tokenizer):
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=96,
        eos_token_id=tokenizer.eos_id,
    )
    folder = tmp_path / "hf"
    LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        chat_template=tokenizer.chat_template,
    ).save_pretrained(folder)
    data = tmp_path / "chats.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": c[0]["content"], "completion": c[1]["content"]}) + "\n" for c in CHATS)
    )
    cfg = load_config(
        SFTConfig,
        data={
            "init_from": str(folder),
            "run_dir": str(tmp_path / "sft"),
            "max_steps": 2,
            "data": {"seq_len": 96},
            "batch": {"micro_batch_size": 2},
            "sft": {"paths": [str(data)]},
            "log": {"every_steps": 1, "plots": False, "progress": False},
        },
    )
    result, stats = run_sft(cfg, progress=False)
    assert stats.examples == len(CHATS) and result.step == 2
    tuned = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert tuned.config.model_type == "llama"
    assert AutoTokenizer.from_pretrained(result.model_dir).chat_template == tokenizer.chat_template
