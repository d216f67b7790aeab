"""PPO: the pure functions against hand-computed cases and trl's formulas (trl's ``PPOTrainer`` /
``AdaptiveKLController``; trl is not installed here, so its formulas are quoted next to each check), the
recipe's key checks, and a run that raises a toy reward through the engine."""

import json
import math

import pytest
import torch

from lmforge.config import ConfigError, load_config
from lmforge.demo.rl import ppo_engine_rollouts
from lmforge.model import ModelConfig, Transformer
from lmforge.model.hf import save_pretrained
from lmforge.tune.ppo import (
    AdaptiveKLController,
    PolicyWithValue,
    PPOConfig,
    PPOObjective,
    entropy_from_logits,
    gae,
    kl_estimate,
    ppo_policy_loss,
    ppo_value_loss,
    run_ppo,
    token_rewards,
    whiten,
)


def test_gae_on_a_hand_computed_case():
    # one reply of 3 tokens then padding; gamma 1, lambda 0.95; the reward 1 at the last token
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the padded position's value must be ignored
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta_2 = 1 + 0 - 0.4 = 0.6; delta_1 = 0 + 0.4 - 0.2 = 0.2; delta_0 = 0 + 0.2 - 0.5 = -0.3
    # A_2 = 0.6; A_1 = 0.2 + 0.95 * 0.6 = 0.77; A_0 = -0.3 + 0.95 * 0.77 = 0.4315
    assert adv[0].tolist() == pytest.approx([0.4315, 0.77, 0.6, 0.0], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.9315, 0.97, 1.0, 0.0], abs=1e-6)
    # lambda 1: A_t = the return-to-go minus V_t (Monte Carlo); lambda 0: the one-step TD error
    assert gae(rewards, values, mask, 1.0, 1.0)[0][0, :3].tolist() == pytest.approx([0.5, 0.8, 0.6])
    assert gae(rewards, values, mask, 1.0, 0.0)[0][0, :3].tolist() == pytest.approx([-0.3, 0.2, 0.6])


def test_gae_matches_trls_loop_on_random_rows():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    lengths = [7, 4, 1]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    for row, n in enumerate(lengths):  # trl: lastgaelam over the reply alone, nextvalues 0 after its end
        last, expected = 0.0, [0.0] * n
        for t in reversed(range(n)):
            next_value = float(values[row, t + 1]) if t < n - 1 else 0.0
            delta = float(rewards[row, t]) + 0.9 * next_value - float(values[row, t])
            last = delta + 0.9 * 0.95 * last
            expected[t] = last
        assert adv[row, :n].tolist() == pytest.approx(expected, abs=1e-5)
        assert ret[row, :n].tolist() == pytest.approx([e + float(v) for e, v in zip(expected, values[row])])
        assert adv[row, n:].abs().sum() == 0


def test_kl_penalty_and_token_rewards():
    logps, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -2.0, -0.2]])
    k1 = kl_estimate(logps, ref, "k1")
    assert k1[0].tolist() == pytest.approx([0.5, 0.0, -0.3])
    # k3 = exp(r) - r - 1 with r = ref - logp: r = -0.5 -> e^-0.5 - 0.5 = 0.10653; r = 0.3 -> e^0.3 - 1.3
    k3 = kl_estimate(logps, ref, "k3")
    assert k3[0].tolist() == pytest.approx([math.exp(-0.5) - 0.5, 0.0, math.exp(0.3) - 1.3], abs=1e-6)
    with pytest.raises(ValueError, match="k2"):
        kl_estimate(logps, ref, "k2")
    mask = torch.tensor([[False, True, True], [True, True, False]])
    kl = torch.tensor([[0.5, 0.1, -0.3], [0.2, 0.4, 0.7]])
    rewards = token_rewards(torch.tensor([1.0, 2.0]), kl * mask, mask, kl_coef=0.1)
    # -0.1 * kl on reply tokens; the score on each reply's last token; nothing on the prompt or padding
    assert rewards.flatten().tolist() == pytest.approx([0.0, -0.01, 1.03, -0.02, 1.96, 0.0])


