"""Prefix-LM training: bidirectional attention over a random prefix, loss on the continuation only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.train.metrics import read_jsonl
from lmforge.train.objective import IGNORE_INDEX
from lmforge.train.prefix_lm import PrefixLMBatches, PrefixLMObjective, prefix_lm_labels
from lmforge.train.trainer import Trainer

from .conftest import VOCAB, tiny_config


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64, structure="prefix"
    )
    return Transformer(cfg).eval()


def _batch(prefix: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (len(prefix), 13), generator=g)
    labels = prefix_lm_labels(tokens[:, 1:], torch.tensor(prefix))
    return {"input_ids": tokens[:, :-1], "labels": labels, "prefix_lengths": torch.tensor(prefix)}


def test_labels_inside_the_prefix_are_ignored():
    batch = _batch([1, 4, 11])
    for row, p in enumerate([1, 4, 11]):
        # label t predicts token t+1: targets 1..p-1 lie in the prefix, the first one kept predicts token p
        masked = (batch["labels"][row] == IGNORE_INDEX).nonzero().flatten().tolist()
        assert masked == list(range(p - 1))
    # packed documents whose positions restart: the prefix is the start of each document
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    labels = prefix_lm_labels(torch.arange(9)[None], torch.tensor([2]), positions)
    assert labels[0].tolist() == [-100, 1, 2, -100, -100, 5, 6, 7, 8]


def test_loss_covers_the_continuation_only():
    model, batch = _model(), _batch([3, 7])
    captured = {}

    def forward(*args, **kwargs):
        out = model(*args, **kwargs)
        out.logits.retain_grad()
        captured["logits"] = out.logits
        return out

    out = PrefixLMObjective()(forward, batch)
    assert out.count == (12 - 2) + (12 - 6)
    logits = captured["logits"]
    want = sum(
        # positions p-1 .. 11 predict the continuation tokens p .. 12
        F.cross_entropy(logits[row, p - 1 :], batch["labels"][row, p - 1 :], reduction="sum")
        for row, p in enumerate([3, 7])
    )
    assert torch.allclose(out.loss_sum, want, atol=1e-4)
    out.loss_sum.backward()
    # what the prefix positions predict gets no gradient; every continuation prediction does
    grad = logits.grad.abs().amax(dim=-1)
    for row, p in enumerate([3, 7]):
        assert grad[row, : p - 1].max() == 0 and (grad[row, p - 1 :] > 0).all()


def test_prefix_is_bidirectional_and_the_continuation_causal():
    model = _model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (1, 12), generator=g)
    prefix = torch.tensor([6])

    def logits(ids: torch.Tensor, prefix_lengths=prefix) -> torch.Tensor:
        with torch.no_grad():
            return model(ids, prefix_lengths=prefix_lengths).logits[0]

    base = logits(tokens)
    later_prefix = tokens.clone()
    later_prefix[0, 5] = (later_prefix[0, 5] + 1) % VOCAB
    changed = (logits(later_prefix) - base).abs().amax(dim=-1)
    assert (changed[:5] > 1e-4).all()  # every earlier prefix position sees the last prefix token
    # with a prefix of 1 (a causal decoder) the earlier positions would not see it
    assert (logits(later_prefix, torch.tensor([1])) - logits(tokens, torch.tensor([1])))[:5].abs().max() == 0
    continuation = tokens.clone()
    continuation[0, 8] = (continuation[0, 8] + 1) % VOCAB
    changed = (logits(continuation) - base).abs().amax(dim=-1)
    assert changed[:8].max() == 0  # neither the prefix nor earlier continuation positions see token 8
    assert (changed[8:] > 1e-4).all()


class _Rows:
    def __init__(self) -> None:
        self.i = 0

    def __next__(self):
        self.i += 1
        tokens = torch.arange(self.i, self.i + 4 * 17).view(4, 17) % VOCAB
        return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def test_splits_are_random_and_reproducible_from_the_state():
    batches = PrefixLMBatches(_Rows(), seed=4)
    state = batches.state_dict()
    drawn = torch.stack([next(batches)["prefix_lengths"] for _ in range(50)])
    assert drawn.min() >= 1 and drawn.max() <= 15 and len(drawn.unique()) == 15
    batches.load_state_dict(state)
    assert torch.equal(next(batches)["prefix_lengths"], drawn[0])
    with pytest.raises(ValueError, match="prefix_lengths"):
        PrefixLMObjective()(
            _model(), {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4)}
        )


def test_prefix_lm_trains_through_the_trainer(tmp_path: Path, shards: Path):
    cfg = tiny_config(
        tmp_path / "run", shards, max_steps=20, **{"model.structure": "prefix", "optim.lr": 1e-2}
    )
    from lmforge.shards.loader import PackedLoader

    data = PrefixLMBatches(PackedLoader.from_config(cfg.data, cfg.batch.micro_batch_size), seed=cfg.seed)
    Trainer(cfg, objective=PrefixLMObjective(), train_data=data).fit()
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses
