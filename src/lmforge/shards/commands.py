"""``lmforge shards tokenize|mixture``: documents -> token shards, and what a data config's mixture draws."""

from __future__ import annotations

import argparse


def _tokenize(args: argparse.Namespace) -> int:
    from lmforge.shards.format import ShardsError
    from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards

    cfg = TokenizeConfig(
        inputs=args.inputs,
        tokenizer=args.tokenizer,
        output=args.output,
        workers=args.workers,
        dtype=args.dtype,
        default_domain=args.domain,
        text_key=args.text_key,
        round_trip_check=args.round_trip_check,
        allow_special_tokens=args.allow_special_tokens,
        executor=args.executor,
        ray_address=args.ray_address,
    )
    try:
        manifest = tokenize_to_shards(cfg, progress=not args.quiet)
    except (ShardsError, FileNotFoundError) as err:
        print(f"lmforge shards tokenize: {err}")
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
    parser.add_argument("--workers", "-w", type=int, default=1, help="tokenizer processes (or Ray workers)")
    parser.add_argument(
        "--executor", default="local", choices=["local", "ray"], help="the data pipeline's executor to run on"
    )
    parser.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    parser.add_argument(
        "--domain", default="default", help="domain of files not in a sub-folder of the inputs"
    )
    parser.add_argument("--text-key", default="text")
    parser.add_argument(
        "--round-trip-check",
        default="auto",
        choices=["auto", "always", "never"],
        help="count documents with decode(encode(x)) != x (auto: skip for lossless byte-level BPE)",
    )
    parser.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="parse special-token text in documents as special tokens",
    )
    parser.add_argument("--quiet", "-q", action="store_true")
    parser.set_defaults(handler=_tokenize)


def _mixture(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmforge.config import config_from_args, save_config
    from lmforge.shards.format import ShardsError
    from lmforge.shards.loader import DataConfig, mixture_report

    cfg = config_from_args(DataConfig, args)
    try:
        report = mixture_report(cfg, args.sequences)
    except (ShardsError, ValueError) as err:
        print(f"lmforge shards mixture: {err}")
        return 1
    for stage in report:
        budget = f", {stage['tokens_budget']:,} tokens" if stage["tokens_budget"] else ""
        table = Table(title=f"{stage['stage']}: seq_len {stage['seq_len']}{budget}")
        for column in ("domain", "tokens", "target weight", f"realised ({args.sequences} seqs)"):
            table.add_column(column, justify="left" if column == "domain" else "right")
        for domain, row in stage["domains"].items():
            table.add_row(domain, f"{row['tokens']:,}", f"{row['weight']:.4f}", f"{row['realised']:.4f}")
        Console().print(table)
    if args.write:
        save_config(cfg, args.write)
        print(f"wrote the data config to {args.write}")
    return 0


def add_mixture(subcommands: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subcommands.add_parser(
        "mixture",
        help="show a data config's mixture weights per curriculum stage and the proportions the loader draws",
        description="Overrides are DataConfig fields, e.g. shards=[out/web,out/code] mixture.strategy=temperature "
        "mixture.temperature=2 (or a YAML with a curriculum: list of stages with tokens, seq_len, mixture).",
    )
    add_config_arguments(parser, example="mixture.strategy=temperature mixture.temperature=2")
    parser.add_argument("--sequences", type=int, default=10_000, help="sequences drawn per stage")
    parser.add_argument("--write", metavar="YAML", help="save the resolved data config here")
    parser.set_defaults(handler=_mixture)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("shards", help="token shards: tokenize documents, inspect mixtures")
    subcommands = parser.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    for add in (add_tokenize, add_mixture):
        add(subcommands)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