def test_whiten_matches_trls_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, -100.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    # masked entries 1..6: mean 3.5, unbiased variance 3.5 (trl's masked_var, unbiased=True)
    expected = [(v - 3.5) / math.sqrt(3.5 + 1e-8) for v in (1, 2, 3, 4, 5, 6)]
    out = whiten(x, mask)
    assert out[mask].tolist() == pytest.approx(expected, abs=1e-6)
    assert out[~mask].tolist() == [0.0, 0.0]
    assert whiten(x, mask, shift_mean=False)[mask].tolist() == pytest.approx([e + 3.5 for e in expected])


def test_clipped_policy_and_value_losses_on_hand_computed_cases():
    old = torch.zeros(4)
    logps = torch.tensor([0.0, 0.5, 0.5, -0.5])
    adv = torch.tensor([2.0, 1.0, -1.0, 1.0])
    loss, clipped = ppo_policy_loss(logps, old, adv, 0.2)
    # trl: pg_losses = -A r, pg_losses2 = -A clamp(r, 0.8, 1.2), max of the two
    # r = 1 -> -2; r = e^0.5 = 1.6487 with A = 1 -> max(-1.6487, -1.2) = -1.2 (clipped);
    # A = -1 -> max(1.6487, 1.2) = 1.6487; r = e^-0.5 = 0.6065, A = 1 -> max(-0.6065, -0.8) = -0.6065
    assert loss.tolist() == pytest.approx([-2.0, -1.2, math.exp(0.5), -math.exp(-0.5)], abs=1e-5)
    assert clipped.tolist() == [False, True, False, False]
    values, old_values, returns = (
        torch.tensor([1.0, 0.5, 0.0]),
        torch.tensor([0.5, 0.4, 0.0]),
        torch.tensor([2.0, 0.0, 1.0]),
    )
    vf, vclipped = ppo_value_loss(values, old_values, returns, 0.2)
    # V=1, V_old=.5: clipped to .7; (1-2)^2 = 1 vs (.7-2)^2 = 1.69 -> 0.845 (clipped);
    # V=.5, V_old=.4: inside the range -> 0.5 * .25 = .125; V=0, R=1 -> 0.5
    assert vf.tolist() == pytest.approx([0.845, 0.125, 0.5])
    assert vclipped.tolist() == [True, False, False]


def test_entropy_and_adaptive_kl_controller():
    assert float(entropy_from_logits(torch.zeros(4))) == pytest.approx(math.log(4))
    assert float(entropy_from_logits(torch.tensor([0.0, -1e4]))) == pytest.approx(0.0, abs=1e-6)
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 64)  # error = clip(9/6 - 1, -.2, .2) = .2; beta *= 1 + .2 * 64 / 10000
    assert ctl.value == pytest.approx(0.2 * 1.00128)
    ctl.update(5.7, 100)  # error = -0.05
    assert ctl.value == pytest.approx(0.2 * 1.00128 * (1 - 0.05 * 100 / 10000))
    fixed = AdaptiveKLController(0.2)
    fixed.update(100.0, 64)
    assert fixed.value == 0.2


