"""``Document``: the unit that flows through the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document: a stable ``id``, its ``text`` and free-form ``meta`` (source, language, scores...)."""

    id: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "meta": self.meta}
