import pytest

from lmforge.data.document import Document
from lmforge.data.extract import HtmlExtractor, UnicodeFixer
from lmforge.data.step import STEPS

ARTICLE = (
    "The city council approved a new plan for the river park on Monday evening. The plan adds walking "
    "paths, native plants and a small boat launch near the old mill, and it will be paid for by a state "
    "grant awarded last spring. Residents who spoke at the meeting mostly supported the design, although "
    "several asked for more lighting along the northern trail."
)
PAGE = f"""<html><head><title>River park</title><script>var tracking = "javascript junk";</script></head>
<body><nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li><li><a href="/about">About</a></li></ul></nav>
<article><h1>Council approves river park plan</h1><p>{ARTICLE}</p><p>{ARTICLE.replace("Monday", "Tuesday")}</p></article>
<footer>Copyright 2024 Example Gazette. All rights reserved.</footer></body></html>"""


def test_extracts_main_text_without_boilerplate():
    step = HtmlExtractor()
    assert STEPS["html_extract"] is HtmlExtractor
    doc = step.process(Document("p", PAGE, {"format": "html"}))
    assert ARTICLE in doc.text
    assert "tracking" not in doc.text and "Copyright" not in doc.text and "About" not in doc.text
    assert doc.meta["format"] == "text"
    assert step.stats.counters["html_extracted"] == 1


def test_fast_extraction_is_trafilaturas_fast_mode_and_an_option_away():
    import trafilatura

    # an article page and a link-heavy index page, each step against trafilatura called directly
    items = "".join(f'<li><a href="/f{i}.html">function_{i}</a> (module m{i % 7})</li>' for i in range(60))
    index = f"<html><body><h1>Index</h1><ul>{items}</ul><p>{ARTICLE}</p></body></html>"
    options = dict(output_format="txt", with_metadata=False, include_comments=False, include_tables=True)
    for page in (PAGE, index):
        fast = HtmlExtractor(fast=True).process(Document("p", page, {"format": "html"}))
        full = HtmlExtractor().process(Document("p", page, {"format": "html"}))
        assert fast.text == trafilatura.extract(page, fast=True, **options).strip()
        assert full.text == trafilatura.extract(page, **options).strip()
    assert ARTICLE in HtmlExtractor(fast=True).process(Document("p", PAGE, {"format": "html"})).text
    # the default step's options (its fingerprint) are what they were before the option existed
    assert "fast" not in HtmlExtractor().options and HtmlExtractor(fast=True).options["fast"] is True


def test_page_without_text_is_removed_with_reason_and_plain_text_passes():
    step = HtmlExtractor()
    empty = Document("e", "<html><body><script>x()</script></body></html>", {"format": "html"})
    assert list(step([empty])) == []
    assert step.stats.removed == {"html_no_text": 1}
    plain = Document("t", "Already plain text.")
    assert step.process(plain).text == "Already plain text."


def test_unicode_fix_and_normalization():
    step = UnicodeFixer()
    assert STEPS["unicode_fix"] is UnicodeFixer
    doc = step.process(Document("m", "The Mona Lisa doesnâ€™t have eyebrows. Cafe\u0301 x²"))
    assert doc.text == "The Mona Lisa doesn’t have eyebrows. Café x²"  # mojibake fixed, composed, NFC
    assert doc.text.count("é") == 1
    nfkc = UnicodeFixer(normalization="NFKC").process(Document("k", "x² ⅓"))
    assert nfkc.text == "x2 1⁄3"
    assert step.stats.counters["unicode_docs_changed"] == 1
    with pytest.raises(ValueError):
        UnicodeFixer(normalization="NFX")


def test_control_chars_resolves_overstrikes_and_strips_controls():
    step = STEPS["control_chars"]()
    man = "N\bNA\bAM\bME\bE\n\tls - _\bl_\bi_\bs_\bt files\x07\fpage 2\r\n\x1b[1mbold\x1b[0m x\b_ _\b_\bY"
    out = step.process(Document("m", man))
    assert out.text == "NAME\n\tls - list files\fpage 2\r\nbold x Y"
    assert step.stats.counters == {"control_docs_changed": 1, "control_overstrikes": 11}
    plain = Document("p", "Plain text\twith tabs\nand lines.")
    assert step.process(plain).text == plain.text and step.stats.counters["control_docs_changed"] == 1


def test_unicode_fix_bounds_the_work_on_giant_documents():
    step = UnicodeFixer()
    giant = "cafÃ© naÃ¯ve ﬁle\n" * 70_000  # 1.12 M characters: ftfy would take seconds
    out = step.process(Document("g", giant))
    assert out.text == giant  # NFC only: the mojibake is left as it is
    assert step.stats.counters == {"unicode_fix_skipped_large": 1}
    small = UnicodeFixer(max_fix_chars=100)
    assert small.process(Document("s", "cafÃ© " * 10)).text == "café " * 10
    assert small.process(Document("b", "cafÃ© " * 30)).text == "cafÃ© " * 30
    assert small.stats.counters == {"unicode_docs_changed": 1, "unicode_fix_skipped_large": 1}
    assert UnicodeFixer(max_fix_chars=None).process(Document("n", "cafÃ© " * 30)).text == "café " * 30


def test_ftfy_fast_path_matches_ftfy_fix_text():
    """The ASCII fast path and ftfy's per-line loop give exactly ftfy.fix_text's output (independent
    reference) on random text mixing clean ASCII, ASCII triggers, mojibake, HTML and curly quotes."""
    import random

    import ftfy

    from lmforge.data.extract import ftfy_fix_text

    pieces = [
        "plain words ", "line\n", "\n", "a &amp; b ", "&lt;tag&gt; ", "<p>", "crlf\r\n", "cr\r", "\x1b[1mbold\x1b[0m",
        "bell\x07", "tab\t", "form\x0c", "del\x7f", "doesnâ€™t ", "café ", "“quoted” ", "ﬁne ", "ｗｉｄｅ ",
        "\u2028", "x² ", "\x85", "Ã©", "1 < 2 ", "&eacute; ",
    ]  # fmt: skip
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        for uncurl in (False, True):
            assert ftfy_fix_text(text, uncurl) == ftfy.fix_text(
                text, normalization=None, uncurl_quotes=uncurl
            )
