"""GRPO (Shao et al., DeepSeekMath) as an objective of the one trainer, fed by an online rollout source.

Every batch the trainer draws is made fresh: :class:`RolloutSource` pushes the policy's current weights into
a :class:`Rollouts` sampler (lmforge's own engine, :class:`lmforge.infer.rollout.EngineRollouts`, in the same
process), samples ``G`` replies to each of ``prompts_per_batch`` prompts, scores them with Python reward
functions and/or a reward model, and turns the rewards into group-normalized advantages. The trainer's next
update therefore always trains on replies of the weights it has just produced.

Per completion token t of a reply with advantage A (:func:`grpo_token_loss`), with ``r_t = exp(logp_t -
logp_old_t)`` (``logp_old`` is the policy's own log-prob when the batch was made)::

    loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + kl_coef * k3_t
    k3_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (Schulman's unbiased KL estimator; default off)

and the loss is summed over every completion token of the step and divided by their number: the trainer's
per-unit mean with tokens as units, i.e. DAPO's token-level aggregation (long replies are not down-weighted).

Prompt records (JSONL/Parquet, through :mod:`lmforge.data.io`): ``{"prompt": str | messages}`` or
``{"messages": [...]}``, optionally ``"answer"`` for the exact-answer reward; unusable ones go to the rejects
file with their reason.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.io import Reject
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig
from lmforge.train.objective import Batch, ObjectiveOutput
from lmforge.tune.align_log import AlignMetrics
from lmforge.tune.preference import chat_tokenizer, prompt_messages, read_records, reason_kind, write_rejects
from lmforge.tune.reward import RewardModel
from lmforge.tune.run import run_copy

# ----------------------------------------------------------------------------------------------- losses


def group_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Rewards (prompts, G) -> advantages ``(r - mean_group) / (std_group + eps)`` (std with Bessel's
    correction, as trl); a group whose replies all score the same gets zero advantage."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + eps)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per token: ``exp(ref - logp) - (ref - logp) - 1`` (>= 0; unbiased for KL(policy || ref))."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def grpo_token_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_logps: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per token: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A) + kl_coef * k3`` with ``r = exp(logp - old)``;
    ``advantages`` broadcast over the tokens of each reply."""
    ratio = torch.exp(logps - old_logps)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages)
    loss = -surrogate
    if kl_coef:
        if ref_logps is None:
            raise ValueError("kl_coef > 0 needs the reference log-probs")
        loss = loss + kl_coef * k3_kl(logps, ref_logps)
    return loss


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(rows, seq - 1): ``log p(x_{t+1} | x_<=t)`` in fp32."""
    return -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")


class GRPOObjective:
    """GRPO over a rollout batch (``input_ids``, ``completion_mask``, ``old_logps``, ``advantages`` and, with a
    KL term, ``ref_logps``). Units are completion tokens (token-level aggregation).

    While training it records, per token, ``clip_fraction`` (and ``kl``), and per reply the batch's rewards
    (``reward``, ``reward/<name>``) and ``completion_len``: the batch carries them so that they are
    counted at the step that trains on them."""

    name = "grpo"

    def __init__(
        self,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        kl_coef: float = 0.0,
        metrics: AlignMetrics | None = None,
    ) -> None:
        self.eps_low, self.eps_high, self.kl_coef = eps_low, eps_high, kl_coef
        self.metrics = metrics

    def count(self, batch: Batch) -> int:
        return int(batch["completion_mask"].sum())

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        logps = token_logps(model(batch["input_ids"]).logits, batch["input_ids"])
        mask = batch["completion_mask"][:, 1:].to(logps.dtype)
        loss = grpo_token_loss(
            logps,
            batch["old_logps"],
            batch["advantages"][:, None],
            self.eps_low,
            self.eps_high,
            batch.get("ref_logps"),
            self.kl_coef,
        )
        ratio = torch.exp(logps.detach() - batch["old_logps"])
        clipped = ((ratio < 1 - self.eps_low) | (ratio > 1 + self.eps_high)).to(logps.dtype)
        sums = {"clip_fraction": (clipped * mask).sum()}
        if "ref_logps" in batch:
            sums["kl"] = (k3_kl(logps.detach(), batch["ref_logps"]) * mask).sum()
        if self.metrics is not None and model.training:
            self.metrics.add(sums, self.count(batch))
            replies = {key: value.sum() for key, value in batch.items() if key.startswith("reward")}
            replies["completion_len"] = batch["completion_mask"].sum()
            self.metrics.add(replies, batch["input_ids"].shape[0])
        return ObjectiveOutput(loss_sum=(loss * mask).sum(), count=self.count(batch), sums=sums)


# -------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class RLPrompt:
    input_ids: tuple[int, ...]  # the chat-templated prompt, ending with the assistant header
    record: dict[str, Any]  # the record itself (reward functions read "answer" and anything else there)


def load_rl_prompts(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    max_prompt_len: int,
    rejected: Counter[str] | None = None,
    rejects_path: str | Path | None = None,
) -> list[RLPrompt]:
    """Prompt records -> chat-templated prompts; bad records are counted in ``rejected`` and written to
    ``rejects_path`` with their reason."""
    rejected = rejected if rejected is not None else Counter()
    prompts, rejects = [], []
    for item in read_records(paths):
        if isinstance(item, Reject):
            rejected[reason_kind(item.reason)] += 1
            rejects.append({"where": item.where, "reason": item.reason, "record": item.preview})
            continue
        where, record = item
        try:
            text = tokenizer.apply_chat_template(prompt_messages(record), add_generation_prompt=True)
            ids = tokenizer.backend.encode(text, add_special_tokens=False).ids
            if len(ids) > max_prompt_len:
                raise ValueError(f"over max_prompt_len ({len(ids)} > {max_prompt_len} tokens)")
            if "answer" in record and not isinstance(record["answer"], (str, int, float)):
                raise ValueError("answer must be a string or a number")
        except ValueError as err:
            rejected[reason_kind(str(err))] += 1
            rejects.append({"where": where, "reason": str(err), "record": record})
            continue
        prompts.append(RLPrompt(tuple(ids), record))
    if rejects_path is not None:
        write_rejects(rejects_path, rejects)
    return prompts


# -------------------------------------------------------------------------------------------- rewards

RewardFn = Callable[[str, dict[str, Any]], float]  # (reply text, prompt record) -> reward


def exact_answer(reply: str, record: dict[str, Any]) -> float:
    """1 when the reply, stripped, equals the record's ``answer`` (as text), else 0."""
    return float("answer" in record and reply.strip() == str(record["answer"]).strip())


