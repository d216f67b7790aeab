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


def _tokenize(args: argparse.Namespace) -> int:
    from lmforge.data.shards import ShardsError
    from lmforge.data.tokenize_shards import TokenizeConfig, tokenize_to_shards

    cfg = TokenizeConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        output=args.output,
        workers=args.workers,
        dtype=args.dtype,
        default_domain=args.domain,
        text_key=args.text_key,
        check_round_trip=not args.no_round_trip_check,
    )
    try:
        manifest = tokenize_to_shards(cfg, progress=not args.quiet)
    except (ShardsError, FileNotFoundError) as err:
        print(f"lmforge data tokenize: {err}")
        return 1
    totals = manifest["totals"]
    print(
        f"{totals['tokens']} tokens from {totals['docs']} documents in {len(manifest['shards'])} shards "
        f"({manifest['dtype']}) -> {args.output}; skipped {totals['empty_docs']} empty and "
        f"{totals['bad_records']} unreadable records; {totals['non_round_trip_docs']} documents do not round-trip"
    )
    return 0


def add_tokenize(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "tokenize",
        help="tokenize documents into token shards for training (resumes in the same output folder)",
    )
    parser.add_argument(
        "inputs", nargs="+", help="documents (files, folders, globs); DOMAIN=PATH names a domain"
    )
    parser.add_argument("--tokenizer", "-t", required=True, help="tokenizer folder")
    parser.add_argument("--output", "-o", required=True, help="shards folder")
    parser.add_argument("--workers", "-w", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    parser.add_argument(
        "--domain", default="default", help="domain of files not in a sub-folder of the inputs"
    )
    parser.add_argument("--text-key", default="text")
    parser.add_argument(
        "--no-round-trip-check", action="store_true", help="skip the decode(encode(x)) == x count"
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    parser.set_defaults(handler=_tokenize)


SUBCOMMANDS = [add_run, add_tokenize]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="data pipeline: clean, filter and de-duplicate corpora")
    subcommands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
