"""``lmforge eval --config eval.yaml [key=value ...]``: tasks and perplexity for one model folder."""

from __future__ import annotations

import argparse


def _eval(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.eval.runner import EvalConfig, evaluate, results_markdown

    cfg = config_from_args(EvalConfig, args)
    results = evaluate(cfg, progress=not args.quiet)
    print(results_markdown(results))
    print(f"results written to {cfg.run_dir}/results.json")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser(
        "eval", help="evaluate a model: exact-match and multiple-choice tasks, perplexity and bits per byte"
    )
    add_config_arguments(parser, example="model=runs/sft/model batch_size=8")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_eval)
