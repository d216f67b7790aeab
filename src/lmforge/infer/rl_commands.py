"""``lmforge grpo --config grpo.yaml [key=value ...]``: online RL with the engine as sampler.

The command lives in the infer layer because it wires the two together: the trainer's objective and rollout
source come from :mod:`lmforge.tune.grpo`, the sampler is :class:`lmforge.infer.rollout.EngineRollouts`.
"""

from __future__ import annotations

import argparse
import json


def _grpo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.infer.rollout import EngineRollouts
    from lmforge.tune.grpo import GRPOConfig, run_grpo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_grpo(config_from_args(GRPOConfig, args), EngineRollouts.for_grpo), indent=2))
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
