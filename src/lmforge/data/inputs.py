"""Input files and their domains: what ``lmforge shards tokenize`` and ``lmforge tokenizer`` read.

A domain names each input: ``NAME=PATH`` on the command line, else the first folder of the file's path
below the inputs' common root (``clean/web/0.jsonl.gz`` and ``clean/code/0.jsonl.gz`` -> ``web`` and
``code``), else the default domain. The loader's mixtures sample these domains.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.data.io import make_reader


@dataclass(frozen=True)
class InputFile:
    """One input file: its shard name (``00000``, ``00001``... in a fixed order), path and domain."""

    name: str
    path: str
    domain: str


def split_domain(spec: str) -> tuple[str | None, str]:
    """``"web=/data/web"`` -> ``("web", "/data/web")``; a bare path (even one containing "=" after a slash)
    names no domain."""
    head, sep, tail = spec.partition("=")
    if sep and head and "/" not in head and ":" not in head:
        return head, tail
    return None, spec


def plan_inputs(
    inputs: Sequence[str], fmt: str = "auto", text_key: str = "text", default_domain: str = "default"
) -> list[InputFile]:
    """Every input file with its domain and name, sorted by (domain, path); a file listed twice is an error."""
    found: list[tuple[str, str]] = []
    for spec in inputs:
        domain, path = split_domain(spec)
        reader = make_reader(path, fmt, text_key=text_key)
        for file in reader.files():
            if domain is not None:
                found.append((domain, file))
                continue
            parts = reader.relative(file).split(posixpath.sep)
            found.append((parts[0] if len(parts) > 1 else default_domain, file))
    found.sort(key=lambda item: (item[0], item[1]))
    files = [f for _, f in found]
    if len(set(files)) != len(files):
        raise ValueError("an input file is listed twice (check overlapping inputs)")
    return [InputFile(f"{i:05d}", path, domain) for i, (domain, path) in enumerate(found)]