def test_objective_per_token_mean_and_metrics(tokenizer):
    torch.manual_seed(0)
    policy = Transformer(
        ModelConfig(
            vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16
        )
    )
    model = PolicyWithValue(policy)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 6))
    mask = torch.tensor([[0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        out = model(ids)
    from lmforge.tune.grpo import token_logps

    logps = token_logps(out.logits, ids)
    assert out.values.abs().sum() == 0  # the head starts at zero
    batch = {
        "input_ids": ids,
        "completion_mask": mask,
        "old_logps": logps,
        "old_values": torch.zeros(2, 5),
        "advantages": torch.tensor([[0, 1.0, 0, 0, 0], [0, -1.0, -1.0, -1.0, -1.0]]),
        "returns": torch.ones(2, 5),
    }
    result = PPOObjective(vf_coef=0.1)(model, batch)
    assert result.count == 5
    # ratio 1 everywhere: pg = -A, vf = 0.5 (0 - 1)^2; summed over the 5 reply tokens
    assert float(result.loss_sum.detach()) == pytest.approx((-1.0 + 4.0) + 0.1 * 0.5 * 5, abs=1e-5)
    assert float(result.sums["approx_kl"]) == pytest.approx(0.0, abs=1e-10)
    assert float(result.sums["clip_fraction"]) == 0.0


def test_recipe_errors_name_the_key():
    base = {"init_from": "x", "batch": {"micro_batch_size": 4}}
    with pytest.raises(ConfigError, match=r"ppo\.rewards"):
        load_config(PPOConfig, data={**base, "ppo": {"paths": ["p"]}})
    cases = [
        ({"rewards": {"smile": 1.0}}, "ppo.rewards"),
        ({"rewards": {"contains": 1.0}}, "ppo.contains"),
        ({"kl_estimator": "k2"}, "ppo.kl_estimator"),
        ({"lam": 1.5}, "ppo.lam"),
        ({"cliprange": 0.0}, "ppo.cliprange"),
        ({"kl_coef": float("nan")}, "ppo.kl_coef"),
        ({"kl_target": -1.0}, "ppo.kl_target"),
        ({"temperature": 0.0}, "ppo.temperature"),
        ({"epochs": 0}, "ppo.epochs"),
        ({"prompts_per_rollout": 6}, "ppo.prompts_per_rollout"),  # 6 rows do not split into batches of 4
    ]
    for ppo, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(
                PPOConfig, data={**base, "ppo": {"paths": ["p"], "rewards": {"exact_answer": 1}, **ppo}}
            )
    with pytest.raises(ConfigError, match=r"ppo\.paths"):
        load_config(PPOConfig, data=base)
    with pytest.raises(ConfigError, match=r"peft\.method"):
        load_config(
            PPOConfig,
            data={
                **base,
                "ppo": {"paths": ["p"], "rewards": {"format": 1}, "format_pattern": "x"},
                "peft": {"method": "prompt_tuning"},
            },
        )


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


def ppo_recipe(tmp_path, base_model, **overrides):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?"}) + "\n" for i in range(16)))
    data = {
        "init_from": str(base_model),
        "run_dir": str(tmp_path / "ppo"),
        "max_steps": 24,
        "data": {"seq_len": 64},
        "batch": {"micro_batch_size": 32},
        "optim": {"lr": 3e-2, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "ppo": {
            "paths": [str(path)],
            "prompts_per_rollout": 16,
            "samples_per_prompt": 4,
            "epochs": 2,
            "max_new_tokens": 8,
            "rewards": {"contains": 1.0},
            "contains": "blue",
            "kl_coef": 0.01,
        },
        "log": {"every_steps": 4, "plots": False, "progress": False},
        "checkpoint": {"every_steps": 0},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(PPOConfig, data=data)


@pytest.mark.slow
def test_ppo_raises_a_toy_reward(tmp_path, base_model):
    summary = run_ppo(ppo_recipe(tmp_path, base_model), ppo_engine_rollouts, progress=False)
    assert summary["step"] == 24 and summary["rollouts"] == 6  # 2 epochs x 2 mini-batches per rollout
    logged = [
        json.loads(line) for line in (tmp_path / "ppo" / "align_metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in logged] == [4, 8, 12, 16, 20, 24]
    assert logged[0]["reward"] < 0.3
    assert logged[-1]["reward"] > 0.6
    expected = {
        "reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss", "rollout_s", "scoring_s",
        "update_s", "logprob_diff", "kl_coef", "completion_len",
    }  # fmt: skip
    assert expected <= set(logged[-1])
    # the trainer's log-probs agree with the engine's sampling log-probs (same weights, fp32)
    assert logged[0]["logprob_diff"] < 1e-3
    assert (tmp_path / "ppo" / "model" / "config.json").is_file()
    assert (tmp_path / "ppo" / "value_head.safetensors").is_file()


def test_ppo_with_lora_a_reward_model_k3_and_the_adaptive_kl(tmp_path, base_model, tokenizer):
    from lmforge.model.hf import load_pretrained, save_reward_model

    backbone = load_pretrained(base_model)
    rm_folder = tmp_path / "rm"
    save_reward_model(
        backbone, torch.randn(1, backbone.cfg.d_model), rm_folder, pad_token_id=tokenizer.pad_id
    )
    cfg = ppo_recipe(
        tmp_path,
        base_model,
        max_steps=2,
        batch={"micro_batch_size": 4},
        ppo={
            "prompts_per_rollout": 4,
            "samples_per_prompt": 1,
            "epochs": 2,
            "max_new_tokens": 4,
            "rewards": {},
            "reward_model": str(rm_folder),
            "kl_estimator": "k3",
            "kl_coef": 0.1,
            "kl_target": 0.5,
            "kl_horizon": 100,
        },
        peft={"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
        log={"every_steps": 1},
    )
    summary = run_ppo(cfg, ppo_engine_rollouts, progress=False)
    assert summary["step"] == 2 and summary["rollouts"] == 1
    logged = [
        json.loads(line) for line in (tmp_path / "ppo" / "align_metrics.jsonl").read_text().splitlines()
    ]
    assert {"reward/model", "kl", "value_loss"} <= set(logged[0]) and "reward/contains" not in logged[0]
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the LoRA B matrices start at zero
    # the rollout's KL (0) is under the target: the coefficient shrinks by 20% x 4 replies / 100
    assert summary["kl_coef"] == pytest.approx(0.1 * (1 - 0.2 * 4 / 100))
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").is_file()


def test_source_hands_out_epochs_of_minibatches_and_resumes(tokenizer):
    from lmforge.tune.grpo import RLPrompt, Scorer, contains_reward
    from lmforge.tune.ppo import PPOSource

    class FixedRollouts:  # replies of 1-3 tokens; no sampling log-probs (logprob_diff is then absent)
        pushed = 0

        def push_weights(self, policy):
            self.pushed += 1

        def sample(self, prompts, n):
            return [[[5 + i + j] * (1 + (i + j) % 3) for j in range(n)] for i in range(len(prompts))]

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=16
    )
    policy = Transformer(cfg)
    prompts = [RLPrompt((1, 2 + i), {}) for i in range(6)]
    rollouts = FixedRollouts()

    def source():
        return PPOSource(
            prompts,
            PolicyWithValue(policy),
            rollouts,
            Scorer({"contains": (contains_reward("x"), 1.0)}),
            tokenizer,
            0,
            Transformer(cfg).eval(),
            AdaptiveKLController(0.1, target=1.0, horizon=10),
            prompts_per_rollout=4,
            samples_per_prompt=2,
            micro_batch_size=4,
            epochs=3,
        )

    first = source()
    batches = [next(first) for _ in range(6)]  # 3 epochs x 2 micro-batches of the 8 replies: one rollout
    assert rollouts.pushed == 1
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    assert "stat/reward" in batches[0] and not any(k.startswith("stat/") for b in batches[1:] for k in b)
    assert "stat/logprob_diff" not in batches[0]

    def rows(epoch):
        return sorted(
            map(tuple, torch.cat([b["input_ids"] for b in batches[2 * epoch : 2 * epoch + 2]]).tolist())
        )

    assert len(set(rows(0))) == 8 and rows(1) == rows(0) and rows(2) == rows(0)  # every reply once per epoch
    next(first)
    assert rollouts.pushed == 2  # the 7th micro-batch starts a new rollout
    state = first.state_dict()
    assert state["kl_coef"] < 0.1  # KL 0 under the target: the controller lowered it, and it is saved
    resumed = source()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.index, resumed.kl.value) == (first.epoch, first.index, first.kl.value)
