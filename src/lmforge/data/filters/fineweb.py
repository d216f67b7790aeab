"""FineWeb quality rules (Penedo et al. 2024): the three custom filters added on top of Gopher and C4.

- at least 12% of the non-empty lines end in terminal punctuation;
- at most 67% of the non-empty lines are short (<= 30 characters);
- at most 1% of the characters (newlines excluded) sit in lines that duplicate an earlier line;
- at most 0.3 newlines per word (list-like pages).
"""

from __future__ import annotations

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step
from lmforge.data.text import TERMINAL_PUNCTUATION, duplicate_stats, split_words


@register_step("fineweb_quality")
class FineWebQualityFilter(Filter):
    def __init__(
        self,
        line_punct_thr: float | None = 0.12,
        line_punct_exclude_zero: bool = False,
        short_line_thr: float | None = 0.67,
        short_line_length: int = 30,
        char_duplicates_ratio: float | None = 0.01,
        new_line_ratio: float | None = 0.3,
    ) -> None:
        super().__init__()
        self.line_punct_thr = line_punct_thr
        self.line_punct_exclude_zero = line_punct_exclude_zero
        self.short_line_thr = short_line_thr
        self.short_line_length = short_line_length
        self.char_duplicates_ratio = char_duplicates_ratio
        self.new_line_ratio = new_line_ratio

    def decide(self, doc: Document) -> str | None:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "fineweb_empty"
        if self.line_punct_thr is not None:
            ratio = sum(line.rstrip().endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)
            if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
                return "fineweb_line_punct_ratio"
        if self.short_line_thr is not None:
            ratio = sum(len(line) <= self.short_line_length for line in lines) / len(lines)
            if ratio > self.short_line_thr:
                return "fineweb_short_line_ratio"
        if self.char_duplicates_ratio is not None:
            _, repeated_chars = duplicate_stats(lines)
            if repeated_chars / len(text.replace("\n", "")) > self.char_duplicates_ratio:
                return "fineweb_char_dup_ratio"
        if self.new_line_ratio is not None:
            words = split_words(text)
            if not words or text.count("\n") / len(words) > self.new_line_ratio:
                return "fineweb_list_ratio"
        return None
