"""``lmforge <stage> ...``: parse the command line, load the config, call the stage.

Each layer keeps its commands in a ``commands`` module exposing ``register(subparsers)``; a command's
handler is set with ``parser.set_defaults(handler=...)`` and receives the parsed ``argparse.Namespace``.
Handlers import heavy dependencies themselves, so ``lmforge --help`` stays quick. Stage commands that
take a recipe use :func:`lmforge.config.add_config_arguments` and :func:`lmforge.config.config_from_args`,
giving every stage the same ``--config recipe.yaml key.sub=value ... [--print-config]`` form.

Known errors reach the user as one line, ``lmforge: error: ...``: exit status 2 for a recipe or argument
that does not fit (:class:`~lmforge.config.ConfigError`), 1 for a run that cannot go on (``RUN_ERRORS``).
``lmforge --debug ...`` shows their tracebacks instead.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
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
    "lmforge.serve.commands",
    "lmforge.eval.commands",
    "lmforge.demo.commands",
    "lmforge.demo.rl",
]


# Errors of a run that cannot go on, by defining module: they are only looked up when that module has been
# imported (which it has, if it raised one), so ``lmforge --help`` imports none of them.
RUN_ERRORS: dict[str, tuple[str, ...]] = {
    "lmforge.train.trainer": ("TrainingError",),
    "lmforge.train.checkpoint": ("NonFiniteCheckpointError",),
    "lmforge.shards.format": ("ShardsError",),
    "lmforge.model.hf": ("ModelLoadError",),
    "lmforge.model.gguf": ("GGUFExportError",),
    "lmforge.hub": ("HubError",),
    "lmforge.data.pipeline": ("PipelineError",),
}


def _is_run_error(err: BaseException) -> bool:
    loaded = (sys.modules.get(name) for name in RUN_ERRORS)
    classes = tuple(
        getattr(module, cls) for module, names in zip(loaded, RUN_ERRORS.values()) if module for cls in names
    )
    return isinstance(err, classes)


# Optional dependencies, by top-level module, and the extra that installs each (pyproject.toml).
EXTRAS: dict[str, str] = {
    **dict.fromkeys(("pyarrow", "fsspec", "zstandard", "trafilatura", "py3langid", "warcio", "ftfy"), "data"),
    **dict.fromkeys(("fastapi", "uvicorn", "prometheus_client", "httpx", "starlette"), "serve"),
    "ray": "ray",
    "gguf": "export",
    **dict.fromkeys(("transformers", "peft", "datasketch", "openai", "lm_eval", "hypothesis"), "test"),
}


def missing_extra(err: BaseException) -> str | None:
    """The message for a command whose optional dependency is not installed, or None."""
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return None
    extra = EXTRAS.get(err.name.split(".")[0])
    if extra is None:
        return None
    return f"lmforge: this needs the '{extra}' extra ({err.name} is not installed): pip install 'lmforge[{extra}]'"


def _error(err: BaseException) -> str:
    return "lmforge: error: " + " ".join(str(err).split())


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
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of one line"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    options = list(itertools.takewhile(lambda arg: arg.startswith("-"), argv))  # e.g. --debug
    args = parser.parse_args([*options, *_moved(argv[len(options) :])])
    handler: Any = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except ConfigError as err:
        if args.debug:
            raise
        print(_error(err), file=sys.stderr)
        return 2
    except Exception as err:
        if not args.debug and missing_extra(err):
            print(missing_extra(err), file=sys.stderr)
            return 1
        if args.debug or not _is_run_error(err):
            raise
        print(_error(err), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
