"""``SamplingParams``: everything a request says about how its tokens are chosen and when it stops.

This is the one definition of the request fields: their ranges live here (``field(metadata=...)``), the
server's schema only maps the wire format onto this class, the command line's sampling flags are generated
from it (``lmforge.infer.commands``), and ``docs/serving.md`` lists the same ranges (a test checks).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Temperatures below this are greedy decoding: dividing logits by 1e-300 overflows to inf, and the
# distribution such a temperature asks for is the argmax anyway.
GREEDY_BELOW = 1e-5
INT_MAX = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 1024


class InvalidRequestError(ValueError):
    """A request the engine refuses (bad settings, a prompt that cannot fit). The message starts with the
    field's name (``"top_p: must be in (0, 1], got 0"``); servers answer it with a 400."""

    @property
    def param(self) -> str | None:
        name, sep, _ = str(self).partition(":")
        return name if sep and name.isidentifier() else None


def _range(
    low: float, high: float, help: str, *, low_open: bool = False, cli: bool = False
) -> dict[str, Any]:
    return {"range": (low, high, low_open), "help": help, "cli": cli}


@dataclass
class SamplingParams:
    """Per-request decoding settings (names follow the OpenAI API and vLLM where they exist).

    ``temperature == 0`` (or below ``GREEDY_BELOW``) means greedy decoding. Penalties follow their reference
    definitions: ``repetition_penalty`` as Hugging Face (divide positive / multiply negative logits of every
    token seen in prompt + output), ``presence_penalty``/``frequency_penalty`` as OpenAI (over generated tokens
    only). ``logprobs=k`` returns the chosen token's log-probability plus the ``k`` most likely alternatives,
    taken from the model's raw distribution (before penalties and temperature); ``prompt_logprobs=k`` does the
    same for every prompt token (the first one has none). Beam search (``use_beam_search``) is deterministic
    and follows Hugging Face ``generate``: ``n`` is the number of returned hypotheses and ``best_of`` the beam
    width. ``top_k`` larger than the vocabulary means the whole vocabulary (the engine clamps it).
    """

    n: int = field(default=1, metadata=_range(1, 128, "completions per prompt"))
    best_of: int | None = field(
        default=None, metadata=_range(1, 128, "beam width of beam search (default: n)")
    )
    max_tokens: int = field(default=16, metadata=_range(1, INT_MAX, "tokens to generate at most", cli=True))
    temperature: float = field(
        default=1.0, metadata=_range(0.0, 2.0, f"0 (or below {GREEDY_BELOW:g}) = greedy", cli=True)
    )
    top_k: int = field(
        default=0, metadata=_range(-1, INT_MAX, "keep the k most likely tokens (0 or -1 = off)", cli=True)
    )
    top_p: float = field(
        default=1.0, metadata=_range(0.0, 1.0, "nucleus sampling mass (1 = off)", low_open=True, cli=True)
    )
    min_p: float = field(
        default=0.0, metadata=_range(0.0, 1.0, "drop tokens below min_p x the top probability", cli=True)
    )
    repetition_penalty: float = field(
        default=1.0, metadata=_range(0.01, 100.0, "Hugging Face repetition penalty (1 = off)", cli=True)
    )
    presence_penalty: float = field(
        default=0.0, metadata=_range(-2.0, 2.0, "OpenAI presence penalty", cli=True)
    )
    frequency_penalty: float = field(
        default=0.0, metadata=_range(-2.0, 2.0, "OpenAI frequency penalty", cli=True)
    )
    no_repeat_ngram_size: int = field(
        default=0, metadata=_range(0, 1024, "forbid repeating n-grams of this size (0 = off)", cli=True)
    )
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = field(
        default=None,
        metadata=_range(-(2**63), 2**63 - 1, "per-request seed: same seed, same output", cli=True),
    )
    logprobs: int | None = field(default=None, metadata=_range(0, 20, "alternatives per generated token"))
    prompt_logprobs: int | None = field(default=None, metadata=_range(0, 20, "alternatives per prompt token"))
    use_beam_search: bool = False
    length_penalty: float = field(
        default=1.0, metadata=_range(-10.0, 10.0, "beam score = logprob sum / length ** length_penalty")
    )
    early_stopping: bool | str = False  # True, False or "never" (Hugging Face semantics)
    skip_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()
        if self.top_k == -1:
            self.top_k = 0
        if 0.0 < self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}

    def validate(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first field out of its documented range."""
        for f in dataclasses.fields(self):
            bounds = f.metadata.get("range")
            value = getattr(self, f.name)
            if bounds is None or value is None:
                continue
            low, high, low_open = bounds
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequestError(f"{f.name}: must be a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"{f.name}: must be a finite number, got {value!r}")
            if f.type.startswith("int") and not isinstance(value, int):
                raise InvalidRequestError(f"{f.name}: must be an integer, got {value!r}")
            if not (low < value if low_open else low <= value) or value > high:
                raise InvalidRequestError(f"{f.name}: must be in {describe_range(bounds)}, got {value!r}")
        checks = [
            ("stop", len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            ("stop", all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in self.stop), f"non-empty strings of at most {MAX_STOP_LENGTH} characters"),
            ("stop_token_ids", all(isinstance(t, int) and 0 <= t <= INT_MAX for t in self.stop_token_ids), "token ids >= 0"),
            (
                "logit_bias",
                all(isinstance(v, int | float) and math.isfinite(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
                "biases in [-100, 100]",
            ),
            ("logit_bias", all(0 <= int(k) <= INT_MAX for k in self.logit_bias), "token ids >= 0"),
            ("early_stopping", self.early_stopping in (True, False, "never"), "true, false or 'never'"),
        ]  # fmt: skip
        if self.best_of is not None:
            checks.append(("best_of", self.best_of >= self.n, f"at least n={self.n}"))
            checks.append(("best_of", self.use_beam_search, "only with beam search (the beam width)"))
        if self.use_beam_search:
            checks.append(("stop", not self.stop, "no stop strings with beam search"))
        for name, ok, message in checks:
            if not ok:
                raise InvalidRequestError(f"{name}: must be {message}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def beam_width(self) -> int:
        return max(self.best_of or self.n, self.n)

    @property
    def needs_token_history(self) -> bool:
        """Whether the logits processors read the sequence's tokens (penalties, n-gram blocking)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.no_repeat_ngram_size > 0
        )


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def describe_range(bounds: tuple[float, float, bool]) -> str:
    low, high, low_open = bounds
    return f"{'(' if low_open else '['}{_number(low)}, {_number(high)}]"


def numeric_ranges() -> dict[str, tuple[str, str]]:
    """``{field: (range, meaning)}`` of every numeric request field (the table ``docs/serving.md`` shows)."""
    return {
        f.name: (describe_range(f.metadata["range"]), f.metadata["help"])
        for f in dataclasses.fields(SamplingParams)
        if "range" in f.metadata
    }
