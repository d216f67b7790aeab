"""The chunked cross-entropy against the plain one (full logits + ``F.cross_entropy``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import ModelConfig, Transformer
from lmforge.train.objective import IGNORE_INDEX, LMObjective, chunked_lm_loss_sum, lm_loss_sum


def _inputs(rows: int = 37, d: int = 16, vocab: int = 50):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, d, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(vocab, d, generator=gen) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
def test_same_loss_and_gradients_as_full_logits(chunk: int) -> None:
    hidden, weight, labels = _inputs()
    count = int((labels != IGNORE_INDEX).sum())
    ref = F.cross_entropy(hidden @ weight.T, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_lm_loss_sum(hidden, weight, labels, chunk) / count
    got_h, got_w = torch.autograd.grad(got, (hidden, weight))
    assert abs(got.item() - ref.item()) < 1e-5
    torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_w, ref_w, atol=1e-5, rtol=0)


def test_frozen_weight_and_no_grad() -> None:
    hidden, weight, labels = _inputs()
    weight.requires_grad_(False)
    ref = lm_loss_sum(hidden @ weight.T, labels)
    (ref_h,) = torch.autograd.grad(ref, hidden)
    got = chunked_lm_loss_sum(hidden, weight, labels, 8)
    (got_h,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got_h, ref_h, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert abs(chunked_lm_loss_sum(hidden, weight, labels, 8).item() - ref.item()) < 1e-4


def test_all_ignored_gives_zero() -> None:
    hidden, weight, labels = _inputs()
    labels[:] = IGNORE_INDEX
    loss = chunked_lm_loss_sum(hidden, weight, labels, 8)
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_lm_objective_chunked_matches_plain_on_a_model() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
    batch["labels"][0, :3] = IGNORE_INDEX
    results = []
    for objective in (LMObjective(), LMObjective(chunk_tokens=5)):
        model.zero_grad()
        out = objective(model, batch)
        (out.loss_sum / out.count).backward()
        results.append((out.loss_sum.item() / out.count, [p.grad.clone() for p in model.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-5
    for plain, chunked in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=0)


def test_bf16_autocast_close_to_plain() -> None:
    hidden, weight, labels = _inputs(rows=64, d=32, vocab=80)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = lm_loss_sum(F.linear(hidden, weight), labels)
        got = chunked_lm_loss_sum(hidden, weight, labels, 16)
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, weight))
    got_h, got_w = torch.autograd.grad(got, (hidden, weight))
    assert got.dtype == torch.float32 and abs(got.item() - ref.item()) / ref.item() < 1e-2
    torch.testing.assert_close(got_h, ref_h, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got_w, ref_w, atol=2e-2, rtol=2e-2)


def test_chunk_must_be_positive() -> None:
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk"):
        chunked_lm_loss_sum(hidden, weight, labels, 0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        LMObjective(chunk_tokens=-1)
