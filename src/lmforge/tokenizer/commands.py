"""``lmforge tokenizer train|encode|inspect``."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any


def iter_input_documents(
    inputs: list[str], text_key: str, max_docs: int | None, skipped: Counter[str]
) -> Iterator[tuple[str, Any]]:
    """``(input group, document)`` pairs from documents files; unreadable records are counted in
    ``skipped`` by reason kind. Groups follow ``lmforge shards tokenize``'s domains (``NAME=PATH`` or the
    first folder below the inputs' common root)."""
    from lmforge.data.inputs import plan_inputs
    from lmforge.data.io import Reject, make_reader

    tasks = plan_inputs(inputs, text_key=text_key)
    seen = 0
    for task in tasks:
        reader = make_reader(task.path, text_key=text_key)
        for item in reader.read([task.path]):
            if isinstance(item, Reject):
                skipped[item.reason.split(":")[0]] += 1
                continue
            yield task.domain, item
            seen += 1
            if max_docs is not None and seen >= max_docs:
                return


def _report_skipped(skipped: Counter[str]) -> None:
    if skipped:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(skipped.items()))
        print(f"skipped {sum(skipped.values())} unreadable or empty records ({kinds})", file=sys.stderr)


def _train(args: argparse.Namespace) -> int:
    from lmforge.config import config_from_args
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer

    cfg = config_from_args(TokenizerTrainConfig, args)
    skipped: Counter[str] = Counter()
    texts = (doc.text for _, doc in iter_input_documents(args.input, args.text_key, args.max_docs, skipped))
    tok = train_tokenizer(texts, cfg, total=args.max_docs, progress=not args.quiet)
    tok.save(args.output)
    _report_skipped(skipped)
    print(
        f"saved a {cfg.kind} tokenizer with {tok.vocab_size} tokens to {args.output} (sha256 {tok.sha256()[:16]})"
    )
    return 0


def _extend(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.extend import ExtendError, extend_tokenizer, tokens_per_char

    base = load_tokenizer(args.base)
    skipped: Counter[str] = Counter()
    texts = [doc.text for _, doc in iter_input_documents(args.corpus, args.text_key, args.max_docs, skipped)]
    _report_skipped(skipped)
    try:
        extended, added = extend_tokenizer(base, texts, args.add, args.min_frequency)
    except ExtendError as err:
        print(f"lmforge tokenizer extend: {err}", file=sys.stderr)
        return 2
    extended.save(args.output)
    before, after = tokens_per_char(base, texts), tokens_per_char(extended, texts)
    print(
        f"added {len(added)} of {args.add} pieces (ids {base.vocab_size}..{extended.vocab_size - 1}) -> {args.output}; "
        f"tokens per character on the corpus {before:.3f} -> {after:.3f}"
    )
    return 0


def _encode(args: argparse.Namespace) -> int:
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text, add_special_tokens=args.add_special_tokens)
    if args.tokens:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(json.dumps(ids))
    return 0


def _group_key(group_by: str, domain: str, meta: dict[str, Any]) -> str:
    if group_by == "domain":
        return domain
    return str(meta.get(group_by, "(none)"))


def _inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.inspection import inspect_texts

    tok = load_tokenizer(args.tokenizer)
    skipped: Counter[str] = Counter()
    docs = iter_input_documents(args.input, args.text_key, args.max_docs, skipped)
    groups = ((_group_key(args.group_by, domain, doc.meta), doc.text) for domain, doc in docs)
    stats = inspect_texts(tok, groups)
    report = {group: s.to_dict() for group, s in sorted(stats.items())}
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        table = Table(title=f"{args.tokenizer} (vocab {tok.vocab_size}) by {args.group_by}")
        for column in ("group", "docs", "bytes/token", "fallback share", "round-trip rate"):
            table.add_column(column, justify="left" if column == "group" else "right")
        for group, s in sorted(stats.items()):
            table.add_row(
                group,
                str(s.docs),
                f"{s.bytes_per_token:.3f}",
                f"{s.fallback_share:.2%}",
                f"{s.round_trip_rate:.2%}",
            )
        Console().print(table)
    _report_skipped(skipped)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmforge.config import add_config_arguments

    parser = subparsers.add_parser("tokenizer", help="train, try and inspect tokenizers")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)

    train = sub.add_parser(
        "train",
        help="train a tokenizer on documents (JSONL/Parquet)",
        description="Overrides are TokenizerTrainConfig fields: kind=byte_bpe|char_bpe|wordpiece|unigram "
        "vocab_size=32000 normalization=none|nfkc|nfc split_digits=false|true min_frequency=2 ...",
    )
    train.add_argument(
        "--input", "-i", nargs="+", required=True, help="documents: files, folders, globs, NAME=PATH"
    )
    train.add_argument("--output", "-o", required=True, help="tokenizer folder to write")
    train.add_argument("--text-key", default="text")
    train.add_argument("--max-docs", type=int, default=None, help="train on at most this many documents")
    train.add_argument("--quiet", "-q", action="store_true")
    add_config_arguments(train, example="vocab_size=8000 kind=unigram")
    train.set_defaults(handler=_train)

    extend = sub.add_parser(
        "extend",
        help="append BPE pieces learned on a new language's text to a tokenizer, keeping every old id",
        description="Then grow a model to the new vocabulary with 'lmforge resize MODEL --tokenizer NEW --out DIR'.",
    )
    extend.add_argument("base", help="tokenizer (or model) folder to extend, or a Hub id")
    extend.add_argument(
        "--corpus", nargs="+", required=True, help="documents in the new language (files, folders)"
    )
    extend.add_argument("--add", type=int, required=True, help="how many pieces to add")
    extend.add_argument("--output", "-o", required=True, help="tokenizer folder to write")
    extend.add_argument("--min-frequency", type=int, default=2)
    extend.add_argument("--text-key", default="text")
    extend.add_argument("--max-docs", type=int, default=None)
    extend.set_defaults(handler=_extend)

    encode = sub.add_parser("encode", help="print the token ids (or tokens) of a text")
    encode.add_argument("tokenizer", help="tokenizer folder")
    encode.add_argument("text", nargs="?", help="text to encode (default: stdin)")
    encode.add_argument("--tokens", action="store_true", help="print token strings instead of ids")
    encode.add_argument(
        "--add-special-tokens", action="store_true", help="add BOS as the tokenizer configures"
    )
    encode.set_defaults(handler=_encode)

    inspect = sub.add_parser(
        "inspect",
        help="bytes per token, byte-fallback/unknown share and round-trip rate per group of documents",
    )
    inspect.add_argument("tokenizer", help="tokenizer folder")
    inspect.add_argument(
        "--input", "-i", nargs="+", required=True, help="documents: files, folders, globs, NAME=PATH"
    )
    inspect.add_argument(
        "--group-by", default="domain", help="'domain' (input folder / NAME=) or a meta key such as language"
    )
    inspect.add_argument("--text-key", default="text")
    inspect.add_argument("--max-docs", type=int, default=None)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.set_defaults(handler=_inspect)
