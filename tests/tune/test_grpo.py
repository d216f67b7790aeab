import json
import math
from collections import Counter

import pytest
import torch

from lmforge.config import ConfigError, load_config
from lmforge.demo.rl import engine_rollouts
from lmforge.infer.rollout import EngineRollouts
from lmforge.infer.sampling_params import SamplingParams
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tune.grpo import (
    GRPOConfig,
    GRPOObjective,
    contains_reward,
    exact_answer,
    format_reward,
    group_advantages,
    grpo_token_loss,
    k3_kl,
    load_rl_prompts,
    run_grpo,
)


def test_group_advantages_on_hand_computed_cases():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    # mean 0.5, std (Bessel) sqrt(1/3): +-0.5 / 0.57735 = +-0.8660; a group of equal rewards: 0
    assert adv[0].tolist() == pytest.approx([0.8659, -0.8659, -0.8659, 0.8659], abs=2e-4)
    assert adv[1].tolist() == [0.0] * 4


def test_clipped_surrogate_and_k3_on_hand_computed_cases():
    old = torch.zeros(4)
    logps = torch.tensor([0.0, 0.5, 0.5, -0.5])
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0])
    loss = grpo_token_loss(logps, old, adv, eps_low=0.2, eps_high=0.2)
    # r = 1, e^0.5 = 1.6487 (clipped to 1.2 for A > 0, not for A < 0: min picks -1.6487), e^-0.5 = 0.6065
    assert loss.tolist() == pytest.approx([-2.0, -1.2, math.exp(0.5), -math.exp(-0.5)], abs=1e-5)
    # DAPO clip-higher: a wider upper range lets the positive-advantage token move further
    assert float(grpo_token_loss(logps[1:2], old[1:2], adv[1:2], 0.2, 0.28)) == pytest.approx(-1.28)
    assert float(k3_kl(torch.tensor(-1.0), torch.tensor(-2.0))) == pytest.approx(math.exp(-1), abs=1e-6)
    assert float(k3_kl(torch.tensor(-1.0), torch.tensor(-1.0))) == 0.0
    with_kl = grpo_token_loss(logps[:1], old[:1], adv[:1], ref_logps=torch.tensor([-1.0]), kl_coef=0.5)
    assert float(with_kl) == pytest.approx(-2.0 + 0.5 * (math.exp(-1) + 1 - 1), abs=1e-6)


def test_loss_is_aggregated_over_tokens_not_replies():
    class Uniform(torch.nn.Module):  # log p = -log 4 everywhere
        def forward(self, ids):
            return type("Out", (), {"logits": torch.zeros(*ids.shape, 4)})()

    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)  # 1 and 4 reply tokens
    batch = {
        "input_ids": ids,
        "completion_mask": mask,
        "old_logps": torch.full((2, 5), -math.log(4)),
        "advantages": torch.tensor([1.0, -1.0]),
    }
    out = GRPOObjective()(Uniform(), batch)
    assert out.count == 5
    assert float(out.loss_sum) == pytest.approx(-1.0 + 4.0)  # per token: -A; the longer reply weighs 4x


def test_reward_functions():
    assert exact_answer(" 46 ", {"answer": 46}) == 1.0 and exact_answer("45", {"answer": "46"}) == 0.0
    assert exact_answer("46", {}) == 0.0
    fmt = format_reward(r"<answer>\d+</answer>")
    assert fmt("<answer>12</answer>\n", {}) == 1.0 and fmt("12", {}) == 0.0
    assert contains_reward("blue")("a blue tree", {}) == 1.0


@pytest.fixture()
def base_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64
    )
    folder = tmp_path / "base"
    save_pretrained(Transformer(cfg), folder)
    tokenizer.save(folder)
    return folder


def greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_engine_greedy_equals_the_trainer_model_right_after_a_push(tokenizer):
    torch.manual_seed(0)
    policy = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64
        )
    )
    rollouts = EngineRollouts(tokenizer, max_new_tokens=12)
    rollouts.push_weights(policy)
    engine_model = rollouts.engine.model
    prompt = tokenizer.encode("What is 12 + 34?")
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, detokenize=False)
    before = rollouts.engine.generate([prompt], params)[0].outputs[0].token_ids
    assert before == greedy(policy, prompt, 12)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)  # a large update: greedy output changes
    for _ in range(3):
        policy(torch.tensor([prompt])).logits.logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after_policy = greedy(policy, prompt, 12)
    assert after_policy != before
    rollouts.push_weights(policy)
    assert rollouts.engine.model is engine_model  # in place: the same engine and model objects
    assert rollouts.engine.generate([prompt], params)[0].outputs[0].token_ids == after_policy


