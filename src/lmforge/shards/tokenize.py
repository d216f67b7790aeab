"""``lmforge shards tokenize``: documents (JSONL/Parquet, the pipeline's output) -> token shards.

Tokenization is a data pipeline whose writer is :class:`ShardSink`: one task per input file, one shard per
task, run by the data layer's executor (worker processes, or Ray); each process loads the tokenizer once
and encodes documents in batches through the ``tokenizers`` batch path. Shard ``i`` holds the documents of
the ``i``-th input file (inputs sorted), each followed by EOS, so the output depends only on the inputs and
the tokenizer: a rerun, with any number of workers, writes the same bytes.

Resuming is the executor's: its bookkeeping (``OUTPUT/pipeline/``: the job's fingerprint with the input
files, tokenizer hash and dtype, a completion marker per task, rejects, a report) makes a relaunch into the
same output folder check that it is the same job and skip every finished shard. A killed worker leaves
only ``.tmp`` files, which are rewritten.

Each input file has a domain (:mod:`lmforge.data.inputs`: ``NAME=PATH``, else the first folder below the
inputs' common root, else ``default_domain``); the loader's mixtures sample these domains.

Bad input is counted per shard and in the manifest, never silently dropped:

- unreadable records (no text, malformed JSON, binary...): skipped, ``bad_records``, reasons in
  ``pipeline/rejects/0/NAME.jsonl.gz``; empty documents: skipped, ``empty_docs``;
- documents whose decoded tokens differ from the text: kept (the model sees the normalized text),
  ``non_round_trip_docs``; ``round_trip_check="auto"`` skips the decoding for tokenizers that are lossless
  by construction, where the count is exactly 0 (the manifest's ``round_trip_check`` says which);
- documents containing a special token's text (``<|end_of_text|>``...): ``special_text_docs``. That text
  is encoded as plain text, so a document quoting EOS cannot end itself early (``allow_special_tokens``
  parses it as the special tokens instead, for pre-rendered chat text).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.config import check_choice
from lmforge.data.executor import EXECUTORS
from lmforge.data.inputs import InputFile, plan_inputs
from lmforge.shards.format import (
    FORMAT,
    ShardsError,
    ShardStats,
    ShardWriter,
    build_manifest,
    choose_dtype,
    read_shard_record,
    write_manifest,
)

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

RUN_FOLDER = "pipeline"  # the executor's bookkeeping inside the output folder
ROUND_TRIP_CHECKS = ("auto", "always", "never")


def resolve_round_trip_check(mode: str, tok: Tokenizer) -> str:
    """What the round-trip count means: "checked" (every document decoded), "lossless" (exact 0 without
    decoding), or "unchecked"."""
    from lmforge.tokenizer.inspection import is_lossless

    if mode == "never":
        return "unchecked"
    if mode == "auto" and is_lossless(tok):
        return "lossless"
    return "checked"


@dataclass
class TokenizeConfig:
    inputs: list[str] = field(default_factory=list)  # files, folders, globs; "domain=path" names the domain
    tokenizer: str = ""  # tokenizer folder
    output: str = ""  # shards folder
    workers: int = 1
    dtype: str = "auto"  # auto | uint16 | uint32
    default_domain: str = "default"
    text_key: str = "text"
    format: str = "auto"  # reader format (jsonl, parquet, ...), auto from the extension
    batch_docs: int = 256  # documents per encode_batch call
    round_trip_check: str = "auto"  # auto (decode unless lossless by construction) | always | never
    allow_special_tokens: bool = False  # parse special-token text in documents as the special tokens
    executor: str = "local"  # local | ray (the data pipeline's executors)
    ray_address: str | None = None

    def __post_init__(self) -> None:
        check_choice("round_trip_check", self.round_trip_check, ROUND_TRIP_CHECKS)
        check_choice("executor", self.executor, EXECUTORS)
        if self.workers < 1 or self.batch_docs < 1:
            raise ValueError("workers and batch_docs must be >= 1")


def plan_tasks(cfg: TokenizeConfig) -> list[InputFile]:
    """Every input file with its domain and shard name, in a fixed order."""
    try:
        return plan_inputs(cfg.inputs, cfg.format, cfg.text_key, cfg.default_domain)
    except ValueError as err:
        raise ShardsError(str(err)) from err


# -- the pipeline's writer: one token shard per task --------------------------------------------------------

_TOKENIZERS: dict[str, Tokenizer] = {}  # per process: loaded once, shared by every task the process runs


class _ShardTaskFile:
    """What the pipeline writes one task's documents into: they are encoded in batches through the
    ``tokenizers`` batch path and appended, each followed by EOS, to the task's shard."""

    def __init__(self, sink: ShardSink, task: int) -> None:
        self.sink, self.input = sink, sink.inputs[task]
        self.tok = sink.tokenizer()
        self.writer = ShardWriter(sink.folder, self.input.name, np.dtype(sink.dtype))
        self.stats = ShardStats()
        self.batch: list[tuple[str, str | None]] = []
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        source = record["meta"].get("source")
        self.batch.append((record["text"], str(source) if source is not None else None))
        self.count += 1
        if len(self.batch) >= self.sink.batch_docs:
            self._flush()

    def _flush(self) -> None:
        tok, stats = self.tok, self.stats
        texts = [text for text, _ in self.batch]
        ids_list = [e.ids for e in tok.backend.encode_batch_fast(texts, add_special_tokens=False)]
        decoded = None
        if self.sink.round_trip == "checked":
            decoded = tok.backend.decode_batch(ids_list, skip_special_tokens=False)
        specials = self.sink.special_texts
        flat: list[int] = []
        lengths: list[int] = []
        for k, ((text, source), ids) in enumerate(zip(self.batch, ids_list)):
            if not ids:
                stats.empty_docs += 1
                continue
            if any(special in text for special in specials):
                stats.special_text_docs += 1
            if decoded is not None and decoded[k] != text:
                stats.non_round_trip_docs += 1
            flat.extend(ids)
            flat.append(tok.eos_id)
            lengths.append(len(ids) + 1)
            if source is not None:
                stats.sources[source] += len(ids) + 1
        # one conversion and one write per batch: per-document numpy calls cost more than the encode
        self.writer.extend(np.array(flat, dtype=self.writer.dtype), lengths)
        stats.docs += len(lengths)
        stats.tokens += len(flat)
        self.batch.clear()

    def commit(self) -> None:
        if self.batch:
            self._flush()
        self.writer.close(self.stats, {"domain": self.input.domain, "input": self.input.path})

    def abort(self) -> None:
        self.writer.abort()


