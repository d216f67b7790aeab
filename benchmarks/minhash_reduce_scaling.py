"""MinHash-LSH reduce (the ``minhash_dedup`` barrier) on synthetic signatures: one process vs sharded parts.

Writes ``--tasks`` pass-1 artifacts (ids + 128 ``uint32`` MinHash values per document, as
``MinHashDedup.write_artifact`` writes them) for ``--docs`` documents, a fifth of them near-copies of
another document (each signature position redrawn with probability 0.1), then times in fresh processes:

* ``1 process``: ``MinHashDedup.reduce`` (every bucket key in one process);
* ``N workers``: ``reduce_part`` k of N in N processes at once, then ``merge_parts`` in another one
  (what ``LocalExecutor(workers=N)`` runs at the barrier).

For each it reports wall seconds and peak RSS (``VmHWM``) of each process, and checks that both
decisions are identical. ``--baseline SRC`` also runs ``reduce`` from another checkout's sources (e.g. the
single-process reduce before sharding: ``git archive 0c2ffc7 src | tar -x -C /tmp/before``) and checks
that its drops and cluster sizes are the same.

    .venv/bin/python benchmarks/minhash_reduce_scaling.py --docs 100000 --workers 2
    .venv/bin/python benchmarks/minhash_reduce_scaling.py --docs 100000 --baseline /tmp/before/src
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from lmforge.data.dedup.minhash import MinHashDedup

NUM_PERM = 128


def write_artifacts(folder: Path, docs: int, tasks: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    n_base = docs - docs // 5
    signatures = np.empty((docs, NUM_PERM), dtype=np.uint32)
    signatures[:n_base] = rng.integers(0, 2**32, (n_base, NUM_PERM), dtype=np.uint32)
    for lo in range(n_base, docs, 100_000):  # near-copies, in slices to bound the temporaries
        hi = min(lo + 100_000, docs)
        copies = signatures[rng.integers(0, n_base, hi - lo)]
        redraw = rng.random(copies.shape) < 0.1
        copies[redraw] = rng.integers(0, 2**32, int(redraw.sum()), dtype=np.uint32)
        signatures[lo:hi] = copies
    order = rng.permutation(docs)
    paths = []
    for t, chunk in enumerate(np.array_split(order, tasks)):
        path = folder / f"artifact-{t:05d}"
        with open(path, "wb") as handle:
            np.savez(
                handle, ids=np.array([f"doc{i:08d}" for i in chunk], dtype=str), signatures=signatures[chunk]
            )
        paths.append(path)
    return paths


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_reduce(artifacts: list[Path], out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    MinHashDedup().reduce(artifacts, out)
    return time.perf_counter() - start, peak_rss_mib()


def run_part(artifacts: list[Path], part: int, n_parts: int, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    MinHashDedup().reduce_part(artifacts, part, n_parts, out)
    return time.perf_counter() - start, peak_rss_mib()


def run_merge(artifacts: list[Path], parts: list[Path], out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    MinHashDedup().merge_parts(artifacts, parts, out)
    return time.perf_counter() - start, peak_rss_mib()


def fresh(fn: Callable[..., tuple[float, float]], *args: object) -> tuple[float, float]:
    """``fn(*args)`` in a new process (so its peak RSS is its own)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, default=16, help="pass-1 artifacts (tasks)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-single", action="store_true", help="only the sharded reduce")
    parser.add_argument("--baseline", default=None, help="sources (a src/ folder) of a reduce to compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduce-only", nargs=2, metavar=("ARTIFACTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reduce_only:  # the baseline's process
        artifacts = sorted(Path(args.reduce_only[0]).glob("artifact-*"))
        print(json.dumps(run_reduce(artifacts, Path(args.reduce_only[1]))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        artifacts = write_artifacts(folder, args.docs, args.tasks, args.seed)
        size = sum(p.stat().st_size for p in artifacts) / 2**20
        print(f"{args.docs} documents in {args.tasks} artifacts ({size:.0f} MiB), written in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip

        n = args.workers
        parts = [folder / f"part-{k}" for k in range(n)]
        start = time.perf_counter()
        with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_part, artifacts, k, n, parts[k]) for k in range(n)]
            part_results = [f.result() for f in futures]
        (folder / "sharded").mkdir()
        merge_seconds, merge_rss = fresh(run_merge, artifacts, parts, folder / "sharded")
        sharded_wall = time.perf_counter() - start
        edges = sum(len(np.load(p)) for p in parts)
        print(f"{n} workers: wall {sharded_wall:.1f} s (parts in parallel, then merge); {edges} edges")
        for k, (seconds, rss) in enumerate(part_results):
            print(f"  part {k}: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
        print(f"  merge: {merge_seconds:.1f} s, peak RSS {merge_rss:.0f} MiB")

        if not args.skip_single:
            (folder / "single").mkdir()
            seconds, rss = fresh(run_reduce, artifacts, folder / "single")
            print(f"1 process: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
            for t in range(args.tasks):
                name = f"task-{t:05d}.npz"
                with np.load(folder / "single" / name) as a, np.load(folder / "sharded" / name) as b:
                    assert all(np.array_equal(a[key], b[key]) for key in a), f"decisions differ in {name}"
            print("decisions identical")
        if args.baseline:
            (folder / "baseline").mkdir()
            env = {**os.environ, "PYTHONPATH": args.baseline}
            command = [sys.executable, __file__, "--reduce-only", str(folder), str(folder / "baseline")]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            seconds, rss = json.loads(out.strip().splitlines()[-1])
            print(f"baseline ({args.baseline}), 1 process: {seconds:.1f} s, peak RSS {rss:.0f} MiB")
            for t in range(args.tasks):
                name = f"task-{t:05d}.npz"
                with np.load(folder / "baseline" / name) as a, np.load(folder / "sharded" / name) as b:
                    assert all(np.array_equal(a[key], b[key]) for key in ("drop", "kept", "size")), name
            print("baseline drops and cluster sizes identical")
        with np.load(folder / "sharded" / "task-00000.npz") as d:
            print(f"task 0: {len(d['drop'])} of {args.docs // args.tasks} documents dropped")


if __name__ == "__main__":
    main()