def test_rl_prompts_and_rejects(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    records = [
        {"prompt": "What is 1 + 1?", "answer": "2"},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"answer": "2"},
        {"prompt": "x " * 100},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rejected = Counter()
    prompts = load_rl_prompts([path], tokenizer, 40, rejected, tmp_path / "rejects.jsonl")
    assert [p.record.get("answer") for p in prompts] == ["2", None]
    assert tokenizer.decode(prompts[0].input_ids).endswith("<|im_start|>assistant\n")
    assert rejected == {"missing prompt": 1, "over max_prompt_len": 1}
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 2
    with pytest.raises(ConfigError, match="format_pattern"):
        load_config(GRPOConfig, data={"init_from": "x", "grpo": {"paths": ["p"], "rewards": {"format": 1.0}}})
    for bad in ({"temperature": 0.0}, {"max_new_tokens": 0}, {"kl_coef": float("nan")}):
        grpo = {"paths": ["p"], "rewards": {"exact_answer": 1.0}, **bad}
        with pytest.raises(ConfigError, match=f"grpo.{'kl_coef' if 'kl_coef' in bad else next(iter(bad))}"):
            load_config(GRPOConfig, data={"init_from": "x", "grpo": grpo})


def test_grpo_raises_a_toy_reward(tmp_path, base_model, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(16)))
    cfg = load_config(
        GRPOConfig,
        data={
            "init_from": str(base_model),
            "run_dir": str(tmp_path / "grpo"),
            "max_steps": 30,
            "data": {"seq_len": 64},
            "batch": {"micro_batch_size": 4},
            "optim": {"lr": 1e-2, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "grpo": {
                "paths": [str(path)],
                "group_size": 8,
                "max_new_tokens": 8,
                "rewards": {"contains": 1.0},
                "contains": "blue",
            },
            "log": {"every_steps": 5, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    summary = run_grpo(cfg, engine_rollouts, progress=False)
    assert summary["step"] == 30
    logged = [
        json.loads(line) for line in (tmp_path / "grpo" / "align_metrics.jsonl").read_text().splitlines()
    ]
    assert logged[0]["reward"] < 0.3
    assert logged[-1]["reward"] > 0.8
    assert {"reward/contains", "completion_len", "clip_fraction"} <= set(logged[-1]) and "kl" not in logged[
        -1
    ]


def test_grpo_with_a_reward_model_and_the_k3_kl(tmp_path, base_model, tokenizer):
    from lmforge.model.hf import load_pretrained, save_reward_model

    backbone = load_pretrained(base_model)
    rm_folder = tmp_path / "rm"
    save_reward_model(
        backbone, torch.randn(1, backbone.cfg.d_model), rm_folder, pad_token_id=tokenizer.pad_id
    )
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4))
    )
    cfg = load_config(
        GRPOConfig,
        data={
            "init_from": str(base_model),
            "run_dir": str(tmp_path / "grpo"),
            "max_steps": 2,
            "data": {"seq_len": 64},
            "batch": {"micro_batch_size": 2},
            "grpo": {
                "paths": [str(path)],
                "group_size": 2,
                "max_new_tokens": 4,
                "kl_coef": 0.1,
                "rewards": {"exact_answer": 1.0},
                "reward_model": str(rm_folder),
            },
            "log": {"every_steps": 1, "plots": False, "progress": False},
            "checkpoint": {"every_steps": 0},
        },
    )
    assert run_grpo(cfg, engine_rollouts, progress=False)["step"] == 2
    logged = [
        json.loads(line) for line in (tmp_path / "grpo" / "align_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged] == [1, 2]
    assert {"reward/model", "reward/exact_answer", "kl", "clip_fraction"} <= set(logged[-1])
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first update starts from the reference


def test_a_recipes_rewards_replace_the_default_instead_of_joining_it():
    from lmforge.config import load_config
    from lmforge.tune.grpo import GRPOConfig

    base = {"init_from": "x", "run_dir": "/tmp/unused", "grpo": {"paths": ["p.jsonl"]}}
    assert load_config(GRPOConfig, data=base).grpo.reward_weights == {"exact_answer": 1.0}
    chosen = {**base, "grpo": {"paths": ["p.jsonl"], "rewards": {"contains": 1.0}, "contains": "apple"}}
    assert load_config(GRPOConfig, data=chosen).grpo.reward_weights == {"contains": 1.0}
    with_rm = {**base, "grpo": {"paths": ["p.jsonl"], "reward_model": "rm"}}
    assert load_config(GRPOConfig, data=with_rm).grpo.reward_weights == {}
