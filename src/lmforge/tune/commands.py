"""``lmforge sft|rm|dpo --config recipe.yaml [key=value ...]``: fine-tuning stages in the one trainer."""

from __future__ import annotations

import argparse
import json


def _sft(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.finetune import SFTConfig, run_sft

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(SFTConfig, args)
    result, stats = run_sft(cfg)
    summary = {
        "run_dir": str(result.run_dir),
        "step": result.step,
        "loss": result.metrics.get("loss"),
        "val_loss": result.val_loss,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "data": stats.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _rm(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.reward import RewardConfig, run_rm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_rm(config_from_args(RewardConfig, args)), indent=2))
    return 0


def _dpo(args: argparse.Namespace) -> int:
    import logging

    from lmforge.config import config_from_args
    from lmforge.tune.dpo import DPOConfig, run_dpo

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(run_dpo(config_from_args(DPOConfig, args)), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL (loss on assistant tokens; packed; HF-layout export)",
        description="Fine-tune a model folder (lmforge or Hugging Face) on JSONL chats ('messages') or "
        "prompt/completion pairs, with the trainer of 'lmforge train'. The recipe is a TrainConfig plus an "
        "'sft' section (paths, val_paths, pack, group_by_length).",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_sft)

    parser = subparsers.add_parser(
        "rm",
        help="train a reward model on preference pairs or rankings (Bradley-Terry; HF sequence-classification export)",
        description="Train a scalar-head reward model from a model folder on JSONL/Parquet preference pairs "
        "({'prompt', 'chosen', 'rejected'}) or rankings ({'prompt', 'responses', 'ranking'}), with the trainer "
        "of 'lmforge train'. The recipe is a TrainConfig plus an 'rm' section (paths, val_paths, "
        "center_rewards_coefficient).",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_rm)

    parser = subparsers.add_parser(
        "dpo",
        help="align a model on preference pairs with DPO (sigmoid/cDPO, robust, hinge, IPO)",
        description="Direct Preference Optimization of a model folder on JSONL/Parquet preference pairs or "
        "rankings, with the trainer of 'lmforge train'; the starting model is the reference (its log-probs "
        "computed once). The recipe is a TrainConfig plus a 'dpo' section (paths, val_paths, beta, loss_type, "
        "label_smoothing).",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_dpo)
