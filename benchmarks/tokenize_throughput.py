"""Tokens/s of ``lmforge shards tokenize`` vs the HF tokenizer's own batch encode on the same text.

Peers: ``tokenizers.Tokenizer.encode_batch`` and ``encode_batch_fast`` (no offsets, the call
``lmforge shards tokenize`` makes) on texts already in memory, one thread (``TOKENIZERS_PARALLELISM=false``):
the bare cost of tokenization. Ratios are against the faster peer. ``lmforge shards tokenize`` is timed end
to end on the same documents written as JSONL.gz files: decompressing, JSON parsing, encoding, writing
shards, index and manifest, worker start-up (and, in the ``always`` row, decoding every document to count
round-trip failures).

Each measurement runs in a fresh process (the same starting state for every variant). Two clocks: wall
time, and CPU time (the process plus its finished worker processes). On a shared machine the wall clock
also measures the neighbours; tokens per CPU-second per worker much less so, and is the per-worker
efficiency. Scaling = wall tokens/s with N workers / with 1 worker.

    python benchmarks/tokenize_throughput.py                       # real corpora if built, else synthetic
    python benchmarks/tokenize_throughput.py --mb 20 --workers 1 2 --corpus /tmp/lmforge-corpora
"""

from __future__ import annotations

import os

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # before tokenizers is imported: the peer runs on one thread

import argparse
import gzip
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmforge.data.io import looks_binary
from lmforge.shards.tokenize import TokenizeConfig, tokenize_to_shards
from lmforge.tokenizer import TokenizerTrainConfig, load_tokenizer, train_tokenizer

PEERS = ("encode_batch", "encode_batch_fast")


def load_texts(corpus: Path | None, megabytes: float, seed: int = 0) -> list[str]:
    texts: list[str] = []
    if corpus is not None and corpus.is_dir():
        for path in sorted(corpus.glob("*.jsonl.gz")):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                texts.extend(json.loads(line)["text"] for line in f)
    if not texts:  # synthetic fallback: Zipf-distributed words, so BPE has something to learn
        rng = np.random.default_rng(seed)
        words = [
            "".join(rng.choice(list("etaoinshrdlucmfwyp"), size=rng.integers(1, 9))) for _ in range(5000)
        ]
        ranks = rng.zipf(1.2, size=4_000_000) % len(words)
        stream = [words[r] for r in ranks]
        texts = [" ".join(stream[i : i + 400]) for i in range(0, len(stream), 400)]
    # the documents reader rejects binary-looking and empty records; keep only what both sides encode
    texts = [t for t in texts if t.strip() and not looks_binary(t)]
    np.random.default_rng(seed).shuffle(texts)  # mix the sources across files
    out, size = [], 0
    while size < megabytes * 1e6:  # repeat the corpus if it is smaller than asked
        for text in texts:
            out.append(text)
            size += len(text.encode("utf-8"))
            if size >= megabytes * 1e6:
                break
    return out