class ShardSink:
    """The writer of the tokenization pipeline: task ``i`` (input file ``i`` of the plan) becomes shard
    ``NAME`` (``.bin``, ``.idx.npy`` and the ``NAME.json`` statistics) in ``folder``."""

    def __init__(
        self, cfg: TokenizeConfig, inputs: list[InputFile], tok: Tokenizer, dtype: np.dtype, round_trip: str
    ) -> None:
        self.folder = cfg.output
        self.tokenizer_dir = cfg.tokenizer
        self.tokenizer_sha256 = tok.sha256()
        self.dtype = np.dtype(dtype).name
        self.batch_docs = cfg.batch_docs
        self.allow_special_tokens = cfg.allow_special_tokens
        self.round_trip = round_trip
        self.inputs = inputs
        self.special_texts = [t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special]
        # what determines the bytes written, as the run folder's fingerprint records it
        special = "parsed" if cfg.allow_special_tokens else "text"
        self.format = f"{FORMAT} {self.dtype} tokenizer={self.tokenizer_sha256} special={special}"

    def tokenizer(self) -> Tokenizer:
        tok = _TOKENIZERS.get(self.tokenizer_sha256)
        if tok is None:
            from lmforge.tokenizer import load_tokenizer

            # one thread per process: parallelism comes from the workers, and the tokenizers thread pool
            # must not oversubscribe the cores the other workers use
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            tok = load_tokenizer(self.tokenizer_dir)
            if tok.sha256() != self.tokenizer_sha256:
                raise ShardsError(f"{self.tokenizer_dir} changed while the job was running")
            _TOKENIZERS[self.tokenizer_sha256] = tok
        tok.backend.encode_special_tokens = not self.allow_special_tokens
        return tok

    def open(self, task: int) -> _ShardTaskFile:
        return _ShardTaskFile(self, task)


