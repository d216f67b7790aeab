"""MinHash signatures + LSH clustering throughput: lmforge vs datasketch on the same documents.

Both sides do the same work in one process (one core): split each document into word 5-grams, compute
num_perm-value signatures, bucket them with LSH at the same threshold and join the candidate pairs
into clusters. Times are CPU seconds of this process (``time.process_time``), best of ``--repeats``,
so docs/s is per core and less disturbed by other load on a shared machine. datasketch runs its
fastest documented path: ``MinHash.bulk`` (permutations drawn once) and ``MinHashLSH`` with an
insertion session, then one query per document; each of our schemes is compared with the datasketch
scheme that computes the same hash family (``affine32``, the default of both since 2026-12-04, first).

    .venv/bin/python benchmarks/minhash.py --docs 3000 --stages
    .venv/bin/python benchmarks/minhash.py --docs 3000 --stages --corpus /tmp/lmforge-corpora
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core for both sides

import numpy as np
from datasketch import MinHash, MinHashLSH
from doc_corpus import load_documents

from lmforge.data.dedup.lsh import UnionFind, cluster_near_duplicates, optimal_lsh_params
from lmforge.data.dedup.minhash import MinHasher
from lmforge.data.text import word_hashes


def run_lmforge(texts: list[str], num_perm: int, ngram: int, threshold: float, scheme: str) -> np.ndarray:
    hasher = MinHasher(num_perm=num_perm, ngram=ngram, scheme=scheme)
    signatures = hasher.signatures(texts)
    return cluster_near_duplicates(signatures, threshold=threshold)


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Smallest CPU time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def lmforge_stages(texts: list[str], num_perm: int, ngram: int, threshold: float, scheme: str, repeats: int):
    """CPU seconds of each stage of run_lmforge, in its batches of 256 documents."""
    hasher = MinHasher(num_perm=num_perm, ngram=ngram, scheme=scheme)
    batches = [texts[lo : lo + 256] for lo in range(0, len(texts), 256)]
    words, _ = best_time(lambda: [word_hashes(b) for b in batches], repeats)
    shingles, shingled = best_time(lambda: [hasher.shingle_hash_batch(b) for b in batches], repeats)
    signing, signed = best_time(lambda: [hasher.signatures_from_hashes(*s) for s in shingled], repeats)
    signatures = np.concatenate(signed)
    clustering, _ = best_time(lambda: cluster_near_duplicates(signatures, threshold=threshold), repeats)
    return {
        "word hashing": words,
        "n-gram shingles": shingles - words,
        "signatures": signing,
        "LSH + clusters": clustering,
    }


# Our scheme name -> the datasketch scheme computing the same permutation family.
DATASKETCH_SCHEME = {"mersenne": "legacy", "affine32": "affine32"}


def datasketch_shingles(text: str, ngram: int) -> list[bytes]:
    words = text.lower().split()
    if len(words) < ngram:
        return [" ".join(words).encode()] if words else []
    return [" ".join(words[i : i + ngram]).encode() for i in range(len(words) - ngram + 1)]


def run_datasketch(texts: list[str], num_perm: int, ngram: int, threshold: float, scheme: str) -> np.ndarray:
    minhashes = MinHash.bulk(
        (datasketch_shingles(t, ngram) for t in texts), num_perm=num_perm, scheme=DATASKETCH_SCHEME[scheme]
    )
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    with lsh.insertion_session() as session:
        for i, m in enumerate(minhashes):
            session.insert(i, m)
    uf = UnionFind(len(texts))
    for i, m in enumerate(minhashes):
        for j in lsh.query(m):
            uf.union(i, j)
    return uf.roots()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--corpus", default=None, help="JSONL(.gz) file or folder; default: generated text")
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument(
        "--schemes", nargs="+", default=["affine32", "mersenne"], choices=list(DATASKETCH_SCHEME)
    )
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--stages", action="store_true", help="also time each lmforge stage on its own")
    args = parser.parse_args()

    texts = load_documents(args.corpus, args.docs)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    bands, rows = optimal_lsh_params(args.threshold, args.num_perm)
    print(f"load average (1/5/15 min): {os.getloadavg()}")
    print(
        f"{len(texts)} documents ({megabytes:.1f} MB, {args.corpus or 'generated'}), num_perm={args.num_perm}, "
        f"{args.ngram}-grams, threshold={args.threshold} -> bands={bands} rows={rows}; "
        f"{platform.processor() or platform.machine()}, 1 process"
    )
    rows_out = []
    for scheme in args.schemes:
        # Interleaved: each repetition runs lmforge then datasketch, so both see the same machine load
        # (the box is shared); each side keeps its best CPU time.
        timings: dict[str, float] = {}
        roots_of: dict[str, np.ndarray] = {}
        for _ in range(args.repeats):
            for name, fn in (("lmforge", run_lmforge), ("datasketch", run_datasketch)):
                best, roots = best_time(
                    lambda fn=fn, scheme=scheme: fn(texts, args.num_perm, args.ngram, args.threshold, scheme),
                    1,
                )
                timings[name] = min(timings.get(name, float("inf")), best)
                roots_of[name] = roots
        for name, best in timings.items():
            duplicates = int((roots_of[name] != np.arange(len(texts))).sum())
            print(
                f"  {scheme:<9} {name:<11} {best:8.3f} s  {len(texts) / best:9.0f} docs/s  {duplicates} duplicates"
            )
        rows_out.append((scheme, timings))
        if args.stages:
            stages = lmforge_stages(texts, args.num_perm, args.ngram, args.threshold, scheme, args.repeats)
            print("    lmforge stages: " + ", ".join(f"{k} {v:.3f} s" for k, v in stages.items()))
    print(
        "\n| permutation scheme | lmforge docs/s/core | datasketch docs/s/core | speed-up |\n|---|---|---|---|"
    )
    for scheme, timings in rows_out:
        ours, peer = len(texts) / timings["lmforge"], len(texts) / timings["datasketch"]
        default = ", **default**" if scheme == MinHasher().scheme else ""
        print(
            f"| {scheme} (datasketch `{DATASKETCH_SCHEME[scheme]}`){default} | {ours:,.0f} | {peer:,.0f} | {ours / peer:.1f}x |"
        )


if __name__ == "__main__":
    main()
