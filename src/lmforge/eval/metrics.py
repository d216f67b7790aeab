"""Scores from model outputs: exact match, multiple-choice accuracy, perplexity and bits per byte.

These functions see numbers and strings only (no model), so each one can be checked by hand.

Multiple choice follows lm-evaluation-harness: a choice's score is the summed log-probability of its
tokens given the context. ``acc`` picks the highest raw sum; the length-normalised variants divide the
sum first, by the choice's character count (``acc_norm``, the harness definition), by its token count
(``acc_per_token``) or by its UTF-8 byte count (``acc_per_byte``).
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str, ignore_case: bool = True, ignore_punctuation: bool = False) -> str:
    """Canonical form for exact match: NFKC, collapsed whitespace, no trailing full stop."""
    text = unicodedata.normalize("NFKC", text)
    text = re.sub(r"\s+", " ", text).strip()
    if ignore_punctuation:
        text = text.translate(_PUNCT_TABLE).strip()
    else:
        text = text.rstrip(".").strip()
    return text.lower() if ignore_case else text


def exact_match(
    prediction: str, targets: str | Sequence[str], ignore_case: bool = True, ignore_punctuation: bool = False
) -> bool:
    """True when the normalised prediction equals one of the normalised targets."""
    options = [targets] if isinstance(targets, str) else list(targets)
    pred = normalize_answer(prediction, ignore_case, ignore_punctuation)
    return any(pred == normalize_answer(t, ignore_case, ignore_punctuation) for t in options)


@dataclass(frozen=True)
class ChoiceScore:
    """Log-likelihood of one choice's continuation given the context."""

    logprob: float  # sum over the choice's tokens, natural log
    n_tokens: int
    text: str  # the continuation as scored (including any leading delimiter)

    @property
    def n_chars(self) -> int:
        return len(self.text)

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def multiple_choice_predictions(choices: Sequence[ChoiceScore]) -> dict[str, int]:
    """Index of the chosen answer under each scoring rule (ties go to the first choice)."""
    if not choices:
        raise ValueError("a multiple-choice question needs at least one choice")
    return {
        "acc": _argmax([c.logprob for c in choices]),
        "acc_norm": _argmax([c.logprob / max(c.n_chars, 1) for c in choices]),
        "acc_per_token": _argmax([c.logprob / max(c.n_tokens, 1) for c in choices]),
        "acc_per_byte": _argmax([c.logprob / max(c.n_bytes, 1) for c in choices]),
    }


@dataclass(frozen=True)
class LanguageModelingScore:
    """Totals over held-out text; ``nll`` is the summed negative log-likelihood in nats."""

    nll: float
    n_tokens: int
    n_bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")

    @property
    def bits_per_token(self) -> float:
        return self.nll / (self.n_tokens * math.log(2)) if self.n_tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (self.n_bytes * math.log(2)) if self.n_bytes else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "bits_per_token": self.bits_per_token,
            "tokens": self.n_tokens,
            "bytes": self.n_bytes,
        }


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def stderr_of_mean(values: Sequence[float]) -> float:
    """Sample standard error (as the harness reports next to each accuracy)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = mean(values)
    return math.sqrt(sum((v - mu) ** 2 for v in values) / (n - 1) / n)
