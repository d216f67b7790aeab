"""Mixed precision: which dtype the forward runs in, and fp16's loss scaling skipping overflowing steps."""

from __future__ import annotations

import torch

from lmforge.train.precision import autocast_factory, grad_scaler, resolve_precision

CPU = torch.device("cpu")


def test_auto_is_fp32_on_cpu_and_explicit_choices_stay() -> None:
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp16", CPU) == "fp16"


def test_autocast_runs_matmuls_in_the_chosen_dtype_and_keeps_fp32_weights() -> None:
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast_factory("bf16", CPU)():
        assert layer(x).dtype == torch.bfloat16
    with autocast_factory("fp32", CPU)():
        assert layer(x).dtype == torch.float32
    assert layer.weight.dtype == torch.float32


def test_only_fp16_gets_a_scaler_and_it_skips_an_overflowing_step() -> None:
    assert grad_scaler("bf16", CPU) is None and grad_scaler("fp32", CPU) is None
    scaler = grad_scaler("fp16", CPU)
    assert scaler is not None
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scale = scaler.get_scale()
    scaler.scale((weight * torch.tensor([1.0, float("inf"), 1.0])).sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(weight.detach(), torch.ones(3))  # the step was skipped
    assert scaler.get_scale() < scale  # and the scale lowered
    optimizer.zero_grad()
    scaler.scale(weight.sum()).backward()
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.9))  # unscaled gradient 1, lr 0.1
