"""Text extraction from HTML (trafilatura), control-character cleaning, and Unicode repair/normalization
(ftfy + ``unicodedata``)."""

from __future__ import annotations

import re
import unicodedata

from lmforge.data.document import Document
from lmforge.data.step import Step, register_step

NORMALIZATION_FORMS = ("NFC", "NFKC", "NFD", "NFKD")


@register_step("html_extract")
class HtmlExtractor(Step):
    """Main text of HTML pages: boilerplate (navigation, ads, footers, scripts) is left out.

    Documents whose ``meta.format`` is ``"html"`` are extracted (all documents with ``all_documents``);
    the result gets ``meta.format = "text"``. A page without extractable text is removed with reason
    ``"html_no_text"``. The keyword arguments are trafilatura's; ``fast`` skips trafilatura's fallback
    extractors (readability, jusText) and its recall retry, about half the time (docs/benchmarks.md,
    "Data: whole cleaning pipeline", has its agreement with the full cascade).
    """

    def __init__(
        self,
        all_documents: bool = False,
        include_comments: bool = False,
        include_tables: bool = True,
        favor_precision: bool = False,
        favor_recall: bool = False,
        deduplicate: bool = False,
        fast: bool = False,
    ) -> None:
        super().__init__()
        self.all_documents = all_documents
        self.options = dict(
            include_comments=include_comments,
            include_tables=include_tables,
            favor_precision=favor_precision,
            favor_recall=favor_recall,
            deduplicate=deduplicate,
        )
        if fast:  # only when set: the options are the step's fingerprint, unchanged for existing recipes
            self.options["fast"] = True

    def process(self, doc: Document) -> Document | None:
        if not self.all_documents and doc.meta.get("format") != "html":
            return doc
        import trafilatura  # heavy import, deferred to the worker that needs it

        text = trafilatura.extract(doc.text, output_format="txt", with_metadata=False, **self.options)
        if not text or not text.strip():
            self.remove(doc, "html_no_text")
            return None
        doc.text = text.strip()
        doc.meta["format"] = "text"
        self.stats.counters["html_extracted"] += 1
        return doc


# A character struck over with backspace: "X\bX" (bold), "_\bX" or "X\b_" (underline) show one X.
_OVERSTRIKE_RE = re.compile(r"([^\x00-\x1f\x7f])\x08([^\x00-\x1f\x7f])")
_ANSI_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_])")  # CSI sequences (colours), 2-byte ones
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # all but tab, newline, form feed, CR


def _overstruck(match: re.Match[str]) -> str:
    first, second = match.group(1), match.group(2)
    return first if second == "_" else second  # bold and underline keep the letter; else what shows last


def strip_control_chars(text: str) -> tuple[str, int]:
    """``text`` as it reads on a terminal: overstrikes resolved to their letter, ANSI escape sequences
    and other control characters (backspace, bell, NUL...) removed; tab, newline, CR and form feed kept.
    Returns the text and how many overstrikes were resolved."""
    text, overstrikes = _OVERSTRIKE_RE.subn(_overstruck, text)
    while "\x08" in text and _OVERSTRIKE_RE.search(text):  # "_\b_\bX" and other stacked overstrikes
        text, more = _OVERSTRIKE_RE.subn(_overstruck, text)
        overstrikes += more
    text = _ANSI_ESCAPE_RE.sub("", text)
    return _CONTROL_RE.sub("", text), overstrikes


@register_step("control_chars")
class ControlCharCleaner(Step):
    r"""Cleans terminal-era text (man pages, old mail, logs): "_\bw" underline and "w\bw" bold become "w",
    ANSI colour codes and stray control characters (bell, backspace, NUL...) go. Run it before
    ``unicode_fix``: ftfy drops a lone backspace but keeps the underscore it struck over."""

    def process(self, doc: Document) -> Document | None:
        if _CONTROL_RE.search(doc.text) is None:
            return doc
        text, overstrikes = strip_control_chars(doc.text)
        self.stats.counters["control_docs_changed"] += 1
        self.stats.counters["control_overstrikes"] += overstrikes
        doc.text = text
        return doc


# ASCII characters that some ftfy fix can change (with ftfy's default fixes, normalization aside): "&" starts
# an HTML entity, "\r" a line break to normalise, ESC a terminal escape, the rest are the control characters
# ftfy removes (U+0000-0008, U+000B, U+000E-001F, U+007F). Every other fix only touches non-ASCII text.
_FTFY_ASCII_TRIGGERS = re.compile("[&\r\x1b\x00-\x08\x0b\x0e-\x1f\x7f]")


def _clean_ascii(text: str) -> bool:
    """Whether ftfy leaves ``text`` unchanged for certain: ASCII without any of its ASCII triggers."""
    return text.isascii() and _FTFY_ASCII_TRIGGERS.search(text) is None


def ftfy_fix_text(text: str, uncurl_quotes: bool = False) -> str:
    """``ftfy.fix_text(text, normalization=None, uncurl_quotes=...)``, with the same result, faster.

    ftfy works line by line at ~10-20 us of Python per line even when nothing needs fixing. Here a
    document (or line) that is ASCII without an ASCII character any fix acts on is passed through
    untouched, and the other lines go through ftfy's per-line fixer in ftfy's own loop (the same line
    segments, and the same switch-off of HTML unescaping once a segment holds a "<").
    """
    if _clean_ascii(text):
        return text
    import ftfy

    config = ftfy.TextFixerConfig(normalization=None, uncurl_quotes=uncurl_quotes, explain=False)
    out: list[str] = []
    pos = 0
    while pos < len(text):  # ftfy.fix_text's segmentation
        textbreak = text.find("\n", pos) + 1
        if textbreak == 0:
            textbreak = len(text)
        if textbreak - pos > config.max_decode_length:
            textbreak = pos + config.max_decode_length
        segment = text[pos:textbreak]
        if config.unescape_html == "auto" and "<" in segment:
            config = config._replace(unescape_html=False)
        out.append(segment if _clean_ascii(segment) else ftfy.fix_and_explain(segment, config)[0])
        pos = textbreak
    return "".join(out)


@register_step("unicode_fix")
class UnicodeFixer(Step):
    """Repairs mojibake and other Unicode damage with ftfy, then normalizes (NFC by default, or NFKC...).

    Typographic quotes are kept unless ``uncurl_quotes`` (ftfy's own default is to straighten them).
    ftfy costs 1-5 s per million characters of lines (it works line by line), so a document longer than
    ``max_fix_chars`` is only normalized, and counted in ``unicode_fix_skipped_large`` (None: no limit).
    """

    def __init__(
        self,
        normalization: str | None = "NFC",
        fix_text: bool = True,
        uncurl_quotes: bool = False,
        max_fix_chars: int | None = 1_000_000,
    ) -> None:
        super().__init__()
        if normalization is not None and normalization not in NORMALIZATION_FORMS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATION_FORMS} or None, got {normalization!r}"
            )
        self.normalization = normalization
        self.fix_text = fix_text
        self.uncurl_quotes = uncurl_quotes
        self.max_fix_chars = max_fix_chars

    def process(self, doc: Document) -> Document | None:
        text = doc.text
        fix_text = self.fix_text
        if fix_text and self.max_fix_chars is not None and len(text) > self.max_fix_chars:
            self.stats.counters["unicode_fix_skipped_large"] += 1
            fix_text = False
        if fix_text:
            text = ftfy_fix_text(text, self.uncurl_quotes)
        if self.normalization is not None:
            text = unicodedata.normalize(self.normalization, text)
        if text != doc.text:
            self.stats.counters["unicode_docs_changed"] += 1
            doc.text = text
        return doc
