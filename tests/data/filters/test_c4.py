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
