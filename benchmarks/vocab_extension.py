"""Vocabulary extension for Korean: tokens per character before and after ``lmforge tokenizer extend``.

A byte-level BPE is trained on English text (Python docs and English man pages from the corpora builder),
extended with pieces learned on half of the Korean Debian FAQ pages, and both are measured on the other
half (held out), and on English text (which the extension must not make worse).

    .venv/bin/python benchmarks/vocab_extension.py --corpus /tmp/lmforge-corpora --vocab 8000 --add 1000 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.data.io import read_documents
from lmforge.tokenizer import TokenizerTrainConfig, train_tokenizer
from lmforge.tokenizer.extend import extend_tokenizer, tokens_per_char


def texts(path: Path, fmt: str = "auto", limit: int | None = None) -> list[str]:
    out = [d.text for d in read_documents(str(path), fmt)]
    return out[:limit] if limit else out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--add", type=int, nargs="+", default=[1000, 2000])
    args = parser.parse_args()
    english = texts(args.corpus / "pydocs.jsonl.gz", limit=300) + texts(
        args.corpus / "man-en.jsonl.gz", limit=300
    )
    korean = texts(args.corpus / "web" / "debian-faq-en-ko" / "ko", "html")
    train_ko, held_ko = korean[::2], korean[1::2]
    held_en = english[1::10]
    base = train_tokenizer(english, TokenizerTrainConfig(vocab_size=args.vocab))
    print(f"base: byte-level BPE, {base.vocab_size} tokens, trained on {len(english)} English documents")
    print(
        f"Korean: {len(train_ko)} pages to learn from, {len(held_ko)} held out ({sum(map(len, held_ko)):,} chars)"
    )
    print("| tokenizer | vocabulary | Korean tokens/char (held out) | English tokens/char |")
    print("| --- | ---: | ---: | ---: |")
    print(
        f"| base | {base.vocab_size} | {tokens_per_char(base, held_ko):.3f} | {tokens_per_char(base, held_en):.3f} |"
    )
    for add in args.add:
        extended, added = extend_tokenizer(base, train_ko, add)
        print(
            f"| base + {len(added)} Korean pieces | {extended.vocab_size} | {tokens_per_char(extended, held_ko):.3f} "
            f"| {tokens_per_char(extended, held_en):.3f} |"
        )


if __name__ == "__main__":
    main()
