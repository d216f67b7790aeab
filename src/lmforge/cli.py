"""``lmforge <stage> ...``: parse the command line, load the config, call the stage.

Each layer keeps its commands in a ``commands`` module exposing ``register(subparsers)``; a command's
handler is set with ``parser.set_defaults(handler=...)`` and receives the parsed ``argparse.Namespace``.
Handlers import heavy dependencies themselves, so ``lmforge --help`` stays quick. Stage commands that
take a recipe use :func:`lmforge.config.add_config_arguments` and :func:`lmforge.config.config_from_args`,
giving every stage the same ``--config recipe.yaml key.sub=value ...`` form.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from lmforge import __version__
from lmforge.config import ConfigError

# One line per layer that contributes commands, in the order they appear in ``lmforge --help``.
COMMAND_MODULES: list[str] = [
    "lmforge.data.commands",
    "lmforge.tokenizer.commands",
    "lmforge.shards.commands",
    "lmforge.model.commands",
    "lmforge.train.commands",
    "lmforge.tune.commands",
    "lmforge.infer.commands",
    "lmforge.infer.rl_commands",
    "lmforge.serve.commands",
    "lmforge.eval.commands",
    "lmforge.demo.commands",
]


# Commands that moved to the layer that owns them; the old spelling keeps working, with a note.
MOVED_COMMANDS: dict[tuple[str, str], list[str]] = {
    ("data", "tokenize"): ["shards", "tokenize"],
    ("data", "mixture"): ["shards", "mixture"],
    ("data", "doremi"): ["doremi"],
}


def _moved(argv: list[str]) -> list[str]:
    new = MOVED_COMMANDS.get(tuple(argv[:2]))  # type: ignore[arg-type]
    if new is None:
        return argv
    print(f"lmforge: '{' '.join(argv[:2])}' is now 'lmforge {' '.join(new)}'", file=sys.stderr)
    return [*new, *argv[2:]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge", description="From a raw text corpus to a served chat model."
    )
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_moved(list(sys.argv[1:] if argv is None else argv)))
    handler: Any = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except ConfigError as err:
        print(f"lmforge: config error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
