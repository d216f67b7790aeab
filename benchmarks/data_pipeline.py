"""Whole data pipeline throughput: extract -> langid -> Gopher/C4/FineWeb -> PII -> exact + MinHash dedup.

Runs ``recipes/data/web_clean.yaml``'s steps over real text (the corpora of ``../shared/corpora/build.sh``:
Python docs as HTML pages, manual pages in English and German, the King James Bible, Shakespeare) and
prints per-step time (wall clock inside the steps) and MB/s per core (per CPU second of the process
and its workers). The peer is the same step objects driven by a plain Python loop
over documents held in memory (no files between stages, no exclusion/reject outputs, no markers): the
ratio is what the pipeline machinery costs on top of the steps themselves.

    .venv/bin/python benchmarks/data_pipeline.py [--corpora /tmp/lmforge-corpora] [--html-pages 120]
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lmforge.config import load_config
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.data.io import HtmlReader, JsonlReader, Writer
from lmforge.data.pipeline import Pipeline
from lmforge.data.recipe import PipelineConfig, build_step
from lmforge.data.step import GlobalStep, Step

RECIPE = Path(__file__).parents[1] / "recipes" / "data" / "web_clean.yaml"
JSONL = ["man-en.jsonl.gz", "man-de.jsonl.gz", "kjv.jsonl.gz", "shakespeare.jsonl.gz", "jargon.jsonl.gz"]


def recipe_steps() -> list[Step]:
    cfg = load_config(PipelineConfig, RECIPE, ["inputs=[]", "output.path=unused", "run_dir=unused"])
    return [build_step(spec, i) for i, spec in enumerate(cfg.steps)]


def corpus(corpora: Path, html_pages: int, work: Path) -> tuple[Path, list[Path], int]:
    """The HTML pages (copied into one folder) and JSONL files, and their raw size in bytes."""
    pages = sorted((corpora / "web" / "pydocs-html").rglob("*.html"))[:html_pages]
    html_dir = work / "html"
    html_dir.mkdir()
    for i, page in enumerate(pages):
        shutil.copy(page, html_dir / f"{i:04d}.html")
    jsonl = [corpora / name for name in JSONL]
    raw_bytes = sum(p.stat().st_size for p in html_dir.iterdir())
    raw_bytes += sum(len(gzip.decompress(p.read_bytes())) for p in jsonl)
    return html_dir, jsonl, raw_bytes


def plain_loop(
    html_dir: Path, jsonl: list[Path], out: Path, work: Path, step_cpu: dict[str, float] | None = None
) -> tuple[int, float]:
    """The same steps in a bare loop: read everything, apply each step in turn, write one file. The CPU
    seconds of each step (``time.process_time``, this process only) go into ``step_cpu``."""
    step_cpu = {} if step_cpu is None else step_cpu
    start = time.perf_counter()
    docs = [
        Document(p.name, p.read_text(encoding="utf-8"), {"format": "html"})
        for p in sorted(html_dir.iterdir())
    ]
    for path in jsonl:
        for line in gzip.decompress(path.read_bytes()).splitlines():
            record = json.loads(line)
            docs.append(Document(record["id"], record["text"], record.get("meta", {})))
    for step in recipe_steps():
        step_start = time.process_time()
        if isinstance(step, GlobalStep):
            step.start_collect(0)
            for position, doc in enumerate(docs):
                step.collect(doc, position)
            step.write_artifact(work / f"{step.name}.artifact")
            (work / f"{step.name}.decision").mkdir()
            step.reduce([work / f"{step.name}.artifact"], work / f"{step.name}.decision")
            step.load_decision(work / f"{step.name}.decision", 0)
            kept = []
            for position, doc in enumerate(docs):
                step.position = position
                if step.process(doc) is not None:
                    kept.append(doc)
            docs = kept
        else:
            docs = [d for d in docs if step.process(d) is not None]
        step_cpu[step.name] = time.process_time() - step_start
    with gzip.open(out, "wt", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc.to_record(), ensure_ascii=False) + "\n")
    return len(docs), time.perf_counter() - start


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: on a shared machine wall time says more about
    the neighbours than about the code."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", type=Path, default=Path("/tmp/lmforge-corpora"))
    parser.add_argument("--html-pages", type=int, default=120)
    parser.add_argument(
        "--workers", type=int, default=1, help="also time the pipeline with this many workers"
    )
    args = parser.parse_args()
    if not (args.corpora / "kjv.jsonl.gz").exists():
        print(f"no corpora in {args.corpora}: run bash ../shared/corpora/build.sh first", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        html_dir, jsonl, raw_bytes = corpus(args.corpora, args.html_pages, work)
        mb = raw_bytes / 1e6
        rows = []
        reports = {}
        for workers in sorted({1, args.workers}):
            readers = [
                HtmlReader(str(html_dir), source="pages", files_per_task=20),
                JsonlReader([str(p) for p in jsonl]),
            ]
            pipeline = Pipeline(readers, recipe_steps(), Writer(str(work / f"out{workers}")))
            start, cpu = time.perf_counter(), cpu_seconds()
            report = LocalExecutor(workers).run(pipeline, work / f"run{workers}", progress=False)
            reports[workers] = report
            rows.append((f"lmforge pipeline, {workers} worker(s)", report.kept, time.perf_counter() - start,
                         cpu_seconds() - cpu))  # fmt: skip
        (work / "plain").mkdir()
        cpu = cpu_seconds()
        step_cpu: dict[str, float] = {}
        kept, seconds = plain_loop(html_dir, jsonl, work / "plain.jsonl.gz", work / "plain", step_cpu)
        rows.append(("plain loop over the same steps (peer)", kept, seconds, cpu_seconds() - cpu))

    report = reports[1]
    print(
        f"\ninput: {args.html_pages} HTML pages + {len(jsonl)} JSONL files, {mb:.1f} MB raw, {report.docs_in} documents"
    )
    print("\n| step | in | kept | seconds | share |\n| --- | ---: | ---: | ---: | ---: |")
    total = sum(s.seconds for s in report.steps)
    for s in report.steps:
        print(f"| {s.name} | {s.docs_in} | {s.kept} | {s.seconds:.2f} | {100 * s.seconds / total:.1f}% |")
    steps_total = sum(step_cpu.values())
    print(
        "\nplain loop, CPU seconds per step (the dominant step first):\n| step | CPU s | share |\n| --- | ---: | ---: |"
    )
    for name, seconds in sorted(step_cpu.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.2f} | {100 * seconds / steps_total:.1f}% |")
    print(f"| all steps | {steps_total:.2f} ({mb / steps_total:.2f} MB/s) | |")
    print("\n| run | kept | wall s | CPU s | MB/s per core (CPU) |\n| --- | ---: | ---: | ---: | ---: |")
    for name, kept, wall, cpu in rows:
        print(f"| {name} | {kept} | {wall:.1f} | {cpu:.1f} | {mb / cpu:.2f} |")
    single, peer = rows[0], rows[-1]
    print(f"\npipeline (1 worker) / plain loop, throughput per CPU second: {peer[3] / single[3]:.2f}x")
    if single[1] != peer[1]:
        print(f"WARNING: the pipeline kept {single[1]} documents, the plain loop {peer[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
