"""``lmforge data ...``: the data stage's commands.

Each sub-command is one ``add_<name>(subcommands)`` function listed in ``SUBCOMMANDS``; its handler
imports what it needs, so ``lmforge --help`` stays quick. Adding a command = write its ``add_`` function
and append it to the list.
"""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from lmforge.data.pipeline import PipelineError
    from lmforge.data.recipe import run_recipe

    try:
        report = run_recipe(args.recipe, args.overrides, progress=not args.quiet)
    except PipelineError as err:
        print(f"lmforge data run: {err}", file=sys.stderr)
        return 1
    return 0 if report.balanced else 1


def add_run(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "run", help="clean a corpus with a pipeline recipe (resumes an interrupted run in the same run_dir)"
    )
    parser.add_argument("recipe", help="pipeline recipe (YAML)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="e.g. workers=8 steps.gopher_quality.min_doc_words=60",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or report table")
    parser.set_defaults(handler=_run)


def _read_texts(path: str) -> list[str]:
    """The texts of every readable document under ``path`` (any reader format); unreadable ones are counted."""
    from lmforge.data.document import Document
    from lmforge.data.io import make_reader

    reader = make_reader(path)
    texts, bad = [], 0
    for item in reader.read(reader.files()):
        if isinstance(item, Document):
            texts.append(item.text)
        else:
            bad += 1
    print(f"{path}: {len(texts)} documents" + (f", {bad} unreadable records skipped" if bad else ""))
    return texts


def _train_classifier(args: argparse.Namespace) -> int:
    from lmforge.data.classifier import accuracy, split_holdout, train_classifier

    positive, held_positive = split_holdout(_read_texts(args.positive), args.holdout, args.seed)
    negative, held_negative = split_holdout(_read_texts(args.negative), args.holdout, args.seed)
    if not positive or not negative:
        print("lmforge data train-classifier: need documents on both sides")
        return 1
    model = train_classifier(
        positive, negative, dim=1 << args.hash_bits, ngrams=args.ngrams, epochs=args.epochs,
        learning_rate=args.lr, l2=args.l2, seed=args.seed,
    )  # fmt: skip
    model.info["train_accuracy"] = accuracy(model, positive, negative)
    model.info["holdout_accuracy"] = accuracy(model, held_positive, held_negative)
    model.save(args.out)
    print(
        f"train accuracy {model.info['train_accuracy']:.4f}, held-out accuracy {model.info['holdout_accuracy']:.4f} "
        f"({len(held_positive)} + {len(held_negative)} documents) -> {args.out}"
    )
    return 0


def add_train_classifier(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "train-classifier",
        help="train the hashed n-gram quality classifier used by the quality_classifier step",
    )
    parser.add_argument(
        "--positive", required=True, help="documents to keep (JSONL/Parquet/txt/... file or folder)"
    )
    parser.add_argument("--negative", required=True, help="documents to filter out")
    parser.add_argument("--out", required=True, help="model file (.npz)")
    parser.add_argument("--ngrams", type=int, default=2, help="word n-grams up to this length")
    parser.add_argument("--hash-bits", type=int, default=18, help="2^bits feature buckets")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.5, help="Adagrad learning rate")
    parser.add_argument("--l2", type=float, default=1e-6)
    parser.add_argument(
        "--holdout", type=float, default=0.1, help="fraction of each side held out for accuracy"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=_train_classifier)


def _train_ngram(args: argparse.Namespace) -> int:
    from lmforge.data.filters.ngram_perplexity import KneserNeyLM

    model = KneserNeyLM.train(
        _read_texts(args.text), order=args.order, unit=args.unit, discount=args.discount
    )
    model.save(args.out)
    print(
        f"{args.order}-gram {args.unit} model, {len(model.counts)} n-grams, vocabulary {len(model.vocab)} -> {args.out}"
    )
    return 0


def add_train_ngram(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "train-ngram", help="train the Kneser-Ney n-gram model used by the perplexity step"
    )
    parser.add_argument("--text", required=True, help="reference documents (file or folder)")
    parser.add_argument("--out", required=True, help="model file (.json.gz)")
    parser.add_argument("--order", type=int, default=3)
    parser.add_argument("--unit", choices=["word", "char"], default="word")
    parser.add_argument("--discount", type=float, default=0.75)
    parser.set_defaults(handler=_train_ngram)


SUBCOMMANDS = [add_run, add_train_classifier, add_train_ngram]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="data pipeline: clean, filter and de-duplicate corpora")
    subcommands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
