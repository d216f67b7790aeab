"""``lmforge data ...``: the data stage's commands.

Each sub-command is one ``add_<name>(subcommands)`` function listed in ``SUBCOMMANDS``; its handler
imports what it needs, so ``lmforge --help`` stays quick. Adding a command = write its ``add_`` function
and append it to the list.
"""

from __future__ import annotations

import argparse
import json
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


def _endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default="http://127.0.0.1:8000", help="OpenAI-compatible server (lmforge serve)"
    )
    parser.add_argument("--model", default="lmforge", help="model id the server knows")
    parser.add_argument(
        "--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key"
    )


def _endpoint(args: argparse.Namespace):
    import os

    from lmforge.data.synthetic import Endpoint

    return Endpoint(url=args.url, model=args.model, api_key=os.environ.get(args.api_key_env))


def _record_sinks(out: str, rejects: str):
    """Two JSONL files written as records come and committed at the end, or when the run stops early (an
    interrupted run keeps what it made)."""
    from fsspec.core import url_to_fs

    from lmforge.data.io import JsonlRecordFile

    return JsonlRecordFile(*url_to_fs(out)), JsonlRecordFile(*url_to_fs(rejects))


def _self_instruct(args: argparse.Namespace) -> int:
    from lmforge.data.io import read_documents
    from lmforge.data.synthetic import SelfInstructConfig, self_instruct

    seeds = [doc.text for doc in read_documents(args.seeds, text_key=args.seed_key)]
    cfg = SelfInstructConfig(
        count=args.count, rouge_threshold=args.rouge_threshold, temperature=args.temperature
    )
    out, rejects = _record_sinks(args.out, args.rejects or f"{args.out}.rejects.jsonl")
    try:
        report = self_instruct(seeds, _endpoint(args), cfg, out.write, rejects.write)
    finally:
        out.commit()
        rejects.commit()
    print(json.dumps(report.to_dict()))
    return 0


def add_self_instruct(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "self-instruct",
        help="grow chat examples from seed instructions with a served model (Self-Instruct; ROUGE-L filter)",
    )
    parser.add_argument("--seeds", required=True, help="seed tasks: JSONL with an 'instruction' field")
    parser.add_argument("--seed-key", default="instruction")
    parser.add_argument("--out", required=True, help="chat JSONL to write ({'messages': [...]})")
    parser.add_argument(
        "--rejects", help="turned-away instructions with their reason (default: OUT.rejects.jsonl)"
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--rouge-threshold", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.7)
    _endpoint_arguments(parser)
    parser.set_defaults(handler=_self_instruct)


def _label_example(value: str) -> tuple[str, str]:
    label, sep, text = value.partition("=")
    if not sep or not label or not text:
        raise argparse.ArgumentTypeError(f"{value!r} is not LABEL=TEXT")
    return label, text


def _label(args: argparse.Namespace) -> int:
    from lmforge.data.io import Document, make_reader
    from lmforge.data.synthetic import label_records

    reader = make_reader(args.input, text_key=args.text_key)
    records = (
        {**item.meta, "id": item.id, args.text_key: item.text}
        for item in reader.read(reader.files())
        if isinstance(item, Document)
    )
    examples = [(text, label) for label, text in args.example]
    out, rejects = _record_sinks(args.out, args.rejects or f"{args.out}.rejects.jsonl")
    try:
        report = label_records(
            records,
            _endpoint(args),
            args.labels,
            examples,
            out.write,
            rejects.write,
            args.text_key,
            args.gold_key,
        )
    finally:
        out.commit()
        rejects.commit()
    print(json.dumps(report.to_dict()))
    return 0


def add_label(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "label", help="label texts with a served model (few-shot); agreement with gold labels where present"
    )
    parser.add_argument("input", help="documents to label (JSONL/Parquet)")
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument(
        "--example",
        action="append",
        default=[],
        type=_label_example,
        metavar="LABEL=TEXT",
        help="a few-shot example",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--rejects")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--gold-key", default="label")
    _endpoint_arguments(parser)
    parser.set_defaults(handler=_label)


def _conversations(args: argparse.Namespace) -> int:
    from fsspec.core import url_to_fs

    from lmforge.data.conversations import convert
    from lmforge.data.io import JsonlRecordFile, read_records

    if args.format == "threads" and not args.speaker:
        print("lmforge data conversations: --format threads needs --speaker", file=sys.stderr)
        return 2
    out, rejects = _record_sinks(args.out, args.rejects or f"{args.out}.rejects.jsonl")
    pairs = JsonlRecordFile(*url_to_fs(args.pairs)) if args.pairs else None
    try:
        report = convert(
            read_records(args.input, located=True),
            out.write,
            rejects.write,
            fmt=args.format,
            paths=args.paths,
            speaker=args.speaker,
            lang=args.lang,
            write_pair=pairs.write if pairs else None,
        )
    finally:
        for sink in (out, rejects, pairs):
            if sink is not None:
                sink.commit()
    print(json.dumps(report.to_dict()))
    return 0


def add_conversations(subcommands: argparse._SubParsersAction) -> None:
    parser = subcommands.add_parser(
        "conversations",
        help="message trees (OpenAssistant or comment threads) -> chat JSONL, and ranked siblings -> pairs",
    )
    parser.add_argument("input", help="message records: JSONL/Parquet file, folder or glob")
    parser.add_argument("--out", required=True, help="chat JSONL to write ({'messages': [...], 'tree': id})")
    parser.add_argument("--format", choices=["oasst", "threads"], default="oasst")
    parser.add_argument(
        "--paths", choices=["all", "best"], default="all", help="every root-to-leaf path, or the best-ranked"
    )
    parser.add_argument("--speaker", help="threads: the author whose messages are the assistant's turns")
    parser.add_argument("--lang", help="keep only messages of this language (OpenAssistant 'lang')")
    parser.add_argument(
        "--pairs", help="also write preference pairs ({'messages', 'chosen', 'rejected'}) from sibling ranks"
    )
    parser.add_argument(
        "--rejects", help="records that are not messages, with why (default: OUT.rejects.jsonl)"
    )
    parser.set_defaults(handler=_conversations)


SUBCOMMANDS = [
    add_run,
    add_train_classifier,
    add_train_ngram,
    add_self_instruct,
    add_label,
    add_conversations,
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="data pipeline: clean, filter and de-duplicate corpora")
    subcommands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    for add in SUBCOMMANDS:
        add(subcommands)
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
