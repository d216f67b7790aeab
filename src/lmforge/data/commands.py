"""``lmforge data ...``: the data stage's commands.

Each sub-command is one ``add_<name>(subcommands)`` function listed in ``SUBCOMMANDS``; its handler
imports what it needs, so ``lmforge --help`` stays quick. Adding a command = write its ``add_`` function
and append it to the list.
"""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import PipelineError
    from lmforge.data.recipe import run_recipe

    try:
        report = run_recipe(args.recipe, args.overrides, progress=not args.quiet)
    except PipelineError as err:
        print(f"lmforge data run: {err}")
        return 1
    return 0 if report.balanced else 1


def add_run(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "run", help="clean a corpus with a pipeline recipe (resumes an interrupted run in the same run_dir)"
    )
    parser.add_argument("recipe", help="pipeline recipe (YAML)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. workers=8")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or report table")
    parser.set_defaults(handler=_run)


SUBCOMMANDS = [add_run]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="data pipeline: clean, filter and de-duplicate corpora")
    subcommands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
