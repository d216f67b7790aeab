"""Atomic, checksummed, pruned checkpoints; damaged ones are detected; NaN models are never written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.train.checkpoint import (
    MARKER,
    NonFiniteCheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    verify,
)


def model_and_optimizer(seed: int = 0) -> tuple[Transformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 32, (2, 8))
    model(ids).logits.sum().backward()
    optimizer.step()
    return model, optimizer


def save(root: Path, step: int, model, optimizer, keep_last: int = 3) -> Path:
    return save_checkpoint(root, step, model, optimizer, {"step": step}, {"rank": 0}, keep_last)


def test_save_then_load_restores_model_and_optimizer_exactly(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer(0)
    folder = save(tmp_path, 7, model, optimizer)
    assert folder.name == "step_00000007" and verify(folder) is None
    marker = json.loads((folder / MARKER).read_text())
    assert (
        marker["step"] == 7 and "trainer.pt" in marker["sha256"] and any("dcp" in k for k in marker["sha256"])
    )

    other, other_optimizer = model_and_optimizer(1)
    trainer_state, rank_state = load_checkpoint(folder, other, other_optimizer)
    assert trainer_state == {"step": 7} and rank_state == {"rank": 0}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), other.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], other_optimizer.state[q][key])
    fresh = Transformer(model.cfg)
    load_model_weights(folder, fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_keeps_the_last_k_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    for step in (1, 2, 3, 4):
        save(tmp_path, step, model, optimizer, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob(".tmp_*"))


def test_truncated_or_unmarked_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    for step in (1, 2):
        save(tmp_path, step, model, optimizer)
    newest = tmp_path / "step_00000002"
    shard = next((newest / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a partial write / disk trouble
    assert "checksum mismatch" in verify(newest)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    (tmp_path / "step_00000001" / MARKER).unlink()
    assert verify(tmp_path / "step_00000001") == "no completeness marker"
    assert latest_checkpoint(tmp_path) is None


def test_a_crash_mid_write_leaves_only_a_temporary_folder(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    save(tmp_path, 1, model, optimizer)
    (tmp_path / ".tmp_step_00000002").mkdir()  # what a process killed while writing leaves behind
    assert latest_checkpoint(tmp_path) == tmp_path / "step_00000001"


def test_nan_parameters_are_never_checkpointed(tmp_path: Path) -> None:
    model, optimizer = model_and_optimizer()
    with torch.no_grad():
        model.blocks["1"].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError):
        save(tmp_path, 5, model, optimizer)
    assert list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".tmp_*"))
