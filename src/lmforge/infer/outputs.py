"""What the engine hands back: per-request outputs carrying both cumulative state and this step's delta."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of one token and the ``top`` alternatives, as ``(token_id, logprob)`` most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of a request's ``n`` completions.

    ``token_ids``/``text``/``logprobs`` are cumulative; ``new_token_ids``/``new_text``/``new_logprobs`` hold only
    what this step added (what a streaming server sends). ``text`` never contains a stop string and holds back
    a trailing fragment that could still become one until it is ruled out.
    """

    index: int
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    new_logprobs: list[TokenLogprob] | None
    cumulative_logprob: float
    finish_reason: str | None = None  # "stop", "length", "abort", "error" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The state of one request after an engine step. ``finished`` once every completion has finished."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one entry per prompt token, the first is None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None  # set when the request failed inside the engine (finish_reason "error")
