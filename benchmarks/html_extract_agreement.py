"""html_extract settings: CPU seconds and agreement with the full trafilatura cascade (today's output).

Runs trafilatura as ``HtmlExtractor`` calls it over the Python-docs HTML pages of the corpora builder, once
with the step's default options (the full cascade: main extractor, readability/jusText fallbacks, recall
retry) and once per faster setting, and prints per setting: CPU seconds, pages with identical text, and
the mean similarity to the full-cascade text per page (character level: 2 * matched characters / total
characters, from difflib; 1.0 for identical texts). difflib is quadratic, so a page where either text
is longer than ``--max-diff-chars`` is compared line by line (matched lines' characters), which counts a
line that differs in one character as unmatched: a lower bound.

    PYTHONPATH=src .venv/bin/python benchmarks/html_extract_agreement.py [--html-pages 120]
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

BASE = dict(
    output_format="txt",
    with_metadata=False,
    include_comments=False,
    include_tables=True,
    favor_precision=False,
    favor_recall=False,
    deduplicate=False,
)
SETTINGS: dict[str, dict[str, object]] = {
    "fast=True": {"fast": True},
    "fast=True, favor_precision": {"fast": True, "favor_precision": True},
    "fast=True, include_tables=False": {"fast": True, "include_tables": False},
}


def similarity(reference: str, text: str, max_chars: int) -> float:
    """2 * matched characters / (len(reference) + len(text)); 1.0 when equal (both empty included)."""
    if reference == text:
        return 1.0
    if max(len(reference), len(text)) <= max_chars:
        return difflib.SequenceMatcher(None, reference, text, autojunk=False).ratio()
    left, right = reference.splitlines(keepends=True), text.splitlines(keepends=True)
    blocks = difflib.SequenceMatcher(None, left, right, autojunk=False).get_matching_blocks()
    matched = sum(len(line) for i, _, n in blocks for line in left[i : i + n])
    return 2 * matched / (len(reference) + len(text))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--html-pages", type=int, default=120)
    parser.add_argument("--max-diff-chars", type=int, default=60_000)
    args = parser.parse_args()
    pages = sorted((args.corpora / "web" / "pydocs-html").rglob("*.html"))[: args.html_pages]
    if not pages:
        print(f"no HTML pages in {args.corpora}: run bash ../shared/corpora/build.sh first", file=sys.stderr)
        return 2
    import trafilatura

    htmls = [page.read_text(encoding="utf-8") for page in pages]
    mb = sum(len(h.encode()) for h in htmls) / 1e6
    outputs: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    for name, extra in {"full cascade (step default)": {}, **SETTINGS}.items():
        start = time.process_time()
        outputs[name] = [(trafilatura.extract(h, **{**BASE, **extra}) or "").strip() for h in htmls]
        seconds[name] = time.process_time() - start
    reference = outputs["full cascade (step default)"]
    print(f"{len(pages)} pages, {mb:.1f} MB of HTML\n")
    print(
        "| setting | CPU s | MB/s | identical pages | mean similarity | lowest |\n| --- | ---: | ---: | ---: | ---: | ---: |"
    )
    for name, texts in outputs.items():
        sims = [similarity(a, b, args.max_diff_chars) for a, b in zip(reference, texts)]
        same = sum(a == b for a, b in zip(reference, texts))
        print(
            f"| {name} | {seconds[name]:.2f} | {mb / seconds[name]:.2f} | {same}/{len(texts)} | "
            f"{sum(sims) / len(sims):.3f} | {min(sims):.3f} |"
        )
    differing = [
        p.relative_to(args.corpora / "web" / "pydocs-html")
        for p, a, b in zip(pages, reference, outputs["fast=True"])
        if a != b
    ]
    print(f"\npages where fast=True differs: {', '.join(map(str, differing))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
