"""Data breadth figures: exact-substring dedup removal rates, SemDeDup removal rates, docstring->code MRR@10.

1. ``exact_substring_dedup`` (min_bytes=100, keep first) on real corpora: bytes cut, documents changed and
   emptied, seconds; then the sharded mode (``--shards`` shards, matched pairwise) on the first corpus,
   checked equal to the unsharded decision, with its time.
2. ``semdedup`` on fortunes (short texts with many near-repeats). The stand-in embeddings are hashed
   word uni+bigram counts (no embedding model is involved; this measures the step, not a model):
   removal rates at several cosine thresholds.
3. Contrastive embeddings: (docstring, code) pairs from the Python standard library's functions
   (``ast``; docstring = its first paragraph, code = the function without its docstring), split by module
   into train and held-out; a small Transformer (random init, d_model 64, 2 layers, each side cut to 64
   tokens; a BPE tokenizer trained on the train pairs)
   trained with ``lmforge.tune.embed.run_embed`` (the one trainer, InfoNCE); held-out MRR@10 of each
   docstring against all held-out functions, before and after, next to a lexical TF-IDF baseline.

    PYTHONPATH=src .venv/bin/python benchmarks/data_breadth.py --corpus /tmp/lmforge-corpora
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import itertools
import json
import math
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from lmforge.data.dedup.semdedup import SemDeDup
from lmforge.data.dedup.suffix_array_step import ExactSubstringDedup
from lmforge.data.document import Document


def read_corpus(path: Path, limit: int | None = None) -> list[Document]:
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            docs.append(Document(str(record["id"]), record["text"], record.get("meta", {})))
            if limit and len(docs) >= limit:
                break
    return docs


def two_passes(step, tasks: list[list[Document]], work: Path) -> tuple[list[list[Document]], float]:
    """Pass 1, reduce, pass 2 as the executor runs them (one process); seconds of the reduce."""
    artifacts = []
    for t, docs in enumerate(tasks):
        artifacts.append(work / f"artifact-{t}")
        list(step.collect_stream(iter(docs), t, artifacts[-1]))
    (work / "decision").mkdir()
    start = time.perf_counter()
    step.reduce(artifacts, work / "decision")
    seconds = time.perf_counter() - start
    step.reset_stats()
    kept = [list(step.apply_stream(iter(docs), work / "decision", t)) for t, docs in enumerate(tasks)]
    return kept, seconds


def split_tasks(docs: list[Document], n: int) -> list[list[Document]]:
    size = math.ceil(len(docs) / n)
    return [
        [Document(d.id, d.text, dict(d.meta)) for d in docs[i : i + size]] for i in range(0, len(docs), size)
    ]


def rolling_hash_cut(docs: list[Document], k: int) -> tuple[list[str], float]:
    """Peer method (no suffix array): a 64-bit polynomial hash of every k-byte window (wrapping uint64
    arithmetic, vectorised), all windows of a hash but the first occurrence cut. Exact up to hash
    collisions. Returns the texts after cutting (empty ones included) and the seconds."""
    from lmforge.data.dedup.suffix_array import cover, widen_to_characters

    start = time.perf_counter()
    blobs = [d.text.encode() for d in docs]
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8).astype(np.uint64) + np.uint64(1)
    ends = np.cumsum([len(b) for b in blobs])
    begins = ends - np.array([len(b) for b in blobs])
    n = len(data)
    base = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64
    inverse = np.uint64(pow(int(base), -1, 1 << 64))
    with np.errstate(over="ignore"):
        inv_powers = np.cumprod(np.full(n, inverse, dtype=np.uint64))  # Binv^(j+1)
        prefix = np.concatenate(([np.uint64(0)], np.cumsum(data * inv_powers, dtype=np.uint64)))
        powers = np.concatenate(([np.uint64(1)], np.cumprod(np.full(n, base, dtype=np.uint64))))
        starts = np.arange(max(n - k + 1, 0))
        hashes = powers[starts + k] * (prefix[starts + k] - prefix[starts])
    doc_of = np.searchsorted(ends, starts, side="right")
    inside = starts + k <= ends[np.minimum(doc_of, len(ends) - 1)]
    starts, hashes = starts[inside], hashes[inside]
    _, first = np.unique(hashes, return_index=True)
    repeated = np.ones(len(starts), dtype=bool)
    repeated[first] = False
    mask = cover(starts[repeated], k, n)
    texts = []
    for blob, begin in zip(blobs, begins.tolist()):
        raw = np.frombuffer(blob, dtype=np.uint8)
        keep = ~widen_to_characters(raw, mask[begin : begin + len(blob)])
        texts.append(raw[keep].tobytes().decode())
    return texts, time.perf_counter() - start


def exact_substring(corpus: Path, names: list[str], shards: int, min_bytes: int) -> list[dict]:
    rows = []
    for name in names:
        docs = read_corpus(corpus / f"{name}.jsonl.gz")
        total = sum(len(d.text.encode()) for d in docs)
        with tempfile.TemporaryDirectory() as tmp:
            step = ExactSubstringDedup(min_bytes=min_bytes)
            kept, seconds = two_passes(step, split_tasks(docs, 4), Path(tmp))
        cut = step.stats.counters["substring_bytes_removed"]
        row = {
            "corpus": name,
            "docs": len(docs),
            "bytes": total,
            "bytes_removed_pct": round(100 * cut / total, 2),
            "docs_changed": step.stats.counters["substring_docs_changed"],
            "docs_emptied": sum(step.stats.removed.values()),
            "reduce_s": round(seconds, 1),
        }
        peer_texts, peer_s = rolling_hash_cut(docs, min_bytes)
        ours = {d.id: d.text for t in kept for d in t}
        row["rolling_hash_peer"] = {
            "seconds": round(peer_s, 1),
            "same_output": all(
                ours.get(d.id, "") == (t if t.strip() else "") for d, t in zip(docs, peer_texts)
            ),
        }
        if shards > 1 and name == names[0]:
            with tempfile.TemporaryDirectory() as tmp:
                sharded = ExactSubstringDedup(min_bytes=min_bytes, shard_bytes=math.ceil(total / shards))
                kept_sharded, sharded_s = two_passes(sharded, split_tasks(docs, 4), Path(tmp))
            row["sharded"] = {
                "shards": shards,
                "reduce_s": round(sharded_s, 1),
                "same_output": [[d.text for d in t] for t in kept]
                == [[d.text for d in t] for t in kept_sharded],
            }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def hashed_bow(text: str, dim: int = 1024) -> list[float]:
    words = re.findall(r"\w+", text.lower())
    vector = np.zeros(dim)
    for gram in words + [f"{a} {b}" for a, b in itertools.pairwise(words)]:
        vector[int.from_bytes(hashlib.blake2b(gram.encode(), digest_size=4).digest(), "little") % dim] += 1
    return vector.tolist()


def semdedup(corpus: Path, limit: int, thresholds: list[float]) -> list[dict]:
    docs = read_corpus(corpus / "fortunes.jsonl.gz", limit)
    for d in docs:
        d.meta["embedding"] = hashed_bow(d.text)
    rows = []
    for threshold in thresholds:
        with tempfile.TemporaryDirectory() as tmp:
            step = SemDeDup(threshold=threshold)
            _, seconds = two_passes(step, split_tasks(docs, 4), Path(tmp))
        removed = sum(step.stats.removed.values())
        row = {
            "corpus": "fortunes",
            "docs": len(docs),
            "threshold": threshold,
            "removed": removed,
            "removed_pct": round(100 * removed / len(docs), 2),
            "reduce_s": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


# -- docstring -> code -----------------------------------------------------------------------------------------


def stdlib_pairs(root: Path) -> list[tuple[str, str, str]]:
    """(module, docstring, code) of every function with a docstring of >= 4 words and code of >= 2 lines."""
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(node.body) < 2:
                continue
            summary = doc.strip().split("\n\n")[0].replace("\n", " ")
            body_start = node.body[1].lineno - 1
            code = "\n".join([lines[node.lineno - 1], *lines[body_start : node.end_lineno]])
            if len(summary.split()) >= 4 and code.count("\n") >= 2:
                out.append((path.stem, summary, code))
    return out


def tfidf_mrr(queries: list[str], docs: list[str], k: int = 10) -> float:
    """Lexical baseline: cosine of TF-IDF word vectors (identifiers split on _ and case)."""

    def words(text: str) -> list[str]:
        text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)
        return re.findall(r"[a-z0-9]+", text.lower().replace("_", " "))

    doc_words = [Counter(words(d)) for d in docs]
    df = Counter(w for c in doc_words for w in c)
    idf = {w: math.log(len(docs) / n) + 1 for w, n in df.items()}

    def vec(counts: Counter) -> dict[str, float]:
        v = {w: c * idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    dv = [vec(c) for c in doc_words]
    total = 0.0
    for i, q in enumerate(queries):
        qv = vec(Counter(words(q)))
        scores = [sum(x * d.get(w, 0.0) for w, x in qv.items()) for d in dv]
        rank = 1 + sum(s > scores[i] for s in scores)
        total += 1 / rank if rank <= k else 0.0
    return total / len(queries)


def embeddings(steps: int, held_out: int, seed: int, lr: float = 1e-3) -> dict:
    import torch

    from lmforge.config import load_config
    from lmforge.model import ModelConfig, Transformer
    from lmforge.model.hf import save_pretrained
    from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
    from lmforge.tune.embed import EmbedConfig, run_embed

    root = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    pairs = stdlib_pairs(root)
    modules = sorted({m for m, _, _ in pairs})
    val_modules = {m for m in modules if int(hashlib.md5(m.encode()).hexdigest(), 16) % 5 == 0}
    train = [(q, c) for m, q, c in pairs if m not in val_modules]
    val = [(q, c) for m, q, c in pairs if m in val_modules][:held_out]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = train_tokenizer(
            [t for pair in train for t in pair], TokenizerTrainConfig(vocab_size=4096)
        )
        torch.manual_seed(seed)
        cfg = ModelConfig(
            vocab_size=tokenizer.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=64
        )
        save_pretrained(Transformer(cfg), work / "base")
        tokenizer.save(work / "base")
        for name, rows in (("train", train), ("val", val)):
            with open(work / f"{name}.jsonl", "w") as f:
                f.writelines(json.dumps({"docstring": q, "code": c}) + "\n" for q, c in rows)
        recipe = load_config(
            EmbedConfig,
            data={
                "init_from": str(work / "base"),
                "run_dir": str(work / "run"),
                "max_steps": steps,
                "seed": seed,
                "data": {"seq_len": 64, "seed": seed},
                "threads": 2,
                "batch": {"micro_batch_size": 32},
                "optim": {"lr": lr, "weight_decay": 0.0},
                "schedule": {"name": "cosine", "warmup_steps": 20},
                "embed": {
                    "paths": [str(work / "train.jsonl")],
                    "val_paths": [str(work / "val.jsonl")],
                    "query_key": "docstring",
                    "doc_key": "code",
                    "pooling": "mean",
                    "temperature": 0.05,
                },
                "log": {"every_steps": 50, "val_every_steps": steps, "plots": False, "progress": False},
                "checkpoint": {"every_steps": 0, "export": False},
            },
        )
        start = time.perf_counter()
        summary = run_embed(recipe, progress=False)
        seconds = time.perf_counter() - start
    result = {
        "pairs_train": summary["data"]["train"]["pairs"],
        "pairs_heldout": summary["data"]["val"]["pairs"],
        "heldout_modules": len(val_modules),
        "steps": steps,
        "lr": lr,
        "train_s": round(seconds, 1),
        "mrr@10_before": round(summary["heldout_mrr@10_before"], 4),
        "mrr@10_after": round(summary["heldout_mrr@10"], 4),
        "mrr@10_tfidf": round(tfidf_mrr([q for q, _ in val], [c for _, c in val]), 4),
        "temperature": round(summary["temperature"], 4),
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--exact", default="man-en,kjv,shakespeare", help="corpora for exact-substring dedup")
    parser.add_argument("--min-bytes", type=int, default=100)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--fortunes", type=int, default=15000)
    parser.add_argument("--thresholds", default="0.9,0.95,0.99")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["exact", "semdedup", "embed"], action="append")
    args = parser.parse_args()
    only = set(args.only or ["exact", "semdedup", "embed"])
    report: dict = {"machine": platform.platform(), "python": platform.python_version()}
    if "exact" in only:
        report["exact_substring"] = exact_substring(
            args.corpus, args.exact.split(","), args.shards, args.min_bytes
        )
    if "semdedup" in only:
        thresholds = [float(t) for t in args.thresholds.split(",")]
        report["semdedup"] = semdedup(args.corpus, args.fortunes, thresholds)
    if "embed" in only:
        report["embed"] = embeddings(args.steps, args.held_out, args.seed, args.lr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