def format_reward(pattern: str) -> RewardFn:
    """1 when the whole reply (stripped) matches the regular expression ``pattern``, else 0."""
    compiled = re.compile(pattern, re.DOTALL)
    return lambda reply, record: float(compiled.fullmatch(reply.strip()) is not None)


def contains_reward(text: str) -> RewardFn:
    """1 when the reply contains ``text``, else 0."""
    return lambda reply, record: float(text in reply)


# -------------------------------------------------------------------------------------------- rollouts


class Rollouts(Protocol):
    """What samples the replies: the engine, kept in step with the policy."""

    def push_weights(self, policy: nn.Module) -> None:
        """Copy the policy's current weights into the sampler (in memory)."""
        ...

    def sample(self, prompts: Sequence[Sequence[int]], n: int) -> list[list[list[int]]]:
        """``n`` completions (token ids, EOS included when generated) for each prompt."""
        ...


@dataclass
class Scorer:
    """Reward of a reply: the weighted sum of reward functions and (optionally) a reward model's score."""

    functions: dict[str, tuple[RewardFn, float]] = field(default_factory=dict)  # name -> (fn, weight)
    reward_model: RewardModel | None = None
    reward_model_weight: float = 1.0

    def __call__(
        self, texts: Sequence[str], records: Sequence[dict[str, Any]], sequences: Sequence[Sequence[int]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Rewards (replies,) and each component (``reward/<name>``, per reply, unweighted)."""
        total = torch.zeros(len(texts))
        parts: dict[str, Tensor] = {}
        for name, (fn, weight) in self.functions.items():
            values = torch.tensor([fn(text, record) for text, record in zip(texts, records)])
            total += weight * values
            parts[f"reward/{name}"] = values
        if self.reward_model is not None:
            scores = self.score_with_model(sequences)
            total += self.reward_model_weight * scores
            parts["reward/model"] = scores
        return total, parts

    @torch.no_grad()
    def score_with_model(self, sequences: Sequence[Sequence[int]]) -> Tensor:
        assert self.reward_model is not None
        device = next(self.reward_model.parameters()).device
        lengths = torch.tensor([len(s) for s in sequences])
        ids = torch.zeros((len(sequences), int(lengths.max())), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.tensor(seq)
        return self.reward_model.eval()(ids.to(device), lengths.to(device)).cpu()


def next_prompts(
    prompts: Sequence[RLPrompt], n: int, seed: int, epoch: int, index: int
) -> tuple[list[RLPrompt], int, int]:
    """The next ``n`` prompts of a seeded order reshuffled every epoch, from position (``epoch``, ``index``);
    returns them and the new position (what a resumable RL source saves)."""
    chosen: list[RLPrompt] = []
    order: list[int] | None = None
    while len(chosen) < n:
        if index >= len(prompts):
            epoch, index, order = epoch + 1, 0, None
        if order is None:
            order = list(range(len(prompts)))
            random.Random(f"{seed}:{epoch}").shuffle(order)
        chosen.append(prompts[order[index]])
        index += 1
    return chosen, epoch, index


@dataclass
class ScoredRollout:
    """Sampled replies with their prompts, scored and padded into one batch."""

    rows: list[tuple[RLPrompt, list[int]]]  # (prompt, completion) per reply, prompt-major
    input_ids: Tensor  # (replies, longest prompt + completion), right-padded
    completion_mask: Tensor  # True on each reply's completion tokens
    rewards: Tensor  # (replies,) the weighted reward
    parts: dict[str, Tensor]  # each reward component


def score_rollout(
    prompts: Sequence[RLPrompt],
    completions: Sequence[Sequence[list[int]]],
    tokenizer: Tokenizer,
    scorer: Scorer,
    pad_id: int,
) -> ScoredRollout:
    """Decode and score every reply of every prompt and pad prompt + reply rows into one batch."""
    rows = [(p, c) for p, group in zip(prompts, completions) for c in group]
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, c in rows]
    sequences = [[*p.input_ids, *c] for p, c in rows]
    rewards, parts = scorer(texts, [p.record for p, _ in rows], sequences)
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, ((prompt, _), seq) in enumerate(zip(rows, sequences)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        completion_mask[row, len(prompt.input_ids) : len(seq)] = True
    return ScoredRollout(rows, input_ids, completion_mask, rewards, parts)


class RolloutSource:
    """The trainer's ``train_data`` for GRPO: each ``next()`` pushes the policy into the sampler, samples
    ``group_size`` replies for each of ``prompts_per_batch`` prompts and returns the rollout batch.

    Resumable: the state is the position in the shuffled prompt order (the replies themselves are new).
    """

    def __init__(
        self,
        prompts: Sequence[RLPrompt],
        policy: Transformer,
        rollouts: Rollouts,
        scorer: Scorer,
        tokenizer: Tokenizer,
        prompts_per_batch: int,
        group_size: int,
        pad_id: int,
        reference: Transformer | None = None,
        seed: int = 0,
    ) -> None:
        if not prompts:
            raise ValueError("no RL prompts")
        if group_size < 2:
            raise ValueError("group_size: GRPO needs at least 2 replies per prompt")
        self.prompts = list(prompts)
        self.policy, self.rollouts, self.scorer, self.tokenizer = policy, rollouts, scorer, tokenizer
        self.prompts_per_batch, self.group_size, self.pad_id = prompts_per_batch, group_size, pad_id
        self.reference, self.seed = reference, seed
        self.epoch = 0
        self.index = 0

    def _next_prompts(self) -> list[RLPrompt]:
        chosen, self.epoch, self.index = next_prompts(
            self.prompts, self.prompts_per_batch, self.seed, self.epoch, self.index
        )
        return chosen

    def __iter__(self) -> Iterator[Batch]:
        return self

    @torch.no_grad()
    def __next__(self) -> Batch:
        prompts = self._next_prompts()
        device = next(self.policy.parameters()).device  # where the trainer put it
        for frozen in (self.reference, self.scorer.reward_model):
            if frozen is not None:
                frozen.to(device)
        self.rollouts.push_weights(self.policy)
        completions = self.rollouts.sample([p.input_ids for p in prompts], self.group_size)
        scored = score_rollout(prompts, completions, self.tokenizer, self.scorer, self.pad_id)
        rewards, input_ids = scored.rewards, scored.input_ids
        advantages = group_advantages(rewards.view(len(prompts), self.group_size)).flatten()
        batch = {
            "input_ids": input_ids,
            "completion_mask": scored.completion_mask,
            "advantages": advantages.float(),
            "old_logps": self._logps(self.policy, input_ids),
            "reward": rewards.float(),
            **{name: values.float() for name, values in scored.parts.items()},
        }
        if self.reference is not None:
            batch["ref_logps"] = self._logps(self.reference, input_ids)
        return batch

    @staticmethod
    def _logps(model: nn.Module, input_ids: Tensor) -> Tensor:
        device = next(model.parameters()).device
        return token_logps(model(input_ids.to(device)).logits, input_ids.to(device)).cpu()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self.seed = int(state.get("seed", self.seed))


# -------------------------------------------------------------------------------------------- the run

REWARD_FUNCTIONS = ("exact_answer", "format", "contains")


@dataclass
class GRPODataConfig:
    paths: list[str] = field(default_factory=list)  # prompt records
    group_size: int = 8  # replies sampled per prompt (G); batch.micro_batch_size prompts per micro-batch
    max_new_tokens: int = 64
    temperature: float = 1.0
    eps_low: float = 0.2  # clip range of the ratio: [1 - eps_low, 1 + eps_high] (DAPO's clip-higher: 0.28)
    eps_high: float = 0.2
    kl_coef: float = 0.0  # k3 KL to the starting model; 0 = no reference model kept
    # exact_answer | format | contains -> weight; None: exact_answer alone unless a reward model is given. (A
    # dict default would be merged into a recipe's rewards by the config loader, not replaced by them.)
    rewards: dict[str, float] | None = None
    format_pattern: str = ""  # regular expression the whole reply must match (the "format" reward)
    contains: str = ""  # text the reply must contain (the "contains" reward)
    reward_model: str | None = None  # a folder written by `lmforge rm`
    reward_model_weight: float = 1.0

    @property
    def reward_weights(self) -> dict[str, float]:
        """The reward functions and weights in force (``rewards`` unset: exact_answer, without a reward model)."""
        if self.rewards is not None:
            return dict(self.rewards)
        return {} if self.reward_model is not None else {"exact_answer": 1.0}

    def __post_init__(self) -> None:
        rewards = self.reward_weights
        unknown = sorted(set(rewards) - set(REWARD_FUNCTIONS))
        if unknown:
            raise ValueError(
                f"grpo.rewards: unknown {', '.join(unknown)}; one of {', '.join(REWARD_FUNCTIONS)}"
            )
        if not rewards and self.reward_model is None:
            raise ValueError(
                "grpo: give reward functions (grpo.rewards) and/or a reward model (grpo.reward_model)"
            )
        if "format" in rewards and not self.format_pattern:
            raise ValueError("grpo.format_pattern: required by the format reward")
        if "contains" in rewards and not self.contains:
            raise ValueError("grpo.contains: required by the contains reward")
        if self.group_size < 2:
            raise ValueError(f"grpo.group_size: at least 2, got {self.group_size}")
        if not self.kl_coef >= 0:  # (NaN fails too)
            raise ValueError(f"grpo.kl_coef: must be >= 0, got {self.kl_coef}")
        for name in ("eps_low", "eps_high"):
            if not getattr(self, name) > 0:
                raise ValueError(f"grpo.{name}: the clip range must be positive, got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"grpo.max_new_tokens: at least 1, got {self.max_new_tokens}")
        if (
            not 0.0 < self.temperature <= 2.0
        ):  # sampled (the group needs different replies), in SamplingParams' range
            raise ValueError(f"grpo.temperature: must be in (0, 2], got {self.temperature}")


@dataclass
class GRPOConfig(TrainConfig):
    grpo: GRPODataConfig = field(default_factory=GRPODataConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.grpo.paths:
            raise ValueError("grpo.paths: at least one file of prompts is required")
        if not self.init_from:
            raise ValueError("init_from: the model folder to train is required")


def build_scorer(cfg: GRPODataConfig) -> Scorer:
    """The reward functions named in ``cfg.rewards`` with their weights, and the reward model if any."""
    functions: dict[str, tuple[RewardFn, float]] = {}
    for name, weight in cfg.reward_weights.items():
        if name == "exact_answer":
            functions[name] = (exact_answer, weight)
        elif name == "format":
            functions[name] = (format_reward(cfg.format_pattern), weight)
        else:
            functions[name] = (contains_reward(cfg.contains), weight)
    reward_model = None
    if cfg.reward_model is not None:
        from lmforge.model.hf import load_reward_model

        reward_model = RewardModel(*load_reward_model(cfg.reward_model)).eval()
    return Scorer(functions, reward_model, cfg.reward_model_weight)


MakeRollouts = Callable[[Transformer, Tokenizer, GRPODataConfig], Rollouts]


def run_grpo(cfg: GRPOConfig, make_rollouts: MakeRollouts, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg.init_from`` with GRPO; ``make_rollouts(policy, tokenizer, cfg.grpo)`` builds the sampler
    (:class:`lmforge.infer.rollout.EngineRollouts` for ``lmforge grpo``). Returns a summary."""
    import copy

    from lmforge.model import load_pretrained
    from lmforge.train import train

    assert cfg.init_from is not None
    # The loss is a zero-mean surrogate (advantages are normalized per group) whose value says nothing about
    # divergence, so a z-score on it only flags noise: the trainer's loss-spike rollback is off for GRPO.
    cfg = run_copy(cfg, progress, stability=dataclasses.replace(cfg.stability, spike_detection=False))
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, pad_id = chat_tokenizer(cfg)
    rejected: Counter[str] = Counter()
    max_prompt_len = cfg.data.seq_len - cfg.grpo.max_new_tokens
    prompts = load_rl_prompts(cfg.grpo.paths, tokenizer, max_prompt_len, rejected, run_dir / "rejects.jsonl")
    data_stats = {"prompts": len(prompts), "rejected": dict(rejected)}
    (run_dir / "rl_data.json").write_text(json.dumps(data_stats, indent=2) + "\n", encoding="utf-8")
    torch.manual_seed(cfg.seed)
    policy = load_pretrained(cfg.init_from).train()
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.grpo.kl_coef else None
    metrics = AlignMetrics(run_dir / "align_metrics.jsonl", cfg.log.every_steps)
    source = RolloutSource(
        prompts,
        policy,
        make_rollouts(policy, tokenizer, cfg.grpo),
        build_scorer(cfg.grpo),
        tokenizer,
        cfg.batch.micro_batch_size,
        cfg.grpo.group_size,
        pad_id,
        reference=reference,
        seed=cfg.data.seed,
    )
    objective = GRPOObjective(cfg.grpo.eps_low, cfg.grpo.eps_high, cfg.grpo.kl_coef, metrics)
    result = train(cfg, policy, objective, source, batch_hook=metrics.hook)
    metrics.flush(result.step)
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "data": data_stats,
        "loss": result.metrics.get("loss"),
        "model_dir": str(result.model_dir) if result.model_dir else None,
    }
    (run_dir / "grpo_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
