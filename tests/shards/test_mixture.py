import json

import pytest

from lmforge.shards.mixture import MixtureConfig, mixture_weights, read_weights_file, write_weights_file

TOKENS = {"web": 9_000_000, "code": 900_000, "math": 100_000}


def test_proportional_follows_token_counts() -> None:
    weights = mixture_weights(MixtureConfig(strategy="proportional"), TOKENS)
    assert weights == pytest.approx({"web": 0.9, "code": 0.09, "math": 0.01})


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_temperature_scaling_matches_the_formula(temperature: float) -> None:
    weights = mixture_weights(MixtureConfig(strategy="temperature", temperature=temperature), TOKENS)
    scaled = {d: n ** (1 / temperature) for d, n in TOKENS.items()}
    total = sum(scaled.values())
    assert weights == pytest.approx({d: v / total for d, v in scaled.items()})


def test_high_temperature_upsamples_small_domains_towards_uniform() -> None:
    hot = mixture_weights(MixtureConfig(strategy="temperature", temperature=100.0), TOKENS)
    assert hot["math"] > 0.3 and max(hot.values()) - min(hot.values()) < 0.05


def test_fixed_weights_are_normalised_and_missing_domains_get_zero() -> None:
    weights = mixture_weights(MixtureConfig(strategy="fixed", weights={"web": 3, "code": 1}), TOKENS)
    assert weights == {"web": 0.75, "code": 0.25, "math": 0.0}


def test_fixed_weights_from_a_weights_file(tmp_path) -> None:
    path = tmp_path / "w.json"
    write_weights_file(path, {"web": 0.2, "code": 0.5, "math": 0.3}, method="doremi")
    assert json.loads(path.read_text())["method"] == "doremi"
    assert read_weights_file(path) == {"web": 0.2, "code": 0.5, "math": 0.3}
    weights = mixture_weights(MixtureConfig(strategy="fixed", weights_file=str(path)), TOKENS)
    assert weights == pytest.approx({"web": 0.2, "code": 0.5, "math": 0.3})


def test_bad_mixtures_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        mixture_weights(MixtureConfig(strategy="fixed", weights={"books": 1.0}), TOKENS)
    with pytest.raises(ValueError, match="needs weights"):
        mixture_weights(MixtureConfig(strategy="fixed"), TOKENS)
    with pytest.raises(ValueError, match="strategy"):
        MixtureConfig(strategy="uniformish")
    with pytest.raises(ValueError, match="temperature"):
        MixtureConfig(strategy="temperature", temperature=0.0)
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="domain_weights"):
        read_weights_file(tmp_path / "bad.json")


def _water_filling(weights: dict[str, float], caps: dict[str, float]) -> dict[str, float]:
    """Reference: w_i = min(cap_i, lam * p_i) with lam found by bisection so that the w_i sum to 1."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        lam = (lo + hi) / 2
        total = sum(min(caps.get(d, float("inf")), lam * p) for d, p in weights.items())
        lo, hi = (lam, hi) if total < 1 else (lo, lam)
    return {d: min(caps.get(d, float("inf")), lo * p) for d, p in weights.items()}


@pytest.mark.parametrize(
    "caps",
    [{"web": 0.5}, {"web": 0.5, "code": 0.3}, {"code": 0.01}, {"math": 0.5}, {"web": 0.2, "code": 0.2}],
)
def test_max_fraction_caps_a_domain_by_water_filling(caps) -> None:
    cfg = MixtureConfig(strategy="proportional", max_fraction=caps)
    weights = mixture_weights(cfg, TOKENS)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert all(weights[d] <= f + 1e-12 for d, f in caps.items())
    assert weights == pytest.approx(_water_filling(mixture_weights(MixtureConfig(), TOKENS), caps), abs=1e-9)


def test_dialogue_share_capped_in_a_temperature_mixture() -> None:
    tokens = {"web": 1_000_000, "dialogue": 4_000_000, "code": 500_000}
    cfg = MixtureConfig(strategy="temperature", temperature=2.0, max_fraction={"dialogue": 0.05})
    weights = mixture_weights(cfg, tokens)
    assert weights["dialogue"] == pytest.approx(0.05)
    hot = mixture_weights(MixtureConfig(strategy="temperature", temperature=2.0), tokens)
    # the others keep their relative weights
    assert weights["web"] / weights["code"] == pytest.approx(hot["web"] / hot["code"])


def test_impossible_or_misnamed_caps_are_errors() -> None:
    with pytest.raises(ValueError, match="cannot be met"):
        mixture_weights(MixtureConfig(max_fraction={"web": 0.3, "code": 0.3, "math": 0.3}), TOKENS)
    with pytest.raises(ValueError, match="unknown domain"):
        mixture_weights(MixtureConfig(max_fraction={"chat": 0.1}), TOKENS)
    with pytest.raises(ValueError, match="max_fraction"):
        MixtureConfig(max_fraction={"web": 1.5})
