import json

import numpy as np
import pytest
import torch

from lmforge.data.doremi import DoReMiWeights, domain_weighted_loss, per_domain_excess_loss
from lmforge.data.mixture import MixtureConfig, mixture_weights


def test_weight_update_matches_a_hand_computation() -> None:
    doremi = DoReMiWeights(["web", "code", "math"])  # eta = 1, eps = 1e-4, alpha_0 = 1/3 each
    # step 1: alpha' = (1/3) * exp([0.5, 0, 1]) -> normalised [1.64872, 1, 2.71828] / 5.36700,
    # then (1 - 1e-4) * alpha + 1e-4 / 3
    first = doremi.update([0.5, 0.0, 1.0])
    assert first == pytest.approx([0.3071985, 0.1863384, 0.5064631], abs=1e-7)
    # step 2 starts from step 1's alpha: code's excess 2.0 multiplies it by e^2 = 7.389
    second = doremi.update(np.array([0.0, 2.0, 0.0]))
    assert second == pytest.approx([0.1402589, 0.6285248, 0.2312163], abs=1e-7)
    assert sum(second) == pytest.approx(1.0)
    # the output is the average of alpha_t over the steps
    assert doremi.average == pytest.approx([0.2237287, 0.4074316, 0.3688397], abs=1e-7)
    assert doremi.steps == 2


def test_no_excess_keeps_uniform_and_huge_excess_does_not_overflow() -> None:
    doremi = DoReMiWeights(["a", "b"])
    assert doremi.update([0.0, 0.0]) == pytest.approx([0.5, 0.5])
    alpha = doremi.update([5000.0, 0.0])
    assert np.isfinite(alpha).all()
    # the smoothing keeps every domain at least eps / k
    assert alpha == pytest.approx([1 - 1e-4 / 2, 1e-4 / 2])


def test_per_domain_excess_loss_clips_and_averages_per_token() -> None:
    proxy = torch.tensor([[2.0, 1.0, 3.0], [0.5, 0.5, 4.0], [1.0, 1.0, 1.0]])
    reference = torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    domains = torch.tensor([0, 1, 0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    excess = per_domain_excess_loss(proxy, reference, domains, num_domains=3, mask=mask)
    # domain 0: rows 0 and 2 -> clipped excess [1, 0, 2] + [1, 1, 1] = 6 over 6 tokens
    # domain 1: row 1, last token masked -> [0, 0.5] = 0.5 over 2 tokens; domain 2: no tokens -> 0
    assert excess.tolist() == pytest.approx([1.0, 0.25, 0.0])


def test_domain_weighted_loss_and_its_gradient() -> None:
    token_loss = torch.tensor([[1.0, 3.0], [4.0, 6.0]], requires_grad=True)
    loss = domain_weighted_loss(token_loss, torch.tensor([0, 1]), torch.tensor([0.25, 0.75]))
    assert loss.item() == pytest.approx(0.25 * 2.0 + 0.75 * 5.0)
    loss.backward()
    assert torch.allclose(token_loss.grad, torch.tensor([[0.125, 0.125], [0.375, 0.375]]))


def test_weights_file_is_read_by_the_mixture(tmp_path) -> None:
    doremi = DoReMiWeights(["web", "code"])
    doremi.update([0.0, 1.0])
    path = tmp_path / "doremi.json"
    doremi.save(path)
    data = json.loads(path.read_text())
    assert data["method"] == "doremi" and data["steps"] == 1 and data["eta"] == 1.0
    weights = mixture_weights(
        MixtureConfig(strategy="fixed", weights_file=str(path)), {"web": 10, "code": 10}
    )
    assert weights == pytest.approx(doremi.as_dict())
    assert weights["code"] > weights["web"]
