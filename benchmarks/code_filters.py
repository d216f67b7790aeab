"""Removal rates of the ``code_quality`` step on a real source tree (default: this Python's standard library).

.venv/bin/python benchmarks/code_filters.py [--tree DIR]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections import Counter
from pathlib import Path

from lmforge.data.code import CodeQualityFilter
from lmforge.data.io import Document, make_reader


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    args = parser.parse_args()
    reader = make_reader(str(args.tree), "code")
    start = time.perf_counter()
    docs = [d for d in reader.read(reader.files()) if isinstance(d, Document)]
    read_s = time.perf_counter() - start
    step = CodeQualityFilter()
    start = time.perf_counter()
    reasons = Counter(step.decide(d) or "kept" for d in docs)
    filter_s = time.perf_counter() - start
    megabytes = sum(len(d.text.encode()) for d in docs) / 1e6
    languages = Counter(d.meta["language"] for d in docs)
    licences = Counter(d.meta["licence"] for d in docs)
    print(f"{args.tree}: {len(docs)} files, {megabytes:.1f} MB; languages {dict(languages.most_common(5))}")
    print(f"licence headers: {dict(licences.most_common(5))}")
    print(f"read {megabytes / read_s:.1f} MB/s, filter {megabytes / filter_s:.1f} MB/s")
    print("| outcome | files | share |")
    print("| --- | ---: | ---: |")
    for reason, n in reasons.most_common():
        print(f"| {reason} | {n} | {n / len(docs):.1%} |")


if __name__ == "__main__":
    main()
