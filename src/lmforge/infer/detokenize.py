"""Incremental detokenization that never emits half a UTF-8 character, with stop-string handling.

Decoding token by token is wrong for byte-level BPE (one character may span several tokens) and for
SentencePiece-style tokenizers (a token's leading space depends on its left neighbour). Following vLLM, we
decode a short window ``tokens[prefix_offset:]`` and emit what it adds beyond ``tokens[prefix_offset:read_offset]``,
waiting while the window ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens kept as left context so the first generated token decodes with the right spacing.
_PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Text of one completion, grown one token at a time; truncated before the first stop string."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._tokens = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""
        self._emitted = 0  # characters of ``text`` already handed out by ``take_delta``
        self._stop_checked = 0  # stop strings cannot start before this index (already searched)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_id: int) -> str | None:
        """Add one token; returns the stop string it completed (the text is then cut before it), else None."""
        self._tokens.append(token_id)
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._tokens[self._prefix_offset :])
        if len(window_text) > len(prefix_text) and not window_text.endswith(_INCOMPLETE_CHAR):
            self.text += window_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
        return self._find_stop()

    def flush(self) -> None:
        """At the end of generation, emit whatever is pending, even an incomplete character."""
        if self._read_offset < len(self._tokens):
            prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
            window_text = self._decode(self._tokens[self._prefix_offset :])
            self.text += window_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset = len(self._tokens)

    def _find_stop(self) -> str | None:
        if not self.stop:
            return None
        longest = max(len(s) for s in self.stop)
        start = max(0, self._stop_checked - longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        self._stop_checked = len(self.text)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string (it may still grow into one)."""
        held = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, a possible stop-string prefix at the end is held back."""
        end = len(self.text) if finished else len(self.text) - self._held_back()
        end = max(end, self._emitted)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
