"""``lmforge demo``: the whole lifecycle in one command, from the Python standard library to a chat server."""

from __future__ import annotations

import argparse
from typing import Any

from lmforge.demo.config import SIZES


def build_config(args: argparse.Namespace) -> Any:
    """Size defaults, then the recipe file, then the flags, then ``key=value`` overrides."""
    import yaml
    from omegaconf import OmegaConf

    from lmforge.config import ConfigError, config_from_args
    from lmforge.demo.config import DemoConfig, size_defaults

    recipe: dict[str, Any] = {}
    if args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                recipe = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{args.config}: {err}") from err
    size = args.size or recipe.get("size") or "tiny"
    flags: dict[str, Any] = {"size": size}
    if args.run_dir:
        flags["run_dir"] = args.run_dir
    if args.corpus:
        flags["corpus"] = {"paths": args.corpus}
    if args.no_serve:
        flags["serve"] = False
    if args.port:
        flags["port"] = args.port
    merged = OmegaConf.to_container(OmegaConf.merge(size_defaults(size), recipe, flags))
    return config_from_args(DemoConfig, args, base=merged)  # type: ignore[arg-type]


def _demo(args: argparse.Namespace) -> int:
    from lmforge.demo.pipeline import Demo

    cfg = build_config(args)
    demo = Demo(cfg)
    if args.restart_from:
        demo.restart_from(args.restart_from)
    demo.run()
    if cfg.serve:
        return demo.serve()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments
    from lmforge.demo.pipeline import STAGES

    parser = subparsers.add_parser(
        "demo",
        help="the whole lifecycle on this machine: data, tokenizer, pretraining, SFT, eval, report card, server",
        description="Clean a corpus (default: the Python standard library on this machine), train a tokenizer, "
        "pretrain a small model, fine-tune it on generated instruction tasks, evaluate base vs SFT, write a "
        "report card and serve the chat model. A rerun skips finished stages.",
    )
    parser.add_argument(
        "--size", choices=list(SIZES), help="scales corpus, model and steps together (default: tiny)"
    )
    parser.add_argument("--run-dir", help="run folder (default: runs/demo)")
    parser.add_argument(
        "--corpus",
        action="append",
        metavar="PATH",
        help="your own corpus instead of the standard library: a JSONL/Parquet/txt/HTML file, folder or glob "
        "(repeatable)",
    )
    parser.add_argument("--no-serve", action="store_true", help="stop after the report card")
    parser.add_argument("--port", type=int, help="server port (default: 8000)")
    parser.add_argument("--restart-from", choices=list(STAGES), help="redo this stage and every later one")
    add_config_arguments(parser, example="pretrain.steps=200 model.n_layers=2")
    parser.set_defaults(handler=_demo)
