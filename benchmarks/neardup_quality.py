"""Near-duplicate detection quality: planted near-duplicates, precision/recall vs ground truth.

Each base document gets, with probability ``--dup-fraction``, 1 to 3 perturbed copies: adjacent word
swaps, random word insertions, deletions, or truncation of the end. The planted clusters are the ground
truth; a method's predicted pairs are all pairs inside its clusters. Methods, at the same Jaccard
threshold and num_perm on word 5-grams: lmforge MinHash-LSH with each ``banding`` preset of
``minhash_dedup`` (precision, balanced, recall), each with and without exact-Jaccard verification of
candidates, for each permutation ``--schemes`` ("mersenne", datasketch's ``legacy``, and "affine32",
datasketch's default), and datasketch's MinHashLSH (its default scheme, ``affine32``; its candidates joined
with the same union-find). "recall
0.80-0.85" is the recall on the true pairs whose exact Jaccard lies in [0.80, 0.85): those just above a
0.8 threshold, which the balanced banding finds least often.

    .venv/bin/python benchmarks/neardup_quality.py --docs 1000
    .venv/bin/python benchmarks/neardup_quality.py --corpus /tmp/lmforge-corpora --docs 1000
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
from datasketch import MinHash, MinHashLSH
from doc_corpus import load_documents

from lmforge.data.dedup.lsh import UnionFind, cluster_near_duplicates, jaccard, optimal_lsh_params
from lmforge.data.dedup.minhash import BANDINGS, MinHasher

PERTURBATIONS = ("swap", "insert", "delete", "truncate")


def perturb(
    words: list[str], kind: str, rate: float, rng: np.random.Generator, vocab: list[str]
) -> list[str]:
    """A near-duplicate of ``words``: about ``rate`` of the words edited (truncation: 5-15% cut)."""
    out = list(words)
    edits = max(1, int(len(out) * rate))
    if kind == "swap":
        for i in rng.integers(0, len(out) - 1, edits):
            out[i], out[i + 1] = out[i + 1], out[i]
    elif kind == "insert":
        for _ in range(edits):
            out.insert(int(rng.integers(0, len(out) + 1)), vocab[int(rng.integers(len(vocab)))])
    elif kind == "delete":
        for _ in range(min(edits, len(out) - 1)):
            del out[int(rng.integers(0, len(out)))]
    elif kind == "truncate":
        out = out[: max(1, int(len(out) * (1 - rng.uniform(0.05, 0.15))))]
    return out


def planted_corpus(
    bases: list[str], dup_fraction: float, rate: float, seed: int
) -> tuple[list[str], np.ndarray, list[str]]:
    """Texts (shuffled), their planted cluster ids, and the perturbation of each text ("" for originals)."""
    rng = np.random.default_rng(seed)
    vocab = sorted({w for text in bases[:200] for w in text.split()})
    texts, cluster, kinds = [], [], []
    for c, text in enumerate(bases):
        texts.append(text)
        cluster.append(c)
        kinds.append("")
        if rng.random() < dup_fraction:
            words = text.split()
            for _ in range(int(rng.integers(1, 4))):
                kind = PERTURBATIONS[int(rng.integers(len(PERTURBATIONS)))]
                texts.append(" ".join(perturb(words, kind, rate, rng, vocab)))
                cluster.append(c)
                kinds.append(kind)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order], np.array(cluster)[order], [kinds[i] for i in order]


def cluster_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        pairs.update((int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :])
    return pairs


def datasketch_roots(texts: list[str], threshold: float, num_perm: int, ngram: int) -> np.ndarray:
    def shingles(text: str) -> list[bytes]:
        words = text.lower().split()
        return [" ".join(words[i : i + ngram]).encode() for i in range(max(1, len(words) - ngram + 1))]

    sketches = MinHash.bulk((shingles(t) for t in texts), num_perm=num_perm)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, m in enumerate(sketches):
        lsh.insert(i, m)
    uf = UnionFind(len(texts))
    for i, m in enumerate(sketches):
        for j in lsh.query(m):
            uf.union(i, j)
    return uf.roots()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=1000, help="base documents")
    parser.add_argument("--corpus", default=None, help="JSONL(.gz) file or folder; default: generated text")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--dup-fraction", type=float, default=0.3, help="base documents that get copies")
    parser.add_argument("--rate", type=float, default=0.01, help="fraction of words edited per copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--schemes", nargs="+", default=["mersenne", "affine32"], choices=["mersenne", "affine32"]
    )
    args = parser.parse_args()

    bases = load_documents(args.corpus, args.docs, seed=args.seed)
    texts, truth_labels, kinds = planted_corpus(bases, args.dup_fraction, args.rate, args.seed)
    truth = cluster_pairs(truth_labels)
    hasher = MinHasher(num_perm=args.num_perm, ngram=args.ngram)
    shingles = [hasher.shingle_hashes(t) for t in texts]
    planted_jaccard = [jaccard(shingles[a], shingles[b]) for a, b in truth]
    print(
        f"{len(bases)} base documents ({args.corpus or 'generated'}) + {len(texts) - len(bases)} planted copies "
        f"({dict(Counter(k for k in kinds if k))}); {len(truth)} true pairs, exact {args.ngram}-gram Jaccard of "
        f"planted pairs: median {np.median(planted_jaccard):.3f}, "
        f"{np.mean(np.array(planted_jaccard) >= args.threshold):.0%} >= threshold {args.threshold}"
    )

    methods = {}
    for scheme in args.schemes:
        signatures = MinHasher(num_perm=args.num_perm, ngram=args.ngram, scheme=scheme).signatures(texts)
        for banding, weights in BANDINGS.items():
            bands, rows = optimal_lsh_params(args.threshold, args.num_perm, *weights)
            for verify in (False, True):
                name = f"lmforge {scheme} {banding} ({bands}x{rows})" + (" + exact check" if verify else "")
                methods[name] = lambda s=signatures, b=bands, r=rows, v=verify: cluster_near_duplicates(
                    s, args.threshold, b, r, shingle_sets=shingles if v else None
                )
    methods["datasketch MinHashLSH"] = lambda: datasketch_roots(
        texts, args.threshold, args.num_perm, args.ngram
    )
    near_threshold = {
        pair for pair, j in zip(truth, planted_jaccard) if args.threshold <= j < args.threshold + 0.05
    }
    # A predicted pair outside the planted clusters may still be a real near-duplicate of the corpus.
    print(
        f"\n| method | precision | recall | recall {args.threshold:.2f}-{args.threshold + 0.05:.2f} "
        f"({len(near_threshold)} pairs) | F1 | precision* | predicted pairs | seconds |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    for name, run in methods.items():
        start = time.perf_counter()
        predicted = cluster_pairs(run())
        seconds = time.perf_counter() - start
        hits = len(predicted & truth)
        precision = hits / len(predicted) if predicted else 1.0
        recall = hits / len(truth) if truth else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        natural = sum(jaccard(shingles[a], shingles[b]) >= args.threshold for a, b in predicted - truth)
        loose = (hits + natural) / len(predicted) if predicted else 1.0
        near = len(predicted & near_threshold) / len(near_threshold) if near_threshold else 1.0
        print(
            f"| {name} | {precision:.4f} | {recall:.4f} | {near:.4f} | {f1:.4f} | {loose:.4f} | "
            f"{len(predicted)} | {seconds:.2f} |"
        )
    print("precision*: a predicted pair also counts as right when its exact Jaccard is >= the threshold")


if __name__ == "__main__":
    main()
