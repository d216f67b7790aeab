import json
import math
import random

import pytest
import torch

from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import load_reward_model, save_pretrained
from lmforge.tune.preference import collate_groups, record_to_group
from lmforge.tune.reward import RewardConfig, RewardModel, bradley_terry_loss, center_penalty, run_rm

FILLER = ["tree", "apple", "hello", "world", "letters", "words", "answer"]


def test_bradley_terry_loss_on_hand_computed_cases():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    loss = bradley_terry_loss(chosen, rejected, torch.tensor([0.0, 0.0, 0.5]))
    # -log sigmoid(x) = log(1 + exp(-x)) for x = 1, 0, -1.5
    expected = [math.log(1 + math.exp(-1.0)), math.log(2.0), math.log(1 + math.exp(1.5))]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert center_penalty(chosen, rejected).tolist() == [1.0, 0.0, 25.0]


def separable_pairs(n, seed):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        filler = " ".join(rng.sample(FILLER, 3))
        records.append(
            {
                "prompt": f"What is {rng.randrange(50)} + 1?",
                "chosen": f"{filler} blue",
                "rejected": f"{filler} banana",
            }
        )
    return records


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


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_reward_model_separates_a_separable_preference_set(tmp_path, base_model, tokenizer):
    cfg = load_config(
        RewardConfig,
        data={
            "init_from": str(base_model),
            "run_dir": str(tmp_path / "rm"),
            "max_steps": 40,
            "data": {"seq_len": 64},
            "batch": {"micro_batch_size": 8},
            "optim": {"lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "rm": {
                "paths": [write_jsonl(tmp_path / "train.jsonl", separable_pairs(64, 0))],
                "val_paths": [write_jsonl(tmp_path / "val.jsonl", separable_pairs(32, 1))],
            },
            "log": {"every_steps": 10, "val_every_steps": 40, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    summary = run_rm(cfg, progress=False)
    assert summary["step"] == 40
    assert summary["heldout"]["units"] == 32  # pairs
    assert summary["heldout"]["accuracy"] > 0.9
    assert summary["heldout"]["margin"] > 0
    logged = [json.loads(line) for line in (tmp_path / "rm" / "align_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [10, 20, 30, 40]
    assert logged[-1]["accuracy"] > logged[0]["accuracy"] or logged[0]["accuracy"] == 1.0

    # the export loads back (ours and transformers') with the same scores
    folder = tmp_path / "rm" / "model"
    backbone, score = load_reward_model(folder)
    reloaded = RewardModel(backbone, score).eval()
    groups = [record_to_group(r, tokenizer, 64) for r in separable_pairs(3, 2)]
    batch = collate_groups(groups, tokenizer.pad_id)
    with torch.no_grad():
        ours = reloaded(batch["input_ids"], batch["lengths"])
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification"
    attention_mask = torch.arange(batch["input_ids"].shape[1])[None, :] < batch["lengths"][:, None]
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=attention_mask.long()).logits.squeeze(-1)
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours, theirs)
    assert len(set(torch.round(ours, decimals=3).tolist())) > 1  # not a constant
