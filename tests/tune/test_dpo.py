import json
import math
import random

import pytest
import torch

from lmforge.config import load_config
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import load_pretrained, save_pretrained
from lmforge.tune.dpo import DPOConfig, dpo_loss, sequence_logps

# policy chosen/rejected, reference chosen/rejected: h = (-1 + 2) - (-3 + 2) = 2
CASE = [torch.tensor([x]) for x in (-1.0, -3.0, -2.0, -2.0)]


@pytest.mark.parametrize(
    ("loss_type", "eps", "expected"),
    [
        ("sigmoid", 0.0, math.log(1 + math.exp(-0.2))),  # -log σ(0.2) = 0.598139
        ("sigmoid", 0.1, 0.9 * 0.5981388693 + 0.1 * 0.7981388693),  # cDPO: ... - 0.1 log σ(-0.2)
        ("robust", 0.1, (0.9 * 0.5981388693 - 0.1 * 0.7981388693) / 0.8),
        ("hinge", 0.0, 0.8),  # max(0, 1 - 0.1 * 2)
        ("ipo", 0.0, 9.0),  # (2 - 1 / (2 * 0.1))^2
    ],
)
def test_dpo_losses_on_hand_computed_cases(loss_type, eps, expected):
    loss = dpo_loss(*CASE, beta=0.1, loss_type=loss_type, label_smoothing=eps)
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_dpo_loss_gradient_favours_the_chosen_reply():
    policy_chosen = torch.tensor([-2.0], requires_grad=True)
    policy_rejected = torch.tensor([-2.0], requires_grad=True)
    dpo_loss(policy_chosen, policy_rejected, torch.tensor([-2.0]), torch.tensor([-2.0])).sum().backward()
    # at h = 0: d/dh -log σ(βh) = -β/2
    assert float(policy_chosen.grad) == pytest.approx(-0.05) and float(policy_rejected.grad) == pytest.approx(
        0.05
    )


def test_sequence_logps_sums_reply_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.log_softmax(logits, -1)
    expected = [sum(float(logp[r, t - 1, ids[r, t]]) for t in range(5) if mask[r, t]) for r in range(2)]
    assert sequence_logps(logits, ids, mask).tolist() == pytest.approx(expected, abs=1e-5)
    assert sequence_logps(logits, ids, mask, mean=True).tolist() == pytest.approx(
        [expected[0] / 2, expected[1] / 4], abs=1e-5
    )


FILLER = ["tree", "apple", "hello", "world", "letters", "words"]


def pairs(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        filler = " ".join(rng.sample(FILLER, 2))
        out.append(
            {
                "prompt": f"What is {rng.randrange(50)} + 1?",
                "chosen": f"{filler} blue",
                "rejected": f"{filler} banana",
            }
        )
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_dpo_raises_the_chosen_vs_rejected_margin(tmp_path, tokenizer):
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64
    )
    base = tmp_path / "base"
    save_pretrained(Transformer(model_cfg), base)
    tokenizer.save(base)
    cfg = load_config(
        DPOConfig,
        data={
            "init_from": str(base),
            "run_dir": str(tmp_path / "dpo"),
            "max_steps": 30,
            "data": {"seq_len": 64},
            "batch": {"micro_batch_size": 8},
            "optim": {"lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "dpo": {
                "paths": [write_jsonl(tmp_path / "train.jsonl", pairs(48, 0))],
                "val_paths": [write_jsonl(tmp_path / "val.jsonl", pairs(16, 1))],
                "beta": 0.1,
            },
            "log": {"every_steps": 10, "val_every_steps": 30, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    from lmforge.tune.dpo import run_dpo

    summary = run_dpo(cfg, progress=False)
    heldout = summary["heldout"]
    assert heldout["units"] == 16
    assert heldout["accuracy"] > 0.9 and heldout["margin"] > 0.5  # the reference starts at margin 0
    assert heldout["loss"] < math.log(2) - 0.1  # -log σ(0) at the start
    logged = [
        json.loads(line) for line in (tmp_path / "dpo" / "align_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged] == [10, 20, 30]
    assert logged[-1]["margin"] > logged[0]["margin"]
    assert {"accuracy", "margin", "chosen", "rejected", "logps_chosen"} <= set(logged[0])

    # the exported causal LM itself prefers the chosen reply more than the reference does
    from lmforge.tune.preference import collate_groups, record_to_group

    batch = collate_groups([record_to_group(r, tokenizer, 64) for r in pairs(8, 2)], tokenizer.pad_id)
    margins = []
    for folder in (base, summary["model_dir"]):
        with torch.no_grad():
            logps = sequence_logps(
                load_pretrained(folder)(batch["input_ids"]).logits, batch["input_ids"], batch["response_mask"]
            )
        margins.append(float((logps[batch["chosen_index"]] - logps[batch["rejected_index"]]).mean()))
    assert margins[1] > margins[0] + 5.0
