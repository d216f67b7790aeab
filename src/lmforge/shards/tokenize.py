"""``lmforge shards tokenize``: documents (JSONL/Parquet, the pipeline's output) -> token shards.

One task per input file, one shard per task, run by a pool of worker processes; each worker loads the
tokenizer once and encodes documents in batches through the ``tokenizers`` batch path. Shard ``i`` holds
the documents of the ``i``-th input file (inputs sorted), each followed by EOS, so the output depends only
on the inputs and the tokenizer: a rerun, with any number of workers, writes the same bytes.

Resuming: ``job.json`` records the input files, tokenizer hash and dtype at the start; a relaunch into the
same output folder checks them and skips every shard whose completion record (``NAME.json``) exists. A
killed worker leaves only ``.tmp`` files, which are rewritten.

Each input file has a domain (:mod:`lmforge.data.inputs`: ``NAME=PATH``, else the first folder below the
inputs' common root, else ``default_domain``); the loader's mixtures sample these domains.

Bad input is counted per shard and in the manifest, never silently dropped:

- unreadable records (no text, malformed JSON, binary...): skipped, ``bad_records``, reasons in
  ``rejects/NAME.jsonl``; empty documents: skipped, ``empty_docs``;
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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmforge.config import check_choice
from lmforge.data.atomic import atomic_write_json
from lmforge.data.inputs import InputFile, plan_inputs
from lmforge.shards.format import (
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

JOB_NAME = "job.json"
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

    def __post_init__(self) -> None:
        check_choice("round_trip_check", self.round_trip_check, ROUND_TRIP_CHECKS)
        if self.workers < 1 or self.batch_docs < 1:
            raise ValueError("workers and batch_docs must be >= 1")


def plan_tasks(cfg: TokenizeConfig) -> list[InputFile]:
    """Every input file with its domain and shard name, in a fixed order."""
    try:
        return plan_inputs(cfg.inputs, cfg.format, cfg.text_key, cfg.default_domain)
    except ValueError as err:
        raise ShardsError(str(err)) from err


# -- worker side --------------------------------------------------------------------------------------------

_worker_state: dict[str, Any] = {}


def _init_worker(
    tokenizer_dir: str, cfg_dict: dict[str, Any], round_trip: str, tok: Tokenizer | None = None
) -> None:
    # One thread per worker: parallelism comes from the processes (and the tokenizers thread pool must not
    # oversubscribe the cores the other workers use).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from lmforge.tokenizer import load_tokenizer

    tok = tok or load_tokenizer(tokenizer_dir)
    cfg = TokenizeConfig(**cfg_dict)
    tok.backend.encode_special_tokens = not cfg.allow_special_tokens
    _worker_state["tokenizer"] = tok
    _worker_state["cfg"] = cfg
    _worker_state["round_trip"] = round_trip
    _worker_state["special_texts"] = [
        t.content for t in tok.backend.get_added_tokens_decoder().values() if t.special
    ]


def _tokenize_task(task: InputFile, out_dir: str, dtype_name: str) -> dict[str, Any]:
    from lmforge.data.io import Reject, make_reader

    tok = _worker_state["tokenizer"]
    cfg: TokenizeConfig = _worker_state["cfg"]
    special_texts: list[str] = _worker_state["special_texts"]
    eos_id: int = tok.eos_id
    dtype = np.dtype(dtype_name)
    reader = make_reader(task.path, cfg.format, text_key=cfg.text_key)
    stats = ShardStats()
    rejects: list[dict[str, Any]] = []
    writer = ShardWriter(out_dir, task.name, dtype)
    batch: list[tuple[str, str | None]] = []

    def flush() -> None:
        texts = [text for text, _ in batch]
        encodings = tok.backend.encode_batch_fast(texts, add_special_tokens=False)
        ids_list = [e.ids for e in encodings]
        decoded = None
        if _worker_state["round_trip"] == "checked":
            decoded = tok.backend.decode_batch(ids_list, skip_special_tokens=False)
        flat: list[int] = []
        lengths: list[int] = []
        for k, ((text, source), ids) in enumerate(zip(batch, ids_list)):
            if not ids:
                stats.empty_docs += 1
                continue
            if any(special in text for special in special_texts):
                stats.special_text_docs += 1
            if decoded is not None and decoded[k] != text:
                stats.non_round_trip_docs += 1
            flat.extend(ids)
            flat.append(eos_id)
            lengths.append(len(ids) + 1)
            if source is not None:
                stats.sources[source] += len(ids) + 1
        # one conversion and one write per batch: per-document numpy calls cost more than the encode
        writer.extend(np.array(flat, dtype=dtype), lengths)
        stats.docs += len(lengths)
        stats.tokens += len(flat)
        batch.clear()

    try:
        for item in reader.read([task.path]):
            if isinstance(item, Reject):
                if item.reason.startswith("empty"):
                    stats.empty_docs += 1
                else:
                    stats.bad_records += 1
                    rejects.append(item.to_record())
                continue
            source = item.meta.get("source")
            batch.append((item.text, str(source) if source is not None else None))
            if len(batch) >= cfg.batch_docs:
                flush()
        if batch:
            flush()
    except BaseException:
        writer.abort()
        raise
    if rejects:
        reject_dir = Path(out_dir) / "rejects"
        reject_dir.mkdir(exist_ok=True)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
        (reject_dir / f"{task.name}.jsonl").write_text(lines, encoding="utf-8")
    return writer.close(stats, {"domain": task.domain, "input": task.path})


# -- driver ---------------------------------------------------------------------------------------------------


def _check_or_write_job(out_dir: Path, job: dict[str, Any]) -> None:
    path = out_dir / JOB_NAME
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        for key in ("tokenizer_sha256", "dtype", "inputs"):
            if previous.get(key) != job[key]:
                what = "tokenizer sha256" if key == "tokenizer_sha256" else key
                raise ShardsError(
                    f"{out_dir} holds shards of another job ({what} differs: {previous.get(key)!r} != "
                    f"{job[key]!r}); use a new output folder"
                )
        return
    atomic_write_json(path, job)


def tokenize_to_shards(cfg: TokenizeConfig, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``cfg.inputs`` into ``cfg.output``; returns the manifest (also written to disk)."""
    from lmforge.tokenizer import load_tokenizer

    if not cfg.inputs or not cfg.tokenizer or not cfg.output:
        raise ShardsError("inputs, tokenizer and output are required")
    tok = load_tokenizer(cfg.tokenizer)
    if tok.eos_id is None:
        raise ShardsError(f"{cfg.tokenizer}: the tokenizer has no EOS token to separate documents")
    dtype = choose_dtype(tok.vocab_size, cfg.dtype)
    tasks = plan_tasks(cfg)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    job = {
        "tokenizer_sha256": tok.sha256(),
        "dtype": dtype.name,
        "inputs": [[t.name, t.domain, t.path] for t in tasks],
    }
    _check_or_write_job(out_dir, job)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for task in tasks:
        record = read_shard_record(out_dir, task.name)
        if record is not None:
            records[task.name] = record
        else:
            todo.append(task)
    from tqdm import tqdm

    if records and progress:
        print(f"resuming: {len(records)} of {len(tasks)} shards already complete in {out_dir}")
    bar = tqdm(total=len(tasks), initial=len(records), desc="tokenize", unit="file", disable=not progress)
    bar.set_postfix(tokens=sum(r["tokens"] for r in records.values()))
    cfg_dict = dict(cfg.__dict__)
    round_trip = resolve_round_trip_check(cfg.round_trip_check, tok)
    if todo:
        if cfg.workers == 1:
            _init_worker(cfg.tokenizer, cfg_dict, round_trip, tok)
            for task in todo:
                records[task.name] = _tokenize_task(task, str(out_dir), dtype.name)
                bar.update(1)
                bar.set_postfix(tokens=sum(r["tokens"] for r in records.values()))
        else:
            # spawn: the workers must not inherit the parent's tokenizers thread pool through fork
            with ProcessPoolExecutor(
                max_workers=min(cfg.workers, len(todo)),
                mp_context=get_context("spawn"),
                initializer=_init_worker,
                initargs=(cfg.tokenizer, cfg_dict, round_trip),
            ) as pool:
                futures = [pool.submit(_tokenize_task, t, str(out_dir), dtype.name) for t in todo]
                for task, future in zip(todo, futures):
                    records[task.name] = future.result()
                    bar.update(1)
                    bar.set_postfix(tokens=sum(r["tokens"] for r in records.values()))
    bar.close()
    manifest = build_manifest(
        [records[t.name] for t in tasks],
        dtype,
        tok.vocab_size,
        tok.eos_id,
        tok.sha256(),
        tokenizer=str(cfg.tokenizer),
        round_trip_check=round_trip,
        special_tokens_in_text="parsed" if cfg.allow_special_tokens else "encoded as text",
    )
    write_manifest(out_dir, manifest)
    return manifest
