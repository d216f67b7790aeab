"""``SamplingParams``: everything a request says about how its tokens are chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding settings (names follow the OpenAI API and vLLM where they exist).

    ``temperature == 0`` means greedy decoding. Penalties follow their reference definitions:
    ``repetition_penalty`` as Hugging Face (divide positive / multiply negative logits of every token seen in
    prompt + output), ``presence_penalty``/``frequency_penalty`` as OpenAI (over generated tokens only).
    ``logprobs=k`` returns the chosen token's log-probability plus the ``k`` most likely alternatives, taken from
    the model's raw distribution (before penalties and temperature); ``prompt_logprobs=k`` does the same for
    every prompt token (the first one has none). Beam search (``use_beam_search``) is deterministic and follows
    Hugging Face ``generate``: ``n`` is the number of returned hypotheses and ``best_of`` the beam width.
    """

    n: int = 1
    best_of: int | None = None  # beam width for beam search (default: n)
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never" (Hugging Face semantics)
    skip_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first out-of-range field (the server turns it into a 400)."""
        checks = [
            ("n", self.n >= 1, "must be >= 1"),
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0.0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be -1, 0 (disabled) or positive"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("no_repeat_ngram_size", self.no_repeat_ngram_size >= 0, "must be >= 0"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "must be >= 0"),
            (
                "early_stopping",
                self.early_stopping in (True, False, "never"),
                "must be true, false or 'never'",
            ),
        ]
        if self.seed is not None:
            # per-completion generators are seeded with seed + 1_000_003 * index, which must stay a valid uint64
            checks.append(("seed", 0 <= self.seed < 2**63, "must be in [0, 2**63)"))
        if self.best_of is not None:
            checks.append(("best_of", self.best_of >= self.n, f"must be >= n={self.n}"))
            checks.append(
                ("best_of", self.use_beam_search, "is only supported with beam search (the beam width)")
            )
        if self.use_beam_search:
            checks.append(("stop", not self.stop, "stop strings are not supported with beam search"))
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}, got {getattr(self, name)!r}")

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
