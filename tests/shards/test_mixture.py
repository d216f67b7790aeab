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
