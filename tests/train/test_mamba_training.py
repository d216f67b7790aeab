"""Mamba and hybrid (Mamba + attention) models train through the one trainer: the loss falls."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.model import load_pretrained
from lmforge.train import train
from lmforge.train.metrics import read_jsonl
from tests.train.conftest import tiny_config

LAYERS = {
    "mamba": {"layer_types": ["mamba", "mamba"], "position": "none"},
    "hybrid": {"layer_types": ["mamba", "attention"]},
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_a_tiny_mamba_model_trains_and_its_loss_falls(tmp_path: Path, shards: Path, kind: str) -> None:
    overrides = {f"model.{key}": value for key, value in LAYERS[kind].items()}
    cfg = tiny_config(
        tmp_path / "run",
        shards,
        max_steps=25,
        **overrides,
        **{"model.mamba_scan_chunk": 8, "optim.lr": 1e-2, "checkpoint.export": True},
    )
    result = train(cfg)
    history = [r["loss"] for r in read_jsonl(result.run_dir / "metrics.jsonl") if "loss" in r]
    assert len(history) == 25
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5
    exported = load_pretrained(result.model_dir)
    assert exported.cfg.layer_types == LAYERS[kind]["layer_types"]


def test_packed_documents_train_with_document_masking(tmp_path: Path, shards: Path) -> None:
    cfg = tiny_config(
        tmp_path / "run",
        shards,
        max_steps=20,
        **{
            "model.layer_types": ["mamba", "attention"],
            "data.document_masking": True,
            "optim.lr": 1e-2,
        },
    )
    history = [r["loss"] for r in read_jsonl(train(cfg).run_dir / "metrics.jsonl") if "loss" in r]
    assert history[-1] < 0.6 * history[0]
