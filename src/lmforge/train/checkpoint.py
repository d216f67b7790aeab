"""Training checkpoints: atomic, checksummed, pruned, and resumable on another number of ranks.

Layout of ``CKPT_ROOT/step_00000100/``:

- ``dcp/``: model and optimizer state written with ``torch.distributed.checkpoint`` (each rank writes its
  shards; any world size can read them back, which is how a run resumes on a different number of ranks);
- ``trainer.pt``: state shared by all ranks (step, tokens, data-loader position, spike-detector window,
  grad-scaler, counters);
- ``rank_00000.pt`` ...: per-rank RNG states;
- ``COMPLETE.json``: written last, with the SHA-256 of every other file.

Next to the checkpoints, ``rollbacks.pt`` is the run's rollback log (every rollback, with the data position
it resumed at, so that a relaunch skips the same data), and ``damaged/`` holds checkpoints moved aside when
a run whose checkpoints are all unusable is explicitly started over.

A checkpoint is built in ``.tmp_step_*`` and renamed into place, so a crash never leaves a half-written
``step_*`` folder; a folder that was damaged afterwards (truncated file) fails its checksum and the newest
intact one is used instead. Parameters are checked before writing: a NaN/inf model is never saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from lmforge.data.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

PREFIX = "step_"
MARKER = "COMPLETE.json"
TRAINER_FILE = "trainer.pt"
ROLLBACKS_FILE = "rollbacks.pt"
DAMAGED_DIR = "damaged"


class NonFiniteCheckpointError(RuntimeError):
    """Refusal to checkpoint a model whose parameters hold NaN or inf."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _dcp_quietly() -> Iterator[None]:
    """DCP warns on every single-process save/load that it assumes a single process: we mean it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(PREFIX))


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step_*`` folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=step_of)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def verify(folder: Path) -> str | None:
    """None when ``folder`` is a complete, intact checkpoint; otherwise what is wrong with it."""
    marker = folder / MARKER
    if not marker.is_file():
        return "no completeness marker"
    try:
        expected: dict[str, str] = json.loads(marker.read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError) as err:
        return f"unreadable marker: {err}"
    present = {str(p.relative_to(folder)) for p in _files(folder)}
    if set(expected) != present:
        return f"files differ from the marker (missing {sorted(set(expected) - present)})"
    for name, digest in expected.items():
        if _sha256(folder / name) != digest:
            return f"checksum mismatch in {name}"
    return None


def verify_all(root: str | Path) -> list[tuple[Path, str | None]]:
    """Every checkpoint under ``root``, newest first, with what is wrong with it (None: intact)."""
    return [(folder, verify(folder)) for folder in reversed(list_checkpoints(root))]


def move_aside(folders: list[Path], root: str | Path) -> Path:
    """Move ``folders`` into ``root/damaged/`` (never overwriting an earlier one there); returns that folder."""
    damaged = Path(root) / DAMAGED_DIR
    damaged.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        target, n = damaged / folder.name, 1
        while target.exists():
            target, n = damaged / f"{folder.name}.{n}", n + 1
        os.replace(folder, target)
    return damaged


def read_rollbacks(root: str | Path) -> list[dict[str, Any]]:
    """The run's rollback log (oldest first; empty when there is none)."""
    path = Path(root) / ROLLBACKS_FILE
    return torch.load(path, weights_only=False) if path.is_file() else []


def write_rollbacks(root: str | Path, rollbacks: list[dict[str, Any]]) -> None:
    """Replace the run's rollback log atomically (rank 0); an empty log removes the file."""
    path = Path(root) / ROLLBACKS_FILE
    if not rollbacks:
        path.unlink(missing_ok=True)
        return
    buffer = io.BytesIO()
    torch.save(rollbacks, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest intact checkpoint under ``root``; damaged ones are logged and passed over."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        log.warning("checkpoint %s is unusable (%s); trying an older one", folder, problem)
    return None


def parameters_finite(model: nn.Module) -> bool:
    """True when every parameter on every rank is finite (one all-reduce when distributed)."""
    finite = all(
        bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in model.parameters()
    )
    if _distributed():
        flag = torch.tensor([0 if finite else 1], dtype=torch.int64)
        dist.all_reduce(flag)
        finite = int(flag) == 0
    return finite


def save_checkpoint(
    root: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` collectively (every rank calls this); returns its folder."""
    if not parameters_finite(model):
        raise NonFiniteCheckpointError(f"step {step}: parameters hold NaN/inf; not writing a checkpoint")
    root = Path(root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{final.name}"
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    with _dcp_quietly():
        dcp.save(
            {"model": model_state, "optim": optim_state},
            checkpoint_id=str(tmp / "dcp"),
            no_dist=not _distributed(),
        )
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_FILE)
    _barrier()
    if rank == 0:
        marker = {"step": step, "sha256": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}}
        with (tmp / MARKER).open("w", encoding="utf-8") as f:
            json.dump(marker, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a checkpoint of the same step from before a rollback or crash
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore model and optimizer in place (collectively); return the trainer state and this rank's state
    (None when the checkpoint was written by fewer ranks than this run has)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _dcp_quietly():
        dcp.load(state, checkpoint_id=str(folder / "dcp"), no_dist=not _distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer_state = torch.load(folder / TRAINER_FILE, weights_only=False)
    rank_file = folder / f"rank_{_rank():05d}.pt"
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.is_file() else None
    return trainer_state, rank_state


def load_model_weights(folder: Path, model: nn.Module) -> None:
    """Fill an unsharded ``model`` (on this process alone) from a checkpoint written by any number of ranks.

    Pipeline stages each saved only their own blocks; together they cover the full model.
    """
    state = {"model": model.state_dict()}
    with _dcp_quietly():
        dcp.load(state, checkpoint_id=str(folder / "dcp"), no_dist=True)
    model.load_state_dict(state["model"])