# -- driver ---------------------------------------------------------------------------------------------------


def _check_same_job(run_dir: Path, sink: ShardSink) -> None:
    """Name what differs when the folder holds shards of another job (the pipeline would refuse it too,
    less precisely)."""
    fingerprint = run_dir / "pipeline.json"
    if not fingerprint.is_file():
        return
    previous = json.loads(fingerprint.read_text(encoding="utf-8"))["output"]["format"]
    if previous != sink.format:
        old = dict(part.split("=", 1) for part in previous.split() if "=" in part)
        what = (
            "tokenizer sha256" if old.get("tokenizer") != sink.tokenizer_sha256 else "dtype or special tokens"
        )
        raise ShardsError(
            f"{sink.folder} holds shards of another job ({what} differs: {previous!r} != {sink.format!r}); "
            "use a new output folder"
        )


def _reader_counts(marker: dict[str, Any]) -> tuple[int, int]:
    """(empty documents, unreadable records) that the reader turned away in one task."""
    rejects: dict[str, int] = marker["reader_rejects"]
    empty = sum(n for reason, n in rejects.items() if reason.startswith("empty"))
    return empty, sum(rejects.values()) - empty


def tokenize_to_shards(cfg: TokenizeConfig, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into ``cfg.output``; returns the manifest (also written to disk).

    The work runs as a data pipeline (one task per input file) under the data layer's executor, which
    resumes a killed job (tasks with a completion marker are skipped), keeps the rejects and checks that a
    relaunch is the same job; its bookkeeping lives in ``OUTPUT/pipeline/``."""
    from lmforge.data.executor import make_executor
    from lmforge.data.io import make_reader
    from lmforge.data.pipeline import Pipeline, PipelineError, RunPaths
    from lmforge.tokenizer import load_tokenizer

    if not cfg.inputs or not cfg.tokenizer or not cfg.output:
        raise ShardsError("inputs, tokenizer and output are required")
    tok = load_tokenizer(cfg.tokenizer)
    if tok.eos_id is None:
        raise ShardsError(f"{cfg.tokenizer}: the tokenizer has no EOS token to separate documents")
    dtype = choose_dtype(tok.vocab_size, cfg.dtype)
    inputs = plan_tasks(cfg)
    round_trip = resolve_round_trip_check(cfg.round_trip_check, tok)
    sink = ShardSink(cfg, inputs, tok, dtype, round_trip)
    run_dir = Path(cfg.output) / RUN_FOLDER
    _check_same_job(run_dir, sink)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    readers = [make_reader(f.path, cfg.format, text_key=cfg.text_key) for f in inputs]
    pipeline = Pipeline(readers, [], sink, exclusions=False)  # type: ignore[arg-type]
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    try:
        executor.run(pipeline, run_dir, progress=progress)
    except PipelineError as err:
        raise ShardsError(str(err)) from err

    paths = RunPaths(run_dir)
    records = []
    for task, item in enumerate(inputs):
        record = read_shard_record(cfg.output, item.name)
        assert record is not None, f"task {task} finished without its shard record"
        empty, unreadable = _reader_counts(json.loads(paths.done(0, task).read_text(encoding="utf-8")))
        record["empty_docs"] += empty
        record["bad_records"] += unreadable
        records.append(record)
    manifest = build_manifest(
        records,
        dtype,
        tok.vocab_size,
        tok.eos_id,
        tok.sha256(),
        tokenizer=str(cfg.tokenizer),
        round_trip_check=round_trip,
        special_tokens_in_text="parsed" if cfg.allow_special_tokens else "encoded as text",
        rejects=f"{RUN_FOLDER}/rejects",
    )
    write_manifest(cfg.output, manifest)
    return manifest
