"""Language identification with py3langid (the langid.py model, shipped inside the package: 97 languages)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from lmforge.data.document import Document
from lmforge.data.step import Filter, register_step


@lru_cache(maxsize=1)
def _identifier() -> Any:
    """The model with normalized probabilities, loaded once per process."""
    from py3langid import langid

    return langid.LanguageIdentifier.from_modelpath(langid.MODEL_DIR / langid.MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language."""
    language, score = _identifier().classify(text)
    return language, float(score)


@register_step("language")
class LanguageFilter(Filter):
    """Records ``meta.language``/``meta.language_score`` and keeps documents in ``languages`` (all when
    None) whose score reaches ``min_score``. Only the first ``max_chars`` characters are classified."""

    def __init__(
        self,
        languages: Sequence[str] | None = ("en",),
        min_score: float = 0.65,
        max_chars: int = 20_000,
    ) -> None:
        super().__init__()
        self.languages = tuple(sorted(set(languages))) if languages is not None else None
        self.min_score = min_score
        self.max_chars = max_chars

    def decide(self, doc: Document) -> str | None:
        language, score = identify_language(doc.text[: self.max_chars])
        doc.meta["language"] = language
        doc.meta["language_score"] = round(score, 4)
        self.stats.counters[f"language_{language}"] += 1
        if self.languages is not None and language not in self.languages:
            return "language_not_kept"
        if score < self.min_score:
            return "language_low_score"
        return None
