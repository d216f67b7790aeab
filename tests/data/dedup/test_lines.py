from lmforge.data.dedup.lines import BoilerplateLineDedup, RepeatedSpanRemover, repeated_span_mask
from lmforge.data.document import Document
from lmforge.data.step import STEPS

FOOTER = "Copyright 2024 Example Corp. All rights reserved."
NAV = "Home | About us | Contact"


def page(i: int, extra: str = "") -> Document:
    return Document(f"p{i}", f"{NAV}\nArticle number {i} talks about topic {i * 7}.\n{extra}{FOOTER}")


def test_lines_in_many_documents_are_removed(two_passes):
    step = BoilerplateLineDedup(min_docs=3)
    assert STEPS["boilerplate_lines"] is BoilerplateLineDedup
    tasks = [
        [page(0), page(1)],
        [page(2, "A line shared by two pages only.\n"), page(3, "a line shared by TWO pages only\n")],
    ]
    kept = two_passes(step, tasks)
    texts = [d.text for task in kept for d in task]
    assert texts[0] == "Article number 0 talks about topic 0."
    assert texts[2] == "Article number 2 talks about topic 14.\nA line shared by two pages only."
    assert step.stats.counters["boilerplate_lines_removed"] == 8
    assert step.stats.counters["boilerplate_docs_changed"] == 4


def test_threshold_counts_documents_not_occurrences(two_passes):
    # The footer appears 3 times but in only 2 documents: below min_docs=3.
    tasks = [[Document("a", f"{FOOTER}\nBody of a.\n{FOOTER}"), Document("b", f"Body of b.\n{FOOTER}")]]
    kept = two_passes(BoilerplateLineDedup(min_docs=3, min_line_chars=5), tasks)
    assert [d.text for d in kept[0]] == [f"{FOOTER}\nBody of a.\n{FOOTER}", f"Body of b.\n{FOOTER}"]


def test_document_of_only_boilerplate_is_removed(two_passes):
    tasks = [[Document(str(i), f"{NAV}\n{FOOTER}") for i in range(3)] + [page(9)]]
    step = BoilerplateLineDedup(min_docs=3)
    kept = two_passes(step, tasks)
    assert [d.id for d in kept[0]] == ["p9"]
    assert step.stats.removed == {"only_boilerplate": 3}


def test_repeated_span_mask():
    words = ["a", "b", "c", "d", "e", "x", "a", "b", "c", "d", "e", "f"]
    assert repeated_span_mask(words, 5) == [False] * 6 + [True] * 5 + [False]
    assert repeated_span_mask(words, 6) == [False] * 12
    # Overlapping self-repeats ("a a a a") only count from a non-overlapping earlier occurrence.
    assert repeated_span_mask(["a"] * 5, 2) == [False, False, True, True, True]


def test_repeated_paragraph_is_cut_keeping_layout():
    step = RepeatedSpanRemover(ngram=4)
    assert STEPS["repeated_spans"] is RepeatedSpanRemover
    para = "Subscribe to our newsletter for weekly updates."
    doc = Document(
        "d", f"First paragraph here.\n\n{para}\n\nSecond paragraph, different.\n\n{para.upper()}\n\nEnd."
    )
    out = step.process(doc)
    assert out.text == f"First paragraph here.\n\n{para}\n\nSecond paragraph, different.\n\nEnd."
    assert step.stats.counters["repeated_spans_removed"] == 1
    assert step.stats.counters["repeated_span_words_removed"] == 7
    untouched = Document("u", "no repeats in this short text at all")
    assert step.process(untouched).text == "no repeats in this short text at all"
