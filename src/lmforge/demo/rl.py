"""``lmforge grpo --config grpo.yaml [key=value ...]``: online RL with lmforge's engine as the sampler.

The trainer side (objective, prompts, rewards) is :mod:`lmforge.tune.grpo`; the sampler is the inference
engine, :class:`lmforge.infer.rollout.EngineRollouts`. Only the top layer may import both (the engine knows
nothing of training), so the two are wired together here.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmforge.infer.rollout import EngineRollouts
    from lmforge.model import Transformer
    from lmforge.tokenizer import Tokenizer
    from lmforge.tune.grpo import GRPODataConfig


def engine_rollouts(policy: Transformer, tokenizer: Tokenizer, cfg: GRPODataConfig) -> EngineRollouts:
    """The ``make_rollouts`` of :func:`lmforge.tune.grpo.run_grpo`: the engine over a copy of the policy."""
    from lmforge.infer.rollout import EngineRollouts

    return EngineRollouts(tokenizer, cfg.max_new_tokens, cfg.temperature)


def _grpo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.grpo import GRPOConfig, run_grpo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_grpo(config_from_args(GRPOConfig, args), engine_rollouts), indent=2))
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
