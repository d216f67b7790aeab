"""C4 cleaning rules (Raffel et al. 2020, section 2.2), line-level then document-level.

Lines are dropped when they do not end in terminal punctuation, have fewer than 3 words, mention
javascript or a cookie/privacy policy; citation markers such as ``[1]`` and ``[edit]`` are removed. A
document is dropped when it contains "lorem ipsum", a curly brace, fewer than 5 sentences after line
cleaning, or (optionally) a word from a bad-words list. Kept documents carry the cleaned text.

The rules assume web text, where a line is a paragraph. Hard-wrapped plain text (licences, books, e-mail)
breaks sentences across lines, and line rules would keep only the lines that happen to end a sentence;
``paragraphs=True`` first joins the lines of each blank-line-separated paragraph, so the rules judge whole
paragraphs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step

C4_POLICY_PHRASES: tuple[str, ...] = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_CITATION_RE = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
# A sentence ends at terminal punctuation (optionally closed by a quote/bracket) followed by space or end.
_SENTENCE_END_RE = re.compile(r"[.!?]+['\")\]]*(?=\s|$)")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_BLANK_LINE_RE = re.compile(r"\n\s*\n")  # \s also takes the \r of Windows line ends


def join_paragraphs(text: str) -> list[str]:
    """The paragraphs of hard-wrapped text (separated by blank lines), each joined into one line."""
    return [" ".join(block.split()) for block in _BLANK_LINE_RE.split(text) if block.strip()]


def count_sentences(line: str) -> int:
    """Sentences in a line: runs of terminal punctuation that close a sentence (at least one per line)."""
    return max(1, len(_SENTENCE_END_RE.findall(line)))


@register_step("c4")
class C4Filter(Filter):
    """C4 line cleaning and document rules; ``decide`` rewrites ``doc.text`` to the kept lines (with
    ``paragraphs``: the kept paragraphs, each on one line, separated by blank lines)."""

    def __init__(
        self,
        remove_citations: bool = True,
        filter_no_terminal_punct: bool = True,
        min_words_per_line: int = 3,
        max_word_length: int | None = 1000,
        filter_javascript: bool = True,
        filter_policy: bool = True,
        policy_phrases: Sequence[str] = C4_POLICY_PHRASES,
        filter_lorem_ipsum: bool = True,
        filter_curly_bracket: bool = True,
        min_sentences: int = 5,
        bad_words: Sequence[str] | str | None = None,
        paragraphs: bool = False,
    ) -> None:
        super().__init__()
        self.remove_citations = remove_citations
        self.filter_no_terminal_punct = filter_no_terminal_punct
        self.min_words_per_line = min_words_per_line
        self.max_word_length = max_word_length
        self.filter_javascript = filter_javascript
        self.filter_policy = filter_policy
        self.policy_phrases = tuple(p.lower() for p in policy_phrases)
        self.filter_lorem_ipsum = filter_lorem_ipsum
        self.filter_curly_bracket = filter_curly_bracket
        self.min_sentences = min_sentences
        self.bad_words = bad_words
        self._bad_words_re = _bad_words_regex(bad_words)
        self.paragraphs = paragraphs

    def decide(self, doc: Document) -> str | None:
        # Rule order follows the original C4 code: the document-level lorem-ipsum and curly-brace rules
        # only see lines that survived the punctuation and length rules.
        kept: list[str] = []
        sentences = 0
        counters = self.stats.counters
        units = join_paragraphs(doc.text) if self.paragraphs else doc.text.splitlines()
        for raw in units:
            line = raw.strip()
            words = line.split()
            if self.max_word_length is not None and max(map(len, words), default=0) > self.max_word_length:
                counters["c4_line_too_long_word"] += 1
                continue
            if self.remove_citations:
                line = _CITATION_RE.sub("", line).strip()
            if self.filter_no_terminal_punct and (
                not line.endswith(_END_PUNCTUATION) or line.endswith("...")
            ):
                counters["c4_line_no_terminal_punct"] += 1
                continue
            if len(line.split()) < self.min_words_per_line:
                counters["c4_line_too_few_words"] += 1
                continue
            lowered = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in lowered:
                return "c4_lorem_ipsum"
            if self.filter_javascript and "javascript" in lowered:
                counters["c4_line_javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return "c4_curly_bracket"
            if self.filter_policy and any(p in lowered for p in self.policy_phrases):
                counters["c4_line_policy"] += 1
                continue
            sentences += count_sentences(line)
            kept.append(line)
        if sentences < self.min_sentences:
            return "c4_too_few_sentences"
        cleaned = ("\n\n" if self.paragraphs else "\n").join(kept)
        if self._bad_words_re is not None and self._bad_words_re.search(cleaned):
            return "c4_bad_words"
        doc.text = cleaned
        return None


def _bad_words_regex(bad_words: Sequence[str] | str | None) -> re.Pattern[str] | None:
    """Whole-word, case-insensitive matcher for a list of words or a file with one word per line."""
    if bad_words is None:
        return None
    if isinstance(bad_words, str):
        bad_words = [w.strip() for w in Path(bad_words).read_text(encoding="utf-8").splitlines()]
    words = sorted({w.lower() for w in bad_words if w}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in words) + r")(?!\w)", re.IGNORECASE)
