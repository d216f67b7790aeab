"""Engine log-probabilities in the two OpenAI formats: legacy completions lists and chat ``content`` entries."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol

from lmforge.infer.outputs import TokenLogprob
from lmforge.serve.schemas import CompletionLogprobs, TopLogprob
from lmforge.serve.schemas import TokenLogprob as ChatTokenLogprob
from lmforge.tokenizer import Tokenizer


class TokenLabels(Protocol):
    def text(self, token_id: int) -> str: ...


class TokenIdLabels:
    """vLLM's ``return_tokens_as_token_ids``: tokens shown as ``token_id:N``, which a client can map back
    to ids even when the text of a byte-level token is an incomplete character."""

    def text(self, token_id: int) -> str:
        return f"token_id:{token_id}"


class TokenTexts:
    """The text of single tokens, as OpenAI shows them in logprobs (decoded, special tokens kept).

    A byte-level token holding part of a multi-byte character decodes to U+FFFD; OpenAI shows the same
    and gives the raw bytes in ``bytes`` for chat, which we derive from the decoded text.
    """

    def __init__(self, tokenizer: Tokenizer, cache_size: int = 65536) -> None:
        self.text = lru_cache(maxsize=cache_size)(lambda token_id: tokenizer.decode([token_id]))


def completion_logprobs(
    token_ids: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    texts: TokenLabels,
    text_offset: int = 0,
) -> CompletionLogprobs:
    """Legacy completions format: parallel lists, one entry per token.

    ``top_logprobs`` maps token text to logprob and, as OpenAI's legacy API did, always holds the chosen
    token besides the requested alternatives. A ``None`` entry (the first token of an echoed prompt, which
    has nothing to be predicted from) gives ``None`` logprobs. ``text_offset`` is where the first token's
    text starts in the returned text.
    """
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=True):
        token = texts.text(token_id)
        result.tokens.append(token)
        result.text_offset.append(text_offset)
        text_offset += len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        top = {texts.text(alternative): logprob for alternative, logprob in entry.top}
        top.setdefault(token, entry.logprob)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append(top)
    return result


def concat_logprobs(first: CompletionLogprobs, second: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(
        tokens=first.tokens + second.tokens,
        token_logprobs=first.token_logprobs + second.token_logprobs,
        top_logprobs=first.top_logprobs + second.top_logprobs,
        text_offset=first.text_offset + second.text_offset,
    )


def _top(token_id: int, logprob: float, texts: TokenLabels) -> TopLogprob:
    token = texts.text(token_id)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


def chat_logprobs(entries: Sequence[TokenLogprob], texts: TokenLabels, top_k: int) -> list[ChatTokenLogprob]:
    """Chat format: one entry per generated token with its ``top_k`` most likely alternatives."""
    result = []
    for entry in entries:
        chosen = _top(entry.token_id, entry.logprob, texts)
        alternatives = [_top(token_id, logprob, texts) for token_id, logprob in entry.top[:top_k]]
        result.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=alternatives))
    return result