def write_inputs(texts: list[str], folder: Path, files: int) -> None:
    folder.mkdir(parents=True)
    for f in range(files):
        with gzip.open(folder / f"{f:05d}.jsonl.gz", "wt", encoding="utf-8") as out:
            for i in range(f, len(texts), files):
                out.write(json.dumps({"id": str(i), "text": texts[i]}, ensure_ascii=False) + "\n")


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (the pool's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run: Callable[[], int]) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = run()
    return time.perf_counter() - wall, cpu_seconds() - cpu, tokens


def read_texts(folder: Path) -> list[str]:
    """The documents of the input files, in the order the peer encodes them."""
    texts = []
    for path in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    return texts


def run_one(work: Path, mode: str, workers: int, batch: int) -> None:
    """One measurement in this (fresh) process; prints wall, CPU and tokens as JSON."""
    if mode in PEERS:
        texts = read_texts(work / "docs")  # untimed: the peer starts from texts in memory
        encode = getattr(load_tokenizer(work / "tok").backend, mode)

        def run() -> int:
            tokens = 0
            for i in range(0, len(texts), batch):
                tokens += sum(len(e.ids) for e in encode(texts[i : i + batch], add_special_tokens=False))
            return tokens

    else:
        cfg = TokenizeConfig([str(work / "docs")], str(work / "tok"), str(work / "out"), workers)
        cfg.round_trip_check, cfg.batch_docs = mode, batch
        shutil.rmtree(cfg.output, ignore_errors=True)

        def run() -> int:
            manifest = tokenize_to_shards(cfg, progress=False)
            return manifest["totals"]["tokens"] - manifest["totals"]["docs"]  # EOS separators not counted

    wall, cpu, tokens = measure(run)
    print(json.dumps({"wall": wall, "cpu": cpu, "tokens": tokens}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--mb", type=float, default=20.0, help="megabytes of text")
    parser.add_argument("--files", type=int, default=8, help="input files (tasks)")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=256, help="documents per encode_batch call (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--one", nargs=2, metavar=("WORKDIR", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_one(Path(args.one[0]), args.one[1], args.workers[0], args.batch)
        return

    work = Path(tempfile.mkdtemp(prefix="lmforge-tokbench-"))
    try:
        texts = load_texts(args.corpus, args.mb)
        megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        write_inputs(texts, work / "docs", args.files)
        tok = train_tokenizer(texts[: max(1, len(texts) // 4)], TokenizerTrainConfig(vocab_size=args.vocab))
        tok.save(work / "tok")
        del texts, tok
        print(f"{megabytes:.1f} MB of documents in {args.files} files; byte-level BPE, vocab {args.vocab}")

        variants = [(f"HF {m} (in memory)", 1, m) for m in PEERS]
        variants += [("lmforge shards tokenize", w, "auto") for w in args.workers]
        variants += [("lmforge shards tokenize, round-trip check", 1, "always")]
        best: dict[tuple[str, int], tuple[float, float, int]] = {}
        # Every measurement in a fresh process (same starting state for all), interleaved so that slow
        # phases of the neighbours hit every variant; the best of the repeats is kept.
        for _ in range(args.repeats):
            for name, workers, mode in variants:
                command = [sys.executable, __file__, "--one", str(work), mode]
                command += ["--workers", str(workers), "--batch", str(args.batch)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                previous = best.get((name, workers))
                best[name, workers] = (
                    min(result["wall"], previous[0]) if previous else result["wall"],
                    min(result["cpu"], previous[1]) if previous else result["cpu"],
                    result["tokens"],
                )
        counts = {tokens for _, _, tokens in best.values()}
        if len(counts) != 1:
            raise SystemExit(f"token counts differ between variants: {best}")
        tokens = counts.pop()
        peer_wall = min(best[f"HF {m} (in memory)", 1][0] for m in PEERS)
        peer_cpu = min(best[f"HF {m} (in memory)", 1][1] for m in PEERS)
        one_worker_wall = best.get(("lmforge shards tokenize", 1), (None,))[0]

        print(f"{tokens:,} tokens; best of {args.repeats} interleaved runs")
        print(
            "| method | workers | wall s | tokens/s (wall) | CPU s | tokens per CPU-s per worker "
            "| per-worker vs peer (CPU) | per-worker vs peer (wall) | scaling (wall) |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, workers, _ in variants:
            wall, cpu, _ = best[name, workers]
            # with N workers each works on its own cores, so CPU time per worker is cpu / N
            per_worker_cpu_rate = tokens / cpu
            scaling = (
                f"{one_worker_wall / wall:.2f}x"
                if one_worker_wall and name == "lmforge shards tokenize"
                else ""
            )
            print(
                f"| {name} | {workers} | {wall:.2f} | {tokens / wall:,.0f} | {cpu:.2f} | {per_worker_cpu_rate:,.0f} "
                f"| {peer_cpu / cpu:.2f}x | {peer_wall / (wall * workers):.2f}x | {scaling} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
