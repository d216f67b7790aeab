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


SENTENCES = [
    ENGLISH,
    GERMAN,
    KOREAN,
    "Le comité publiera son rapport sur l'état des bibliothèques publiques la semaine prochaine.",
    "El comité publicará su informe sobre el estado de las bibliotecas públicas la próxima semana.",
    "Il comitato pubblicherà la sua relazione sullo stato delle biblioteche pubbliche la prossima settimana.",
    "O comitê publicará seu relatório sobre o estado das bibliotecas públicas na próxima semana.",
    "Het comité publiceert volgende week zijn rapport over de staat van de openbare bibliotheken.",
    "Комитет опубликует свой доклад о состоянии публичных библиотек на следующей неделе.",
    "Komisja opublikuje w przyszłym tygodniu raport o stanie bibliotek publicznych.",
    "委員会は来週、公共図書館の状況に関する報告書を発表する予定です。",
    "委员会将于下周发布关于公共图书馆状况的报告。",
    "Η επιτροπή θα δημοσιεύσει την έκθεσή της για την κατάσταση των δημόσιων βιβλιοθηκών την επόμενη εβδομάδα.",
    "ستنشر اللجنة تقريرها عن حالة المكتبات العامة الأسبوع المقبل.",
    "הוועדה תפרסם בשבוע הבא את הדוח שלה על מצב הספריות הציבוריות.",
    "समिति अगले सप्ताह सार्वजनिक पुस्तकालयों की स्थिति पर अपनी रिपोर्ट प्रकाशित करेगी।",
    "คณะกรรมการจะเผยแพร่รายงานเกี่ยวกับสถานะของห้องสมุดสาธารณะในสัปดาห์หน้า",
    "Komitea itakuwa ikichapisha ripoti yake juu ya hali ya maktaba za umma wiki ijayo.",
    "Komite akan menerbitkan laporannya tentang keadaan perpustakaan umum minggu depan.",
    "Kurul, halk kütüphanelerinin durumuna ilişkin raporunu gelecek hafta yayımlayacak.",
    "def f(x):\n    return {'a': [1, 2, 3], 'b': x ** 2}  # code\n",
    "<p>Some &amp; HTML</p>\r\n\t<br/>",
]


def _texts() -> list[str]:
    """Many texts of many languages and shapes: each sentence and its prefixes (short and 0-7 bytes),
    upper-cased ones (py3langid lowers those), seeded mixtures, random code points of many scripts."""
    import random

    rng = random.Random(15)
    texts = [
        "",
        " ",
        "\n",
        "a",
        "ab",
        "abc",
        "abcd",
        "abcde",
        "abcdef",
        "abcdefg",
        "é",
        "日本",
        "\x00",
        "12345",
        "a\ud800b",  # a lone surrogate: py3langid encodes it with surrogatepass
        "ÉCOLE PUBLIQUE",
    ]
    for sentence in SENTENCES:
        texts.append(sentence)
        texts.append(sentence.upper())
        texts.extend(sentence[:k] for k in (1, 2, 3, 5, 6, 7, 12, 30))
    for _ in range(150):
        parts = rng.choices(SENTENCES, k=rng.randint(1, 8))
        text = " ".join(parts)
        start = rng.randrange(len(text))
        texts.append(text[start : start + rng.randint(0, 400)])
    for _ in range(60):
        blocks = rng.choices([(0x20, 0x7F), (0xC0, 0x250), (0x370, 0x3FF), (0x400, 0x4FF), (0x3040, 0x30FF),
                              (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x600, 0x6FF), (0x1F300, 0x1F64F)], k=3)  # fmt: skip
        texts.append("".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 300))))
    return texts


def test_scores_are_identical_to_py3langid():
    from lmforge.data.langid import _fast_identifier, _identifier

    reference, fast = _identifier(), _fast_identifier()
    texts = _texts()
    assert len(texts) > 440
    for text in texts:
        assert fast.classify(text) == reference.classify(text), repr(text[:60])
    assert fast.depth >= 2
    # the decision is not trivially the same: the texts cover many languages and scores
    languages = {reference.classify(text)[0] for text in texts}
    assert len(languages) >= 15, languages


def test_threads_share_the_model_not_the_scratch_array():
    from concurrent.futures import ThreadPoolExecutor

    from lmforge.data.langid import _identifier

    texts = _texts()[:120]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(identify_language, texts))
    assert results == [_identifier().classify(text) for text in texts]
