from lmforge.data.document import Document
from lmforge.data.filters.fineweb import FineWebQualityFilter
from lmforge.data.step import STEPS

LONG = "this line is long enough to not count as a short one"  # > 30 characters


def decide(step: FineWebQualityFilter, lines: list[str]) -> str | None:
    return step.decide(Document("d", "\n".join(lines)))


def only(**rule) -> FineWebQualityFilter:
    off = dict(line_punct_thr=None, short_line_thr=None, char_duplicates_ratio=None, new_line_ratio=None)
    off.update(rule)
    return FineWebQualityFilter(**off)


def test_registered_defaults():
    step = FineWebQualityFilter()
    assert STEPS["fineweb_quality"] is FineWebQualityFilter
    assert (step.line_punct_thr, step.short_line_thr, step.short_line_length) == (0.12, 0.67, 30)
    assert (step.char_duplicates_ratio, step.new_line_ratio) == (0.01, 0.3)


def test_line_punctuation_ratio():
    step = only(line_punct_thr=0.12)
    lines = [f"{LONG} {i}" for i in range(25)]
    for i in range(3):  # 3 / 25 = 0.12
        lines[i] += "."
    assert decide(step, lines) is None
    lines[2] = lines[2][:-1]  # 2 / 25 = 0.08
    assert decide(step, lines) == "fineweb_line_punct_ratio"
    # Non-Latin terminal marks count; blank lines do not count as lines.
    assert decide(step, ["これは文です。", "", "   ", "another line", "more", "x", "y", "z", "w"]) is None
    no_punct = [f"{LONG} {i}" for i in range(5)]
    assert decide(only(line_punct_thr=0.12, line_punct_exclude_zero=True), no_punct) is None


def test_short_line_ratio():
    step = only(short_line_thr=0.67)
    assert decide(step, ["x" * 30, "y" * 30, LONG]) is None  # 2 / 3 = 0.667
    lines = ["x" * 30] * 7 + [LONG] * 3  # 7 / 10
    assert decide(step, lines) == "fineweb_short_line_ratio"
    assert decide(step, ["x" * 31] * 7 + [LONG] * 3) is None  # 31 characters is not short


def test_duplicated_line_chars():
    step = only(char_duplicates_ratio=0.01)
    dup = "d" * 10
    filler = "f" * 980
    assert decide(step, [dup, dup, filler]) is None  # 10 / 1000
    assert decide(step, [dup, dup, filler[:-1]]) == "fineweb_char_dup_ratio"  # 10 / 999


def test_newline_per_word():
    step = only(new_line_ratio=0.3)
    assert decide(step, ["a b c d", "e f", "g h", "i j"]) is None  # 3 newlines / 10 words
    assert decide(step, ["a b c", "d", "e f", "g h", "i j"]) == "fineweb_list_ratio"  # 4 / 10


def test_empty_document():
    assert FineWebQualityFilter().decide(Document("d", "\n  \n")) == "fineweb_empty"
