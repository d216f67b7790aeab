"""The LM objective: summed cross-entropy over non-ignored labels, plus the MoE auxiliary loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.train.objective import IGNORE_INDEX, LMObjective


def test_summed_loss_and_count_equal_mean_cross_entropy_times_tokens() -> None:
    model = Transformer(ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    ids = torch.randint(0, 40, (3, 10))
    labels = torch.randint(0, 40, (3, 10))
    labels[0, :4] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    batch = {"input_ids": ids, "labels": labels}
    out = LMObjective()(model, batch)
    logits = model(ids).logits
    expected_mean = F.cross_entropy(logits.reshape(-1, 40), labels.reshape(-1))  # ignore_index -100 default
    assert out.count == 30 - 5 == LMObjective().count(batch)
    torch.testing.assert_close(out.loss_sum / out.count, expected_mean)


def test_moe_aux_loss_is_weighted_by_tokens() -> None:
    cfg = ModelConfig(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, n_experts=4, moe_top_k=2)
    model = Transformer(cfg)
    ids = torch.randint(0, 40, (2, 6))
    out = LMObjective()(model, {"input_ids": ids, "labels": ids})
    aux = model(ids).aux_loss
    assert aux > 0
    torch.testing.assert_close(out.sums["aux"], aux * 12)
    torch.testing.assert_close(out.loss_sum, out.sums["ce"] + out.sums["aux"])
