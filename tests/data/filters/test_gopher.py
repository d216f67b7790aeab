import itertools
import random
from collections import Counter

import pytest

from lmforge.data.document import Document
from lmforge.data.filters.gopher import (
    GopherQualityFilter,
    GopherRepetitionFilter,
    WordNgrams,
)
from lmforge.data.step import STEPS


def top_ngram_chars(words: list[str], n: int) -> int:
    return WordNgrams(words).top_chars(n)


def duplicated_ngram_chars(words: list[str], n: int) -> int:
    return WordNgrams(words).duplicated_chars(n)


def distinct_words(n: int, length: int = 5) -> list[str]:
    """n different purely alphabetic words of the given length (no stop words among them)."""
    letters = "bcdfghjklmnpqrstvwxz"
    combos = itertools.product(letters, repeat=length)
    return ["".join(c) for c in itertools.islice(combos, n)]


def quality_doc(words: list[str], lines: int = 1) -> Document:
    """Spread words over `lines` lines."""
    per_line = -(-len(words) // lines)
    rows = [" ".join(words[i : i + per_line]) for i in range(0, len(words), per_line)]
    return Document("d", "\n".join(rows))


def decide(step, text: str) -> str | None:
    return step.decide(Document("d", text))


def test_registered_names_and_published_defaults():
    assert STEPS["gopher_quality"] is GopherQualityFilter
    assert STEPS["gopher_repetition"] is GopherRepetitionFilter
    rep = GopherRepetitionFilter()
    assert rep.top_ngrams == {2: 0.20, 3: 0.18, 4: 0.16}
    assert rep.dup_ngrams == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    assert (rep.dup_line_frac, rep.dup_para_frac, rep.dup_line_char_frac, rep.dup_para_char_frac) == (
        0.3,
        0.3,
        0.2,
        0.2,
    )


class TestGopherQuality:
    step = GopherQualityFilter()

    def test_word_count_bounds(self):
        assert self.step.decide(quality_doc(["the", "and", *distinct_words(48)])) is None  # 50 words
        assert self.step.decide(quality_doc(["the", "and", *distinct_words(47)])) == "gopher_short_doc"
        # Punctuation tokens are not words: 49 words plus a period is still short.
        assert decide(self.step, " ".join(["the", "and", *distinct_words(47)]) + " .") == "gopher_short_doc"
        small_max = GopherQualityFilter(max_doc_words=60)
        assert small_max.decide(quality_doc(["the", "and", *distinct_words(58)])) is None
        assert small_max.decide(quality_doc(["the", "and", *distinct_words(59)])) == "gopher_long_doc"

    def test_mean_word_length(self):
        short = ["the", "and", *(["abc"] * 48)]  # mean exactly 3
        assert self.step.decide(quality_doc(short)) is None
        short[-1] = "ab"
        assert self.step.decide(quality_doc(short)) == "gopher_below_avg_word_length"
        long = ["the", "and", *distinct_words(47, length=10), "x" * 24]  # (6 + 470 + 24) / 50 = 10
        assert self.step.decide(quality_doc(long)) is None
        long[-1] = "x" * 25
        assert self.step.decide(quality_doc(long)) == "gopher_above_avg_word_length"

    def test_hash_and_ellipsis_symbol_ratio(self):
        words = " ".join(["the", "and", *distinct_words(48)])  # 50 words
        assert decide(self.step, words + " #" * 5) is None  # 5 / 50 = 0.1
        assert decide(self.step, words + " #" * 6) == "gopher_too_many_hashes"
        assert decide(self.step, words.replace(" ", " ... ", 5)) is None
        assert decide(self.step, words.replace(" ", " … ", 6)) == "gopher_too_many_ellipsis"

    def test_bullet_lines(self):
        lines = [" ".join(["the", "and", *distinct_words(5)])] + [
            " ".join(distinct_words(5)) for _ in range(9)
        ]
        bulleted = ["• " + line for line in lines[:9]] + lines[9:]  # 9 / 10 lines
        assert decide(self.step, "\n".join(bulleted)) is None
        bulleted[9] = "- " + bulleted[9]
        assert decide(self.step, "\n".join(bulleted)) == "gopher_too_many_bullets"

    def test_ellipsis_lines(self):
        lines = [" ".join(["the", "and", *distinct_words(5)])] + [
            " ".join(distinct_words(5)) for _ in range(9)
        ]
        ending = [line + " …" if i < 3 else line for i, line in enumerate(lines)]  # 3 / 10
        assert decide(self.step, "\n".join(ending)) is None
        ending[3] += "..."
        assert decide(self.step, "\n".join(ending)) == "gopher_too_many_end_ellipsis"

    def test_alphabetic_words(self):
        words = ["the", "and", *distinct_words(38), *(["123"] * 10)]  # 40 / 50 with a letter
        assert self.step.decide(quality_doc(words)) is None
        words[2] = "456"
        assert self.step.decide(quality_doc(words)) == "gopher_below_alpha_threshold"

    def test_stop_words(self):
        assert self.step.decide(quality_doc(["The", "with", *distinct_words(48)])) is None
        assert self.step.decide(quality_doc(["the", *distinct_words(49)])) == "gopher_not_enough_stop_words"

    def test_disabled_rule(self):
        step = GopherQualityFilter(min_stop_words=None)
        assert step.decide(quality_doc(distinct_words(50))) is None


def isolated(**rule) -> GopherRepetitionFilter:
    """A repetition filter with every rule off except the given one."""
    off = dict(
        dup_line_frac=None,
        dup_para_frac=None,
        dup_line_char_frac=None,
        dup_para_char_frac=None,
        top_ngrams={},
        dup_ngrams={},
    )
    off.update(rule)
    return GopherRepetitionFilter(**off)


def unique_lines(n: int) -> list[str]:
    return [" ".join(distinct_words(4 * (i + 1))[4 * i :]) for i in range(n)]


class TestGopherRepetition:
    def test_duplicate_line_fraction(self):
        step = isolated(dup_line_frac=0.3)
        u = unique_lines(9)
        assert decide(step, "\n".join(u[:7] + u[:3])) is None  # 3 / 10
        assert decide(step, "\n".join(u[:9] + u[:4])) == "gopher_dup_line_frac"  # 4 / 13
        # Blank lines between paragraphs are not repeated lines.
        assert decide(step, "\n\n".join(u[:7])) is None

    def test_duplicate_paragraph_fraction(self):
        step = isolated(dup_para_frac=0.3)
        u = unique_lines(9)
        assert decide(step, "\n\n".join(u[:7] + u[:3])) is None
        assert decide(step, "\n\n".join(u[:9] + u[:4])) == "gopher_dup_para_frac"
        # Single newlines do not separate paragraphs.
        assert decide(step, "\n".join(u[:9] + u[:4])) is None

    def test_duplicate_line_chars(self):
        step = isolated(dup_line_char_frac=0.2)
        line = "x" * 20
        filler = "y" * 58
        assert decide(step, f"{line}\n{line}\n{filler}") is None  # 20 / 100
        assert decide(step, f"{line}\n{line}\n{filler[:-1]}") == "gopher_dup_line_char_frac"  # 20 / 99

    def test_duplicate_paragraph_chars(self):
        step = isolated(dup_para_char_frac=0.2)
        para = "x" * 20
        filler = "y" * 56
        assert decide(step, f"{para}\n\n{para}\n\n{filler}") is None  # 20 / 100
        assert decide(step, f"{para}\n\n{para}\n\n{filler[:-1]}") == "gopher_dup_para_char_frac"

    def test_top_ngram_char_share(self):
        step = isolated(top_ngrams={2: 0.2})
        # "aa bb" occurs 4 times: 4 * 5 = 20 characters; the padding words are all different.
        text = ("aa bb " * 4 + " ".join(distinct_words(20, length=4)))[:100]
        assert len(text) == 100 and top_ngram_chars(text.split(), 2) == 20
        assert decide(step, text) is None  # 20 / 100
        assert decide(step, text[:99]) == "gopher_top_2_gram"  # 20 / 99

    def test_duplicated_ngram_char_share(self):
        step = isolated(dup_ngrams={5: 0.15})
        five = "ab cd ef gh ij"
        # The second occurrence repeats 5 words of 2 characters: 10 repeated characters.
        text = (f"{five} {five} " + " ".join(distinct_words(10, length=6)))[:67]
        assert duplicated_ngram_chars(text.split(), 5) == 10
        assert decide(step, text) is None  # 10 / 67 < 0.15
        assert decide(step, text[:66]) == "gopher_duplicated_5_grams"  # 10 / 66 > 0.15

    def test_overlapping_repeats_count_once(self):
        # (a,b) new, (b,a) new, (a,b) repeated -> jump 2, (a,b) repeated -> jump 2, (a,b) repeated.
        assert duplicated_ngram_chars(["a", "b", "a", "b", "a", "b", "a", "b"], 2) == 6
        assert duplicated_ngram_chars(["a", "b", "c", "d"], 2) == 0
        assert duplicated_ngram_chars(["a"], 2) == 0 and top_ngram_chars([], 2) == 0

    @pytest.mark.parametrize("rare_words", [0, 300])
    def test_ngram_counting_matches_string_reference(self, rare_words):
        """Against a direct string implementation of the published rules on random text: a few frequent
        words, with or without many rare ones and copied phrases (n-grams that occur once among repeats)."""
        rng = random.Random(rare_words)
        common = ["a", "bb", "ccc", "dd", "e", "ffff"]
        rare = [f"r{i}" for i in range(rare_words)]
        for _ in range(30):
            words = [
                rng.choice(common if rng.random() < 0.5 or not rare else rare)
                for _ in range(rng.randint(0, 80))
            ]
            for _ in range(rng.randint(0, 3) if words else 0):  # paste a phrase again later
                start = rng.randrange(len(words))
                phrase = words[start : start + rng.randint(1, 12)]
                at = rng.randint(0, len(words))
                words[at:at] = phrase
            for n in range(2, 11):
                grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
                counts = Counter(grams)
                expected_top = len(counts.most_common(1)[0][0]) * counts.most_common(1)[0][1] if grams else 0
                assert top_ngram_chars(words, n) == expected_top
                seen, expected_dup, i = set(), 0, 0
                while i <= len(words) - n:
                    gram = tuple(words[i : i + n])
                    if gram in seen:
                        expected_dup += sum(map(len, gram))
                        i += n
                    else:
                        seen.add(gram)
                        i += 1
                assert duplicated_ngram_chars(words, n) == expected_dup

    @pytest.mark.parametrize("n", [2, 3, 4])
    def test_default_filter_keeps_natural_prose(self, n):
        text = (
            "The committee met on Tuesday to review the budget for the coming year. Several members "
            "raised concerns about rising maintenance costs at the old library, while others argued "
            "that the new park deserved more funding.\n\nAfter a long debate, they agreed to publish "
            "a draft plan and invite comments from residents before the final vote next month."
        )
        assert GopherRepetitionFilter().decide(Document("d", text)) is None
        assert top_ngram_chars(text.split(), n) / len(text) < 0.16


def test_alphabetic_word_count_matches_a_search_per_word():
    """The one-pass count of words without a letter equals the per-word letter search on tokens of
    random text mixing letters of several scripts, ASCII and other decimal digits, superscripts,
    underscores and apostrophes."""
    from lmforge.data.filters.gopher import _HAS_LETTER_RE, _NO_LETTER_WORD_RE
    from lmforge.data.text import split_words

    rng = random.Random(3)
    alphabet = (
        "ab\u00e9\u0416\u05d0\u4e2d\u0e01"
        + "0123456789"
        + "\u0663\u096a\uff11"
        + "\u00b2\u00bd"
        + "_'\u2019"
        + " .-\n"
    )
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        words = split_words(text.lower(), symbols=False)
        expected = sum(1 for w in words if not _HAS_LETTER_RE.search(w))
        assert len(_NO_LETTER_WORD_RE.findall("\n".join(words))) == expected, text
