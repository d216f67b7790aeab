import math

import pytest

from lmforge.eval.metrics import (
    ChoiceScore,
    LanguageModelingScore,
    exact_match,
    multiple_choice_predictions,
    normalize_answer,
    stderr_of_mean,
)


def test_normalize_answer_and_exact_match():
    assert normalize_answer("  Forty\n two. ") == "forty two"
    assert normalize_answer("Ｒｅｄ") == "red"  # NFKC folds full-width letters
    assert normalize_answer("a, b!", ignore_punctuation=True) == "a b"
    assert normalize_answer("Red", ignore_case=False) == "Red"
    assert exact_match(" 85.", "85")
    assert exact_match("Blue", ["red", "blue"])
    assert not exact_match("851", "85")
    assert not exact_match("Red", "red", ignore_case=False)


def test_multiple_choice_rules_disagree_as_hand_computed():
    # raw sums: a=-2.0 (1 token, 2 chars), b=-3.0 (3 tokens, 12 chars), c=-2.5 (2 tokens, 4 chars; é is 2 bytes)
    choices = [ChoiceScore(-2.0, 1, " a"), ChoiceScore(-3.0, 3, " bbbbbbbbbbb"), ChoiceScore(-2.5, 2, " cé ")]
    # acc: max(-2, -3, -2.5) -> a. per char: -1, -0.25, -0.625 -> b. per token: -2, -1, -1.25 -> b.
    # per byte: -1, -0.25, -0.5 -> b.
    assert multiple_choice_predictions(choices) == {
        "acc": 0,
        "acc_norm": 1,
        "acc_per_token": 1,
        "acc_per_byte": 1,
    }
    # Per-token and per-byte can disagree: x = -4 over 4 tokens / 4 bytes, y = -3 over 2 tokens / 12 bytes.
    pick = multiple_choice_predictions([ChoiceScore(-4.0, 4, "wxyz"), ChoiceScore(-3.0, 2, "twelve chars")])
    assert pick["acc_per_token"] == 0 and pick["acc_per_byte"] == 1 and pick["acc"] == 1
    assert ChoiceScore(0.0, 1, "é").n_bytes == 2
    with pytest.raises(ValueError):
        multiple_choice_predictions([])


def test_perplexity_and_bits_per_byte_formulas():
    # Two tokens with probabilities 1/2 and 1/8 over 3 bytes: nll = ln 2 + ln 8 = 4 ln 2.
    score = LanguageModelingScore(nll=4 * math.log(2), n_tokens=2, n_bytes=3)
    assert score.perplexity == pytest.approx(4.0)  # exp(2 ln 2)
    assert score.bits_per_token == pytest.approx(2.0)
    assert score.bits_per_byte == pytest.approx(4 / 3)
    assert math.isnan(LanguageModelingScore(0.0, 0, 0).perplexity)


def test_stderr_of_mean():
    assert stderr_of_mean([1, 0, 1, 0]) == pytest.approx(math.sqrt((4 * 0.25) / 3 / 4))
    assert math.isnan(stderr_of_mean([1]))
