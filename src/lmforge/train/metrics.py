"""Run-folder observability: metrics.jsonl, events.jsonl, optional TensorBoard / W&B, MFU, plots."""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), matched against the device name. The
# trainer's MFU uses the measured peak (measured_peak_flops) unless log.peak_flops is set; the table serves
# reports that quote MFU against the datasheet (benchmarks/gpu/check.py).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12}


def peak_flops(device: torch.device, configured: float | None = None) -> float | None:
    """Datasheet peak FLOP/s of one device: the configured value, else the table for known GPUs, else None."""
    if configured:
        return configured
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@lru_cache(maxsize=8)
def _probe(device_key: str, dtype: torch.dtype, size: int, seconds: float) -> float:
    """Best FLOP/s of ``size``-square matmuls timed for about ``seconds`` (at least five calls)."""
    device = torch.device(device_key)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=gen).to(dtype)
    b = torch.randn(size, size, device=device, generator=gen).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: kernel selection, page faults
    _sync(device)
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 5 or (spent < seconds and calls < 1000):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        _sync(device)
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return 2 * size**3 / best


def measured_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.2
) -> float:
    """Peak matmul FLOP/s of ``device`` in ``dtype``, measured by a short probe (cached per process).

    The MFU denominator the trainer uses unless ``log.peak_flops`` is set: what this machine reaches on a
    GEMM in the training dtype, rather than a datasheet constant (unknown for most CPUs, and off by the
    clock, the vector units and bf16 support). On a GPU: the best of 8192-square matmuls. On a CPU: the
    best single-thread rate of 256-square matmuls (cache-resident, well under a millisecond each, so that
    some calls run without being preempted on a busy machine) times the thread count;
    timing one thread and scaling keeps the probe meaningful on a shared machine, where a multi-threaded
    GEMM waits for whichever core a neighbour holds (the best of many short calls is the unloaded rate).
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _probe(f"cuda:{index}", dtype, 8192, seconds)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_core = _probe(str(device), dtype, 256, seconds)
    finally:
        torch.set_num_threads(threads)
    return per_core * threads


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or peak resident memory of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024**3 if sys.platform == "darwin" else rss / 1024**2


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL log; a line that is not a JSON object (the torn last line of a process killed
    mid-write) is dropped with a warning, as the data readers drop malformed records."""
    from lmforge.data.io import Reject, read_records

    if not Path(path).is_file():
        return []
    records = []
    for record in read_records(path, "jsonl"):
        if isinstance(record, Reject):
            log.warning("%s: %s (torn write?); dropped", record.where, record.reason)
            continue
        records.append(record)
    return records


class MetricsLogger:
    """Writes one JSON line per logged step (rank 0 only) and mirrors it to TensorBoard / W&B if asked.

    On resume and rollback, records of steps after the checkpoint are dropped (``truncate``), so
    metrics.jsonl always describes one unbroken run.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, wandb: bool = False) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.events_path = run_dir / "events.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("log.tensorboard: the tensorboard package is not installed; skipping")
        if wandb:
            try:
                import wandb as wandb_module

                self._wandb = wandb_module.init(mode="offline", dir=str(run_dir), project="lmforge")
            except ImportError:
                log.warning("log.wandb: the wandb package is not installed; skipping")

    def truncate(self, step: int) -> None:
        """Forget records of steps after ``step`` (they are about to be redone after a resume or rollback)."""
        if not self.enabled:
            return
        kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def event(self, record: dict[str, Any]) -> None:
        """A stability or checkpoint event (spike, rollback, skipped step); also sent to the console log."""
        if not self.enabled:
            return
        log.warning("event: %s", record)
        with self.events_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of training/validation loss, learning rate and throughput from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    if not train:
        return []
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    written = []
    panels = {
        "loss": [("loss", "train"), ("val_loss", "validation")],
        "lr": [("lr", "learning rate")],
        "throughput": [("tokens_per_s", "tokens/s")],
    }
    for name, series in panels.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = plots_dir / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
