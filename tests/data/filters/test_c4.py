from lmforge.data.document import Document
from lmforge.data.filters.c4 import C4Filter, count_sentences
from lmforge.data.step import STEPS

SENTENCES = [
    "The river rose quickly after the storm.",
    "Farmers moved their animals to higher ground.",
    "Volunteers filled sandbags all through the night.",
    "By morning the water had begun to fall.",
    "The town thanked everyone who had helped.",
]


def run(step: C4Filter, lines: list[str]) -> tuple[str | None, str]:
    doc = Document("d", "\n".join(lines))
    reason = step.decide(doc)
    return reason, doc.text


def test_registered():
    assert STEPS["c4"] is C4Filter


def test_five_sentences_kept_four_removed():
    step = C4Filter()
    assert run(step, SENTENCES) == (None, "\n".join(SENTENCES))
    assert run(step, SENTENCES[:4])[0] == "c4_too_few_sentences"
    # Several sentences on one line count separately.
    assert run(step, [" ".join(SENTENCES[:3]), " ".join(SENTENCES[3:])])[0] is None
    assert count_sentences('He said "stop." Then he left! Why?') == 3


def test_line_rules_drop_lines_not_documents():
    step = C4Filter()
    noisy = [
        *SENTENCES,
        "Click here to read more",  # no terminal punctuation
        "Read more...",  # ellipsis is not terminal punctuation
        "Two words.",  # fewer than 3 words
        "Please enable JavaScript to view this page.",
        "This site uses cookies to improve your experience.",
        "Read our Privacy Policy before continuing.",
        "See the terms of use for details.",
    ]
    reason, text = run(step, noisy)
    assert reason is None
    assert text == "\n".join(SENTENCES)
    c = step.stats.counters
    assert c["c4_line_no_terminal_punct"] == 2
    assert c["c4_line_too_few_words"] == 1
    assert c["c4_line_javascript"] == 1
    assert c["c4_line_policy"] == 3


def test_three_words_is_enough_and_quotes_end_a_line():
    step = C4Filter(min_sentences=1)
    assert run(step, ["Three words here."]) == (None, "Three words here.")
    assert run(step, ['He said "go home."']) == (None, 'He said "go home."')


def test_citation_markers_removed():
    step = C4Filter()
    lines = [
        SENTENCES[0][:-1] + "[1].",
        SENTENCES[1] + "[edit]",
        *SENTENCES[2:4],
        SENTENCES[4] + " [citation needed]",
    ]
    reason, text = run(step, lines)
    assert reason is None
    assert "[" not in text
    assert text.splitlines()[0] == "The river rose quickly after the storm."


def test_document_rules():
    step = C4Filter()
    assert run(step, [*SENTENCES, "Lorem ipsum dolor sit amet."])[0] == "c4_lorem_ipsum"
    assert run(step, [*SENTENCES, "The function body is { return x; }."])[0] == "c4_curly_bracket"
    # A brace in a line that is dropped anyway (no punctuation) does not condemn the document.
    assert run(step, [*SENTENCES, "var x = {"])[0] is None
    assert run(C4Filter(filter_curly_bracket=False), [*SENTENCES, "A brace { here."])[0] is None


def test_bad_words(tmp_path):
    step = C4Filter(bad_words=["flood"])
    assert run(step, SENTENCES)[0] is None
    assert run(step, [*SENTENCES, "A flood came last year."])[0] == "c4_bad_words"
    assert run(step, [*SENTENCES, "The floodgates held firm."])[0] is None  # whole words only
    path = tmp_path / "bad.txt"
    path.write_text("sandbags\n", encoding="utf-8")
    assert run(C4Filter(bad_words=str(path)), SENTENCES)[0] == "c4_bad_words"


# A licence as plain text: sentences run across hard-wrapped lines; paragraphs are separated by blank lines.
LICENCE = """\
PERMISSION NOTICE

Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files, to deal in the
Software without restriction. The above copyright notice and this
permission notice shall be included in all copies or substantial portions
of the Software.

The software is provided as is, without warranty of any kind, express or
implied, including but not limited to the warranties of merchantability.
In no event shall the authors be liable for any claim, damages or other
liability, whether in an action of contract, tort or otherwise, arising
from, out of or in connection with the software or its use. You use it
at your own risk.
"""


def test_paragraph_mode_keeps_hard_wrapped_sentences_whole():
    # Line by line, only the lines that happen to end a sentence survive, as fragments.
    reason, text = run(C4Filter(min_sentences=1), LICENCE.splitlines())
    assert reason is None and text.splitlines()[0] == "of the Software."
    # Paragraph mode judges whole paragraphs: every sentence is kept, the heading (no punctuation) is not.
    reason, text = run(C4Filter(paragraphs=True), LICENCE.splitlines())
    paragraphs = text.split("\n\n")
    assert reason is None and len(paragraphs) == 2
    assert paragraphs[0].startswith("Permission is hereby granted") and paragraphs[0].endswith(
        "of the Software."
    )
    assert paragraphs[1].startswith("The software is provided") and paragraphs[1].endswith(
        "at your own risk."
    )
    assert " ".join(text.split()) == " ".join(LICENCE.split("\n\n", 1)[1].split())  # nothing else is lost
    # Line rules still apply, to a paragraph as a whole.
    step = C4Filter(paragraphs=True)
    reason, _ = run(step, [*LICENCE.splitlines(), "", "Please enable", "JavaScript to see this page."])
    assert reason is None and step.stats.counters["c4_line_javascript"] == 1
    assert step.stats.counters["c4_line_no_terminal_punct"] == 1  # the heading


def test_paragraph_mode_reads_windows_line_ends():
    text = "\r\n".join(LICENCE.splitlines())
    doc = Document("d", text)
    assert C4Filter(paragraphs=True).decide(doc) is None and len(doc.text.split("\n\n")) == 2
