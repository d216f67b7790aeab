"""``lmforge grpo|ppo --config recipe.yaml [key=value ...]``: online RL with lmforge's engine as the sampler.

The trainer side (objectives, prompts, rewards) is :mod:`lmforge.tune.grpo` and :mod:`lmforge.tune.ppo`; the
sampler is the inference engine, :class:`lmforge.infer.rollout.EngineRollouts`. Only the top layer may import
both (the engine knows nothing of training), so the two are wired together here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.infer.rollout import EngineRollouts
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer
    from lmforge.tune.grpo import GRPODataConfig
    from lmforge.tune.ppo import PPODataConfig


def engine_rollouts(policy: Transformer, tokenizer: Tokenizer, cfg: GRPODataConfig) -> EngineRollouts:
    """The ``make_rollouts`` of :func:`lmforge.tune.grpo.run_grpo`: the engine over a copy of the policy."""
    from lmforge.infer.rollout import EngineRollouts

    return EngineRollouts(tokenizer, cfg.max_new_tokens, cfg.temperature)


def ppo_engine_rollouts(policy: Transformer, tokenizer: Tokenizer, cfg: PPODataConfig) -> EngineRollouts:
    """The ``make_rollouts`` of :func:`lmforge.tune.ppo.run_ppo`: the engine, also reporting the log-prob it
    gave each sampled token (:class:`lmforge.tune.ppo.LogprobRollouts`)."""
    from lmforge.infer.rollout import EngineRollouts
    from lmforge.infer.sampling_params import SamplingParams

    class LogprobEngineRollouts(EngineRollouts):
        def sample_with_logprobs(
            self, prompts: Sequence[Sequence[int]], n: int
        ) -> list[list[tuple[list[int], list[float]]]]:
            """Like ``sample``, with the engine's log-prob of each sampled token (raw logits, before the
            temperature: the distribution the trainer's ratio uses)."""
            if self.engine is None:
                raise RuntimeError("push_weights first: the engine samples from the pushed policy")
            params = SamplingParams(
                n=n,
                max_tokens=self.max_new_tokens,
                temperature=self.temperature,
                detokenize=False,
                logprobs=0,
            )
            outputs = self.engine.generate([list(p) for p in prompts], params)
            return [
                [
                    (list(c.token_ids), [lp.logprob for lp in c.logprobs or []])
                    for c in sorted(out.outputs, key=lambda c: c.index)
                ]
                for out in outputs
            ]

    return LogprobEngineRollouts(tokenizer, cfg.max_new_tokens, cfg.temperature)


def _grpo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.grpo import GRPOConfig, run_grpo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_grpo(config_from_args(GRPOConfig, args), engine_rollouts), indent=2))
    return 0


def _ppo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.ppo import PPOConfig, run_ppo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_ppo(config_from_args(PPOConfig, args), ppo_engine_rollouts), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "grpo",
        help="GRPO: sample groups of replies with the engine, reward them, train on group-normalized advantages",
        description="Online RL of a model folder on JSONL/Parquet prompts ({'prompt'|'messages', 'answer'?}) "
        "with the trainer of 'lmforge train': each step the policy's weights are pushed into an in-process "
        "engine, G replies per prompt are sampled and scored by reward functions (exact_answer, format, "
        "contains) and/or a reward model from 'lmforge rm'. The recipe is a TrainConfig plus a 'grpo' section.",
    )
    add_config_arguments(parser, example="grpo.group_size=8 grpo.kl_coef=0.04")
    parser.set_defaults(handler=_grpo)

    parser = subparsers.add_parser(
        "ppo",
        help="PPO (RLHF): engine rollouts, KL-penalized rewards, GAE, clipped policy and value losses",
        description="Online RL of a model folder on JSONL/Parquet prompts ({'prompt'|'messages', 'answer'?}) "
        "with the trainer of 'lmforge train': each rollout pushes the policy's weights into an in-process "
        "engine, samples replies, scores them with reward functions (exact_answer, format, contains) and/or a "
        "reward model from 'lmforge rm', subtracts a per-token KL penalty to the starting model and trains "
        "the policy and its value head for several epochs of mini-batches. The recipe is a TrainConfig plus a "
        "'ppo' section (and optionally 'peft').",
    )
    add_config_arguments(parser, example="ppo.epochs=4 ppo.kl_target=6.0")
    parser.set_defaults(handler=_ppo)
