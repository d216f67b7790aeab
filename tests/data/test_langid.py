from lmforge.data.document import Document
from lmforge.data.langid import LanguageFilter, identify_language
from lmforge.data.step import STEPS

ENGLISH = "The committee will publish its report on the state of public libraries next week."
GERMAN = "Der Ausschuss wird seinen Bericht über den Zustand der öffentlichen Bibliotheken nächste Woche veröffentlichen."
KOREAN = "위원회는 다음 주에 공공 도서관의 상태에 관한 보고서를 발표할 예정입니다."


def test_identifies_languages_with_scores():
    assert identify_language(ENGLISH)[0] == "en"
    assert identify_language(GERMAN)[0] == "de"
    language, score = identify_language(KOREAN)
    assert language == "ko" and 0.9 < score <= 1.0


def test_keeps_listed_languages_and_records_meta():
    step = LanguageFilter(languages=["en", "ko"])
    assert STEPS["language"] is LanguageFilter
    docs = [Document("en", ENGLISH), Document("de", GERMAN), Document("ko", KOREAN)]
    kept = [doc.id for doc in docs if step.decide(doc) is None]
    assert kept == ["en", "ko"]
    assert docs[1].meta["language"] == "de" and docs[1].meta["language_score"] > 0.9
    assert step.stats.counters == {"language_en": 1, "language_de": 1, "language_ko": 1}
    assert step.decide(Document("x", GERMAN)) == "language_not_kept"


def test_min_score_and_annotate_only():
    junk = Document("j", "12345 678 ### ...")
    assert LanguageFilter(languages=None, min_score=0.65).decide(junk) == "language_low_score"
    annotate = LanguageFilter(languages=None, min_score=0.0)
    doc = Document("d", GERMAN)
    assert annotate.decide(doc) is None and doc.meta["language"] == "de"
