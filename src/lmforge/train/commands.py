"""``lmforge train --config RECIPE.yaml key=value ...``: pretrain (or continue) a model from token shards;
``lmforge doremi``: learn mixture weights with DoReMi.

Multi-process runs are launched with torchrun, e.g.
``torchrun --nproc_per_node 4 -m lmforge.cli train --config recipe.yaml parallel.tp=2``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lmforge.config import add_config_arguments


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from token shards (resumes from the run folder's newest checkpoint)",
        description="Train a Transformer with the one lmforge trainer. The recipe is a TrainConfig "
        "(model, data, optim, schedule, batch, precision, checkpoint, stability, parallel, log).",
    )
    add_config_arguments(parser, example="max_steps=2000 optim.lr=1e-3")
    parser.set_defaults(handler=run_train)
    _register_doremi(subparsers)


def run_train(args: argparse.Namespace) -> int:
    import logging

    import torch.distributed as dist

    from lmforge.config import config_from_args
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(TrainConfig, args)
    result = train(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary = {
            "run_dir": str(result.run_dir),
            "step": result.step,
            "loss": result.metrics.get("loss"),
            "val_loss": result.val_loss,
            "rollbacks": result.rollbacks,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None,
            "model_dir": str(result.model_dir) if result.model_dir else None,
        }
        print(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _doremi(args: argparse.Namespace) -> int:
    import json

    from lmforge.config import config_from_args
    from lmforge.train.doremi import DoReMiConfig, run_doremi

    weights = run_doremi(config_from_args(DoReMiConfig, args))
    print(json.dumps({"domain_weights": weights}, indent=2))
    return 0


def _register_doremi(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doremi",
        help="learn domain weights with DoReMi (reference model, then a Group-DRO proxy) into a weights file",
        description="The recipe is a DoReMiConfig: train (a TrainConfig for both models), run_dir, "
        "reference (optional trained model folder), reference_steps, proxy_steps, eta, smoothing, output. "
        "Use the weights with mixture.strategy=fixed mixture.weights_file=RUN_DIR/domain_weights.json.",
    )
    add_config_arguments(parser, example="proxy_steps=500 train.data.seq_len=512")
    parser.set_defaults(handler=_doremi)
