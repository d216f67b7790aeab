"""What NFKC normalization does to tokenizer compression, per language (Korean and Chinese in particular).

Two byte-level BPE tokenizers, identical but for the normalizer (none vs NFKC), are trained on the same
mixed-language training documents and inspected on held-out documents of each language: bytes per token
(UTF-8 bytes of the original text per token: higher is better compression), the share of documents and
characters NFKC changes, and the round-trip rate (an NFKC tokenizer cannot give back what it changed).

Corpora: ``bash ../shared/corpora/build.sh`` (man pages in en/zh_CN/ja; the Debian FAQ in Korean, plain-text
edition, cut into ~2 KB documents).

    python benchmarks/tokenizer_normalization.py --corpus /tmp/lmforge-corpora --vocab 8000
"""

from __future__ import annotations

import argparse
import gzip
import json
import unicodedata
from pathlib import Path

import numpy as np

from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
from lmforge.tokenizer.inspection import inspect_texts


def load_corpora(root: Path) -> dict[str, list[str]]:
    languages: dict[str, list[str]] = {}
    for lang in ("en", "zh_CN", "ja"):
        with gzip.open(root / f"man-{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            languages[lang] = [json.loads(line)["text"] for line in f]
    # The Korean Debian FAQ (plain-text edition) cut into ~2 KB documents at paragraph breaks.
    with gzip.open(root / "web" / "debian-faq-en-ko" / "debian-faq.ko.txt.gz", "rt", encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    chunks, current = [], ""
    for paragraph in paragraphs:
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current.encode("utf-8")) >= 2000:
            chunks.append(current)
            current = ""
    languages["ko"] = [*chunks, current] if current else chunks
    return languages


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--held-out", type=float, default=0.25, help="share of each language's documents")
    args = parser.parse_args()

    languages = load_corpora(args.corpus)
    rng = np.random.default_rng(0)
    train, held_out = [], []
    for lang, texts in languages.items():
        order = rng.permutation(len(texts))
        cut = max(1, int(len(texts) * args.held_out))
        held_out += [(lang, texts[i]) for i in order[:cut]]
        train += [texts[i] for i in order[cut:]]
    print(
        "documents (train / held-out): "
        + ", ".join(
            f"{lang} {len(t) - sum(1 for g, _ in held_out if g == lang)} / "
            f"{sum(1 for g, _ in held_out if g == lang)}"
            for lang, t in languages.items()
        )
    )

    results = {}
    for normalization in ("none", "nfkc"):
        cfg = TokenizerTrainConfig(vocab_size=args.vocab, normalization=normalization)
        tok = train_tokenizer(train, cfg)
        results[normalization] = inspect_texts(tok, held_out)

    print(f"\nbyte-level BPE, vocab {args.vocab}, held-out documents")
    print(
        "| language | docs changed by NFKC | chars changed by NFKC | bytes/token (none) | bytes/token (NFKC) "
        "| change | round-trip (none) | round-trip (NFKC) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for lang in languages:
        texts = [t for g, t in held_out if g == lang]
        normalized = [unicodedata.normalize("NFKC", t) for t in texts]
        docs_changed = sum(a != b for a, b in zip(texts, normalized)) / len(texts)
        chars = sum(len(t) for t in texts)
        chars_changed = sum(c != unicodedata.normalize("NFKC", c) for t in texts for c in t) / chars
        none, nfkc = results["none"][lang], results["nfkc"][lang]
        change = nfkc.bytes_per_token / none.bytes_per_token - 1
        print(
            f"| {lang} | {docs_changed:.0%} | {chars_changed:.2%} | {none.bytes_per_token:.3f} "
            f"| {nfkc.bytes_per_token:.3f} | {change:+.1%} | {none.round_trip_rate:.0%} | {nfkc.round_trip_rate:.0%} |"
        )


if __name__ == "__main__":
    main()
