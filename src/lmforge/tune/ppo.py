"""PPO for language models (Ziegler et al. 2019, InstructGPT) as an objective of the one trainer.

Actor, critic, reference, reward:

* the **actor** is the policy being trained (optionally with a ``peft`` adapter, as ``lmforge sft``);
* the **critic** is a scalar value head on the actor's own trunk (:class:`PolicyWithValue`: one forward gives
  the next-token logits and the value of every position; the value loss trains the trunk too, scaled by
  ``vf_coef``). A shared trunk costs no second model and no second forward, which is what makes PPO affordable
  on CPU; the price is that the value loss also moves the policy's features (hence the small ``vf_coef``, as
  trl's value-head PPO);
* the **reference** is a frozen copy of the starting policy; the per-token KL penalty to it is part of the reward;
* the **reward** of a reply is the weighted sum of Python reward functions and/or a reward model from
  ``lmforge rm`` (GRPO's :class:`~lmforge.tune.grpo.Scorer`), given at the reply's last token.

Rollouts, then several epochs over mini-batches, through the one trainer: :class:`PPOSource` is the trainer's
``train_data``. When its buffer is empty it pushes the actor's weights into the sampler (lmforge's engine in the
same process, :class:`lmforge.infer.rollout.EngineRollouts`), samples replies to ``prompts_per_rollout`` prompts,
scores them, computes the actor's and reference's log-probs and the critic's values, the KL-penalized per-token
rewards, GAE advantages and returns (whitened advantages); then it hands out that rollout's rows in
``ppo.epochs`` shuffled passes of ``batch.micro_batch_size`` rows. One optimizer step is
``batch.grad_accum_steps`` micro-batches, i.e. a mini-batch. Per completion token (:class:`PPOObjective`,
units = completion tokens, as trl's masked means)::

    r_t      = exp(logp_t - logp_old_t)
    pg_t     = max(-A_t r_t, -A_t clip(r_t, 1 - cliprange, 1 + cliprange))
    vf_t     = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - cliprange_value, V_old_t + cliprange_value) - R_t)^2)
    loss_t   = pg_t + vf_coef * vf_t

with, from the rollout (:func:`token_rewards`, :func:`gae`)::

    kl_t     = logp_old_t - ref_t   (k1)   or   exp(ref_t - logp_old_t) - (ref_t - logp_old_t) - 1   (k3)
    reward_t = -kl_coef * kl_t  (+ the reply's score at its last token)
    delta_t  = reward_t + gamma V_{t+1} - V_t ;  A_t = delta_t + gamma lambda A_{t+1} ;  R_t = A_t + V_t

The KL coefficient is fixed, or adaptive (``kl_target``: Ziegler et al.'s proportional controller,
:class:`AdaptiveKLController`) on the rollout's mean per-reply KL.

Log-probs for the ratio are the trainer's own (recomputed at rollout time, ``old_logps``); when the sampler
reports its sampling log-probs, the mean |trainer - engine| per token is logged as ``logprob_diff``.

The recipe is a :class:`~lmforge.train.TrainConfig` plus a ``ppo`` section (and an optional ``peft`` one):

.. code-block:: yaml

    init_from: runs/sft/model
    run_dir: runs/ppo
    max_steps: 200                   # optimizer steps (mini-batches)
    data: {seq_len: 256}             # prompt + reply length
    batch: {micro_batch_size: 8, grad_accum_steps: 2}   # mini-batch = 16 replies
    optim: {lr: 1.0e-5}
    ppo:
      paths: [prompts.jsonl]         # {"prompt" | "messages", "answer"?}
      prompts_per_rollout: 32        # x samples_per_prompt replies per rollout (a multiple of the mini-batch)
      epochs: 4
      rewards: {exact_answer: 1.0}   # and/or reward_model: runs/rm/model
      kl_coef: 0.05                  # kl_target: 6.0 for the adaptive controller

Outputs: ``RUN/model`` (the policy, Hugging Face layout, with the tokenizer; with ``peft`` the adapter in
``RUN/adapter``), ``RUN/value_head.safetensors`` (the critic's head), ``RUN/align_metrics.jsonl`` (reward,
KL, entropy, clip fraction, approx KL, value loss, rollout / scoring / update time, logprob_diff). Times are
per rollout: ``rollout_s`` (push + sampling), ``scoring_s`` (rewards), ``prepare_s`` (the actor/critic and
reference forwards, GAE) and ``update_s``, the trainer's time on the *previous* rollout (from the end of its
preparation to the start of this one: its optimizer steps, logging and checkpoints).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig
from lmforge.train.objective import Batch, ObjectiveOutput
from lmforge.tune.align_log import AlignMetrics
from lmforge.tune.grpo import (
    REWARD_FUNCTIONS,
    RLPrompt,
    Scorer,
    build_scorer,
    load_rl_prompts,
    next_prompts,
    score_rollout,
    token_logps,
)
from lmforge.tune.peft import PeftConfig, apply_peft, save_adapter
from lmforge.tune.preference import chat_tokenizer
from lmforge.tune.run import run_copy

# ------------------------------------------------------------------------------------------ pure functions


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || ref) from sampled tokens: ``k1 = logp - ref`` (unbiased, can be
    negative) or ``k3 = exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0); Schulman's estimators, as trl."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        log_ratio = ref_logps - logps
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kl estimator: k1 or k3, got {estimator!r}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards (rows, T): ``-kl_coef * kl`` on the completion tokens (``mask``), plus each row's
    ``scores`` on its last completion token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
    rewards[torch.arange(mask.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) along dim 1 of (rows, T); positions outside
    ``mask`` count as terminal (value 0, reward 0), so a reply ends at its last masked token. Returns
    (advantages, returns = advantages + values), zero outside the mask."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (variance with Bessel's correction, as trl's
    ``masked_whiten``); ``shift_mean=False`` keeps the mean. Entries outside the mask are returned as 0."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n
    var = (((values - mean) ** 2) * mask).sum() / n
    var = var * n / (n - 1) if n > 1 else var
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def ppo_policy_loss(
    logps: Tensor, old_logps: Tensor, advantages: Tensor, cliprange: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per token: ``max(-A r, -A clip(r, 1 - c, 1 + c))`` with ``r = exp(logp - old)``, and whether the clipped
    term was the one taken (trl's ``pg_clipfrac``)."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, cliprange_value: float = 0.2
) -> tuple[Tensor, Tensor]:
    """Per token: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``, and whether the clipped
    term was the one taken (trl's ``vf_clipfrac``)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim, in fp32: ``logsumexp(z) - sum softmax(z) z``."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


class AdaptiveKLController:
    """Ziegler et al. (2019): ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta *= 1 + e * n_steps / horizon``.
    With ``target`` None the coefficient stays fixed."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class PolicyValueOutput:
    logits: Tensor  # (batch, seq, vocab)
    values: Tensor  # (batch, seq), fp32: the critic's value of each position (before the next token)


class PolicyWithValue(nn.Module):
    """The actor and the critic: the policy Transformer and a scalar ``value_head`` on its final hidden states
    (the input of its LM head), zero-initialized so that the first values are 0."""

    def __init__(self, policy: Transformer) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.cfg.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self) -> ModelConfig:  # the trainer reads it
        return self.policy.cfg

    @property
    def blocks(self) -> nn.ModuleDict:  # the trainer wraps these (FSDP, activation checkpointing)
        return self.policy.blocks

    def forward(self, input_ids: Tensor) -> PolicyValueOutput:
        captured: list[Tensor] = []
        assert self.policy.lm_head is not None
        handle = self.policy.lm_head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            logits = self.policy(input_ids).logits
        finally:
            handle.remove()
        values = self.value_head(captured[0].to(self.value_head.weight.dtype)).squeeze(-1).float()
        return PolicyValueOutput(logits, values)


# ------------------------------------------------------------------------------------------- objective


class PPOObjective:
    """The clipped PPO loss plus ``vf_coef`` times the clipped value loss over a mini-batch of rollout rows
    (``input_ids``, ``completion_mask``, ``old_logps``, ``old_values``, ``advantages``, ``returns``, the last
    four per token, aligned with :func:`~lmforge.tune.grpo.token_logps`). Units are completion tokens.

    Recorded while training, per token: ``policy_loss``, ``value_loss``, ``clip_fraction``,
    ``value_clip_fraction``, ``approx_kl`` (``0.5 (logp - old)^2``, as trl), ``entropy``; and the rollout
    statistics a batch carries as ``stat/<name>`` tensors (the first micro-batch of each rollout), each a mean
    over its entries."""

    name = "ppo"

    def __init__(
        self,
        cliprange: float = 0.2,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        metrics: AlignMetrics | None = None,
    ) -> None:
        self.cliprange, self.cliprange_value, self.vf_coef = cliprange, cliprange_value, vf_coef
        self.metrics = metrics

    def count(self, batch: Batch) -> int:
        return int(batch["completion_mask"][:, 1:].sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        out = model(batch["input_ids"])
        logps = token_logps(out.logits, batch["input_ids"])
        values = out.values[:, :-1]
        mask = batch["completion_mask"][:, 1:].to(logps.dtype)
        pg, pg_clipped = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], self.cliprange)
        vf, vf_clipped = ppo_value_loss(values, batch["old_values"], batch["returns"], self.cliprange_value)
        loss = pg + self.vf_coef * vf
        with torch.no_grad():
            log_ratio = logps - batch["old_logps"]
            sums = {
                "policy_loss": (pg * mask).sum(),
                "value_loss": (vf * mask).sum(),
                "clip_fraction": (pg_clipped * mask).sum(),
                "value_clip_fraction": (vf_clipped * mask).sum(),
                "approx_kl": (0.5 * log_ratio**2 * mask).sum(),
                "entropy": (entropy_from_logits(out.logits[:, :-1]) * mask).sum(),
            }
        count = self.count(batch)
        if self.metrics is not None and model.training:
            self.metrics.add(sums, count)
            for key, value in batch.items():
                if key.startswith("stat/") and value.numel():
                    self.metrics.add({key[5:]: value.sum()}, value.numel())
        return ObjectiveOutput(loss_sum=(loss * mask).sum(), count=count, sums=sums)


# -------------------------------------------------------------------------------------------- rollouts


class PPORollouts(Protocol):
    """The sampler: the engine kept in step with the actor (see :class:`lmforge.tune.grpo.Rollouts`)."""

    def push_weights(self, policy: nn.Module) -> None: ...

    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[list[int]]]: ...


class LogprobRollouts(PPORollouts, Protocol):
    """A sampler that also reports the log-probability (from the raw logits, before temperature) it gave each
    sampled token: ``(token_ids, logprobs)`` per completion."""

    def sample_with_logprobs(
        self, prompts: Sequence[Sequence[int]], n: int
    ) -> list[list[tuple[list[int], list[float]]]]: ...


class PPOSource:
    """The trainer's ``train_data`` for PPO: rollouts, then ``epochs`` shuffled passes over their rows in
    micro-batches of ``micro_batch_size``. Resumable: the state is the position in the shuffled prompt order
    and the KL coefficient (an interrupted rollout's remaining mini-batches are replaced by a new rollout)."""

    def __init__(
        self,
        prompts: Sequence[RLPrompt],
        model: PolicyWithValue,
        rollouts: PPORollouts,
        scorer: Scorer,
        tokenizer: Tokenizer,
        pad_id: int,
        reference: Transformer,
        kl: AdaptiveKLController,
        prompts_per_rollout: int,
        samples_per_prompt: int = 1,
        micro_batch_size: int = 8,
        epochs: int = 4,
        gamma: float = 1.0,
        lam: float = 0.95,
        kl_estimator: str = "k1",
        whiten_advantages: bool = True,
        seed: int = 0,
    ) -> None:
        if not prompts:
            raise ValueError("no RL prompts")
        self.prompts = list(prompts)
        self.model, self.rollouts, self.scorer, self.tokenizer = model, rollouts, scorer, tokenizer
        self.pad_id, self.reference, self.kl = pad_id, reference, kl
        self.prompts_per_rollout, self.samples_per_prompt = prompts_per_rollout, samples_per_prompt
        self.micro_batch_size, self.epochs = micro_batch_size, epochs
        self.gamma, self.lam, self.kl_estimator = gamma, lam, kl_estimator
        self.whiten_advantages, self.seed = whiten_advantages, seed
        self.epoch = 0
        self.index = 0
        self.rollout_count = 0
        self.buffer: list[Batch] = []
        self.last_rollout_end: float | None = None

    def _next_prompts(self) -> list[RLPrompt]:
        chosen, self.epoch, self.index = next_prompts(
            self.prompts, self.prompts_per_rollout, self.seed, self.epoch, self.index
        )
        return chosen

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self.buffer:
            self.buffer = self._minibatches(self.make_rollout())
        return self.buffer.pop(0)

    def _minibatches(self, rollout: Batch) -> list[Batch]:
        """``epochs`` passes over the rollout's rows, each in its own shuffled order; the rollout statistics
        ride on the first micro-batch only (so that they are counted once)."""
        rows = rollout["input_ids"].shape[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollout_count)
        stats = {key: value for key, value in rollout.items() if key.startswith("stat/")}
        per_row = {key: value for key, value in rollout.items() if not key.startswith("stat/")}
        batches = []
        for _ in range(self.epochs):
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows, self.micro_batch_size):
                index = order[start : start + self.micro_batch_size]
                batches.append({key: value[index] for key, value in per_row.items()})
        batches[0].update(stats)
        return batches

    @torch.no_grad()
    def make_rollout(self) -> Batch:
        """Sample, score and prepare one rollout: per row ``input_ids``, ``completion_mask``, and per token
        ``old_logps``, ``old_values``, ``advantages``, ``returns``; plus ``stat/*`` tensors."""
        started = time.perf_counter()
        update_s = None if self.last_rollout_end is None else started - self.last_rollout_end
        prompts = self._next_prompts()
        device = next(self.model.parameters()).device  # where the trainer put it
        for frozen in (self.reference, self.scorer.reward_model):
            if frozen is not None:
                frozen.to(device)
        self.rollouts.push_weights(self.model.policy)
        prompt_ids = [p.input_ids for p in prompts]
        engine_logps: list[list[float]] | None = None
        if hasattr(self.rollouts, "sample_with_logprobs"):
            sampled = self.rollouts.sample_with_logprobs(prompt_ids, self.samples_per_prompt)
            completions = [[ids for ids, _ in group] for group in sampled]
            engine_logps = [lp for group in sampled for _, lp in group]
        else:
            completions = self.rollouts.sample(prompt_ids, self.samples_per_prompt)
        sampled_at = time.perf_counter()
        scored = score_rollout(prompts, completions, self.tokenizer, self.scorer, self.pad_id)
        scored_at = time.perf_counter()
        rows, scores, parts = scored.rows, scored.rewards, scored.parts
        input_ids, completion_mask = scored.input_ids, scored.completion_mask
        was_training = self.model.training
        self.model.eval()
        out = self.model(input_ids.to(device))
        self.model.train(was_training)
        old_logps = token_logps(out.logits, input_ids.to(device)).cpu()
        mask = completion_mask[:, 1:]
        old_values = (out.values[:, :-1].cpu() * mask).float()
        ref_out = self.reference(input_ids.to(device))
        ref_logps = token_logps(ref_out.logits, input_ids.to(device)).cpu()
        kl = kl_estimate(old_logps, ref_logps, self.kl_estimator) * mask
        kl_coef = self.kl.value
        rewards = token_rewards(scores.float(), kl, mask, kl_coef)
        advantages, returns = gae(rewards, old_values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask)
        reply_kl = kl.sum(dim=1)
        self.kl.update(float(reply_kl.mean()), len(rows))
        prepared_at = time.perf_counter()
        self.rollout_count += 1
        self.last_rollout_end = prepared_at

        stats = {
            "stat/reward": scores.float(),
            **{f"stat/{name}": values.float() for name, values in parts.items()},
            "stat/kl": reply_kl,  # per reply: the summed per-token estimate
            "stat/kl_coef": torch.tensor([kl_coef]),
            "stat/non_score_reward": (-kl_coef * reply_kl),
            "stat/completion_len": mask.sum(dim=1).float(),
            "stat/value": (old_values.sum() / mask.sum()).reshape(1),  # mean critic value per token
            "stat/rollout_s": torch.tensor([sampled_at - started]),
            "stat/scoring_s": torch.tensor([scored_at - sampled_at]),
            "stat/prepare_s": torch.tensor([prepared_at - scored_at]),
        }
        if update_s is not None:
            stats["stat/update_s"] = torch.tensor([update_s])
        if engine_logps is not None:
            diffs = []
            for row, ((prompt, completion), lp) in enumerate(zip(rows, engine_logps)):
                n = min(len(completion), len(lp))
                start = len(prompt.input_ids) - 1
                diffs.append((old_logps[row, start : start + n] - torch.tensor(lp[:n])).abs())
            stats["stat/logprob_diff"] = torch.cat(diffs)
        return {
            "input_ids": input_ids,
            "completion_mask": completion_mask,
            "old_logps": old_logps,
            "old_values": old_values,
            "advantages": advantages.float(),
            "returns": returns.float(),
            **stats,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "kl_coef": self.kl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed = int(state.get("seed", self.seed))
        self.kl.value = float(state.get("kl_coef", self.kl.value))
        self.buffer = []


# -------------------------------------------------------------------------------------------- the run

KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PPODataConfig:
    paths: list[str] = field(default_factory=list)  # prompt records
    prompts_per_rollout: int = 8  # prompts sampled per rollout
    samples_per_prompt: int = (
        1  # replies per prompt; rows per rollout = prompts_per_rollout * samples_per_prompt
    )
    epochs: int = 4  # passes over each rollout (mini-batch = micro_batch_size * grad_accum_steps rows)
    max_new_tokens: int = 64
    temperature: float = 1.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial coefficient of the per-token KL penalty
    kl_estimator: str = "k1"  # k1 | k3
    kl_target: float | None = None  # per-reply KL the adaptive controller aims at; None = fixed coefficient
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    rewards: dict[str, float] = field(default_factory=dict)  # exact_answer | format | contains -> weight
    format_pattern: str = ""
    contains: str = ""
    reward_model: str | None = None  # a folder written by `lmforge rm`
    reward_model_weight: float = 1.0

    @property
    def reward_weights(self) -> dict[str, float]:
        """The reward functions and their weights (what the scorer builds on; no default: see PPOConfig)."""
        return dict(self.rewards)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rewards) - set(REWARD_FUNCTIONS))
        if unknown:
            raise ValueError(
                f"ppo.rewards: unknown {', '.join(unknown)}; one of {', '.join(REWARD_FUNCTIONS)}"
            )
        if "format" in self.rewards and not self.format_pattern:
            raise ValueError("ppo.format_pattern: required by the format reward")
        if "contains" in self.rewards and not self.contains:
            raise ValueError("ppo.contains: required by the contains reward")
        for name in ("prompts_per_rollout", "samples_per_prompt", "epochs", "max_new_tokens", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}: at least 1, got {getattr(self, name)}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"ppo.kl_estimator: one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}"
            )
        for name in ("cliprange", "cliprange_value"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ppo.{name}: the clip range must be positive, got {getattr(self, name)}")
        for name in ("kl_coef", "vf_coef"):
            if not getattr(self, name) >= 0:  # (NaN fails too)
                raise ValueError(f"ppo.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(
                f"ppo.kl_target: must be positive (or null for a fixed kl_coef), got {self.kl_target}"
            )
        if self.kl_target is not None and not self.kl_coef > 0:
            raise ValueError("ppo.kl_coef: the adaptive controller (ppo.kl_target) needs a positive start")
        if not 0.0 < self.temperature <= 2.0:
            raise ValueError(f"ppo.temperature: must be in (0, 2], got {self.temperature}")


@dataclass
class PPOConfig(TrainConfig):
    # no default reward: a recipe's ``rewards`` would be merged into it, not replace it
    ppo: PPODataConfig = field(default_factory=PPODataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)  # method empty: the whole actor trains

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.ppo.paths:
            raise ValueError("ppo.paths: at least one file of prompts is required")
        if not self.ppo.rewards and self.ppo.reward_model is None:
            raise ValueError("ppo.rewards: give reward functions and/or a reward model (ppo.reward_model)")
        if not self.init_from:
            raise ValueError("init_from: the model folder to train is required")
        if self.peft.method and self.peft.method not in ("lora", "ia3"):
            raise ValueError(f"peft.method: PPO supports lora and ia3 adapters, got {self.peft.method!r}")
        if self.peft.method and not Path(self.init_from).is_dir():
            raise ValueError(
                f"init_from: {self.init_from!r} must be a model folder (the adapter's base) with peft"
            )
        if self.batch.ramp_tokens:
            raise ValueError(
                "batch.ramp_tokens: PPO mini-batches are a fixed number of rollout rows (no ramp)"
            )
        rows = self.ppo.prompts_per_rollout * self.ppo.samples_per_prompt
        minibatch = self.batch.micro_batch_size * self.batch.grad_accum_steps
        if rows % minibatch:
            raise ValueError(
                f"ppo.prompts_per_rollout: a rollout's {rows} replies (x ppo.samples_per_prompt) must split into "
                f"whole mini-batches of batch.micro_batch_size * batch.grad_accum_steps = {minibatch}"
            )
        if self.ppo.max_new_tokens >= self.data.seq_len:
            raise ValueError(
                f"ppo.max_new_tokens: {self.ppo.max_new_tokens} leaves no room for a prompt in data.seq_len="
                f"{self.data.seq_len}"
            )


MakeRollouts = Callable[[Transformer, Tokenizer, PPODataConfig], PPORollouts]


def steps_per_rollout(cfg: PPOConfig) -> int:
    """Optimizer steps the trainer makes on one rollout: ``epochs`` x its mini-batches."""
    rows = cfg.ppo.prompts_per_rollout * cfg.ppo.samples_per_prompt
    return cfg.ppo.epochs * rows // (cfg.batch.micro_batch_size * cfg.batch.grad_accum_steps)


def build_ppo(
    cfg: PPOConfig, make_rollouts: MakeRollouts, metrics: AlignMetrics | None = None
) -> tuple[PolicyWithValue, PPOObjective, PPOSource, dict[str, Any]]:
    """The model, objective and batch source of a PPO run (``cfg`` being the run's copy) and the data stats;
    :func:`run_ppo` hands them to the trainer, the benchmark times them."""
    import copy

    from lmforge.model import load_pretrained

    assert cfg.init_from is not None
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, pad_id = chat_tokenizer(cfg)
    rejected: Counter[str] = Counter()
    max_prompt_len = cfg.data.seq_len - cfg.ppo.max_new_tokens
    prompts = load_rl_prompts(cfg.ppo.paths, tokenizer, max_prompt_len, rejected, run_dir / "rejects.jsonl")
    data_stats = {"prompts": len(prompts), "rejected": dict(rejected)}
    (run_dir / "rl_data.json").write_text(json.dumps(data_stats, indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(cfg.seed)
    policy = load_pretrained(cfg.init_from).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if cfg.peft.method:
        policy = apply_peft(policy, cfg.peft)
    model = PolicyWithValue(policy)
    scorer = build_scorer(cfg.ppo)  # type: ignore[arg-type]  # reads the reward keys GRPO's section shares
    source = PPOSource(
        prompts,
        model,
        make_rollouts(policy, tokenizer, cfg.ppo),
        scorer,
        tokenizer,
        pad_id,
        reference,
        AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon),
        cfg.ppo.prompts_per_rollout,
        cfg.ppo.samples_per_prompt,
        cfg.batch.micro_batch_size,
        cfg.ppo.epochs,
        cfg.ppo.gamma,
        cfg.ppo.lam,
        cfg.ppo.kl_estimator,
        cfg.ppo.whiten_advantages,
        seed=cfg.data.seed,
    )
    objective = PPOObjective(cfg.ppo.cliprange, cfg.ppo.cliprange_value, cfg.ppo.vf_coef, metrics)
    return model, objective, source, data_stats


def run_ppo(cfg: PPOConfig, make_rollouts: MakeRollouts, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.init_from`` with PPO; ``make_rollouts(policy, tokenizer, cfg.ppo)`` builds the sampler
    (:class:`lmforge.infer.rollout.EngineRollouts` for ``lmforge ppo``). Returns a summary."""
    from safetensors.torch import save_file

    from lmforge.model.hf import save_pretrained
    from lmforge.tokenizer import load_tokenizer
    from lmforge.train.trainer import Trainer

    export = cfg.checkpoint.export
    # The loss is a surrogate whose value says nothing about divergence (as GRPO's): no loss-spike rollback.
    # The trainer exports causal LMs; the policy (or its adapter) and the value head are written below.
    cfg = run_copy(
        cfg,
        progress,
        stability=dataclasses.replace(cfg.stability, spike_detection=False),
        checkpoint=dataclasses.replace(cfg.checkpoint, export=False),
    )
    metrics = AlignMetrics(Path(cfg.run_dir) / "align_metrics.jsonl", cfg.log.every_steps)
    model, objective, source, data_stats = build_ppo(cfg, make_rollouts, metrics)
    trainer = Trainer(cfg, model, objective, source, batch_hook=metrics.hook)
    result = trainer.fit()
    metrics.flush(result.step)
    run_dir = Path(cfg.run_dir)
    summary: dict[str, Any] = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "rollouts": math.ceil(result.step / steps_per_rollout(cfg)),
        "data": data_stats,
        "loss": result.metrics.get("loss"),
        "kl_coef": source.kl.value,
        "model_dir": None,
    }
    if export and trainer.env.is_main:
        trained: PolicyWithValue = trainer.model  # type: ignore[assignment]
        tokenizer = load_tokenizer(cfg.tokenizer)
        if cfg.peft.method:
            out = run_dir / "adapter"
            save_adapter(trained.policy, out, base_model=str(Path(cfg.init_from or "").resolve()))
        else:
            out = run_dir / "model"
            save_pretrained(trained.policy, out)
        tokenizer.save(out)
        head = {k: v.detach().cpu().contiguous() for k, v in trained.value_head.state_dict().items()}
        save_file(head, str(run_dir / "value_head.safetensors"))
        summary["model_dir"] = str(out)
    (run_dir / "ppo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
