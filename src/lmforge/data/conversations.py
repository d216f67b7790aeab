"""Threaded discussions -> conversation trees -> training dialogues and preference pairs.

Two input shapes, one record per message:

- OpenAssistant (oasst1/oasst2 message exports): ``message_id``, ``parent_id`` (None at a root),
  ``message_tree_id``, ``role`` (``prompter`` / ``assistant``), ``text``, ``rank`` (0 = best among
  siblings, None when unranked), ``lang``, ``deleted``, ``review_result``;
- generic comment threads: ``id``, ``parent`` (None at a root), ``author``, ``text`` (forums, mailing lists,
  issue trackers). Speakers become turns around one chosen speaker: that speaker's messages are the
  assistant's, everyone else's the user's (consecutive messages of one side are joined).

Messages that are deleted, failed review, or have empty text are dropped together with their subtrees (a
reply to a removed message has lost its context); what was dropped is counted with the reason.

From a tree:

- :func:`dialogues` gives every root-to-leaf path (``"all"``) or, at each branching, the best-ranked child
  only (``"best"``), as chat messages ``{"role": "user"|"assistant", "content": ...}``;
- :func:`preference_pairs` gives, for siblings with ranks, every (better, worse) pair as
  ``{"messages": context, "chosen": ..., "rejected": ...}`` (the layout the reward model and DPO read).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

ROLES = {"prompter": "user", "assistant": "assistant", "user": "user"}


@dataclass
class Message:
    id: str
    parent: str | None
    role: str  # "user" | "assistant"
    text: str
    rank: int | None = None
    lang: str | None = None
    children: list[Message] = field(default_factory=list)


@dataclass
class ThreadStats:
    messages: int = 0
    trees: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> messages dropped (subtrees included)

    def to_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "trees": self.trees, "dropped": dict(sorted(self.dropped.items()))}


def _drop_reason(record: dict[str, Any]) -> str | None:
    if record.get("deleted"):
        return "deleted"
    if record.get("review_result") is False:
        return "failed_review"
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        return "empty_text"
    return None


def _oasst_message(record: dict[str, Any]) -> Message:
    role = ROLES.get(record.get("role", ""))
    if role is None:
        raise ValueError(f"message {record.get('message_id')}: unknown role {record.get('role')!r}")
    rank = record.get("rank")
    return Message(
        str(record["message_id"]),
        None if record.get("parent_id") is None else str(record["parent_id"]),
        role,
        record["text"],
        rank if isinstance(rank, int) else None,
        record.get("lang"),
    )


def _thread_message(record: dict[str, Any], speaker: str) -> Message:
    role = "assistant" if str(record.get("author")) == speaker else "user"
    parent = record.get("parent")
    return Message(str(record["id"]), None if parent is None else str(parent), role, record["text"])


def build_trees(
    records: Iterable[dict[str, Any]], speaker: str | None = None, lang: str | None = None
) -> tuple[list[Message], ThreadStats]:
    """Roots of the conversation trees in ``records`` (OpenAssistant records, or comment threads when
    ``speaker`` names the author whose messages are the assistant's), with what was dropped and why."""
    stats = ThreadStats()
    nodes: dict[str, Message] = {}
    removed: dict[str, str] = {}
    parents: dict[str, str | None] = {}
    for record in records:
        stats.messages += 1
        key = str(record.get("message_id", record.get("id")))
        parents[key] = record.get("parent_id", record.get("parent"))
        reason = _drop_reason(record)
        if reason is None and lang is not None and record.get("lang") not in (None, lang):
            reason = "other_language"
        if reason is not None:
            removed[key] = reason
            continue
        nodes[key] = _thread_message(record, speaker) if speaker is not None else _oasst_message(record)
    roots: list[Message] = []
    for node in nodes.values():
        ancestor, reason = node.parent, None
        while ancestor is not None:  # a message under a removed one goes with it
            if ancestor in removed:
                reason = removed[ancestor]
                break
            if ancestor not in nodes and ancestor not in parents:
                reason = "missing_parent"
                break
            parent = parents.get(ancestor)
            ancestor = None if parent is None else str(parent)
        if reason is not None:
            stats.dropped[reason] += 1
            continue
        if node.parent is None:
            roots.append(node)
        else:
            nodes[node.parent].children.append(node)
    stats.dropped.update(removed.values())
    for node in nodes.values():
        node.children.sort(key=lambda m: (m.rank is None, m.rank if m.rank is not None else 0, m.id))
    stats.trees = len(roots)
    return roots, stats


def _turns(path: list[Message]) -> list[dict[str, str]]:
    """Chat messages of a path; consecutive messages of one side are joined into one turn."""
    turns: list[dict[str, str]] = []
    for message in path:
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += "\n\n" + message.text
        else:
            turns.append({"role": message.role, "content": message.text})
    return turns


def _paths(node: Message, best_only: bool) -> Iterator[list[Message]]:
    if not node.children:
        yield [node]
        return
    children = node.children[:1] if best_only else node.children
    for child in children:
        for rest in _paths(child, best_only):
            yield [node, *rest]


def dialogues(root: Message, mode: str = "all") -> Iterator[list[dict[str, str]]]:
    """Training dialogues of one tree: every root-to-leaf path (``all``) or the best-ranked one (``best``).
    A dialogue must start with the user and end with the assistant (a trailing user turn is cut)."""
    if mode not in ("all", "best"):
        raise ValueError(f"mode: {mode!r} is not 'all' or 'best'")
    seen: set[tuple[str, ...]] = set()
    for path in _paths(root, best_only=mode == "best"):
        turns = _turns(path)
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        if len(turns) < 2 or turns[0]["role"] != "user":
            continue
        key = tuple(t["content"] for t in turns)
        if key not in seen:  # a cut trailing turn can make two paths the same dialogue
            seen.add(key)
            yield turns


def preference_pairs(root: Message) -> Iterator[dict[str, Any]]:
    """(better, worse) assistant replies among ranked siblings, with the conversation before them."""

    def walk(node: Message, path: list[Message]) -> Iterator[dict[str, Any]]:
        here = [*path, node]
        ranked = [c for c in node.children if c.role == "assistant" and c.rank is not None]
        context = _turns(here)
        if ranked and context and context[-1]["role"] == "user":
            for better, worse in itertools.combinations(sorted(ranked, key=lambda m: m.rank), 2):
                if better.rank < worse.rank and better.text.strip() != worse.text.strip():
                    yield {"messages": context, "chosen": better.text, "rejected": worse.text}
        for child in node.children:
            yield from walk(child, here)

    yield from walk(root, [])


FORMATS = ("oasst", "threads")
_KEYS = {"oasst": ("message_id", "parent_id"), "threads": ("id", "parent")}


def record_problem(record: dict[str, Any], fmt: str, seen: set[str]) -> str | None:
    """Why ``record`` cannot be a message of format ``fmt`` (a reject reason, ``kind: detail``), or None.

    A record that fits is added to ``seen`` (its id), so a repeated id is refused, not silently merged.
    Deleted, failed-review and empty-text messages are not problems: :func:`build_trees` drops them and
    counts why.
    """
    id_key, parent_key = _KEYS[fmt]
    key = record.get(id_key)
    if isinstance(key, bool) or not isinstance(key, str | int):
        return f"missing_key: {id_key!r} (a string or integer id)"
    parent = record.get(parent_key)
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, str | int)):
        return f"bad_value: {parent_key!r} must be an id or null, got {type(parent).__name__}"
    if "text" not in record:
        return "missing_key: 'text'"
    if record["text"] is not None and not isinstance(record["text"], str):
        return f"bad_value: 'text' must be a string, got {type(record['text']).__name__}"
    if fmt == "oasst" and not record.get("deleted") and record.get("role") not in ROLES:
        return f"bad_value: 'role' {record.get('role')!r} is not one of {sorted(ROLES)}"
    if fmt == "threads" and record.get("author") is None:
        return "missing_key: 'author'"
    if str(key) in seen:
        return f"duplicate_id: {id_key} {key!r} occurs earlier"
    seen.add(str(key))
    return None


@dataclass
class ConversionReport:
    records: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # reason kind -> records
    dialogues: int = 0
    pairs: int = 0
    threads: ThreadStats = field(default_factory=ThreadStats)

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "rejected": dict(sorted(self.rejected.items())),
            "dialogues": self.dialogues,
            "pairs": self.pairs,
            **{f"messages_{k}": v for k, v in self.threads.to_dict().items() if k != "messages"},
        }


def convert(
    located: Iterable[Any],
    write_dialogue: Callable[[dict[str, Any]], None],
    write_reject: Callable[[dict[str, Any]], None],
    fmt: str = "oasst",
    paths: str = "all",
    speaker: str | None = None,
    lang: str | None = None,
    write_pair: Callable[[dict[str, Any]], None] | None = None,
) -> ConversionReport:
    """Message records -> chat dialogues ``{"messages": [...], "tree": root id}`` (and, with ``write_pair``,
    preference pairs ``{"messages", "chosen", "rejected", "tree"}``).

    ``located`` is what ``lmforge.data.io.read_records(..., located=True)`` yields: ``(where, record)``
    pairs, or a ``Reject`` for an unreadable line. A record that cannot be a message goes to
    ``write_reject`` as ``{"where", "id", "reason", "preview"}`` and the others go on.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format: {fmt!r} is not one of {FORMATS}")
    if fmt == "threads" and not speaker:
        raise ValueError("format 'threads' needs the speaker whose messages are the assistant's")
    if paths not in ("all", "best"):
        raise ValueError(f"paths: {paths!r} is not 'all' or 'best'")
    report = ConversionReport()
    seen: set[str] = set()
    good: list[dict[str, Any]] = []
    for item in located:
        report.records += 1
        if not isinstance(item, tuple):  # a Reject from the reader (malformed JSON, bad UTF-8 ...)
            record = item.to_record()
            report.rejected[record["reason"].split(":", 1)[0]] += 1
            write_reject(record)
            continue
        where, record = item
        reason = record_problem(record, fmt, seen)
        if reason is not None:
            report.rejected[reason.split(":", 1)[0]] += 1
            key = record.get(_KEYS[fmt][0])
            preview = json.dumps(record, ensure_ascii=False)[:200]
            write_reject({"where": where, "id": key, "reason": reason, "preview": preview})
            continue
        good.append(record)
    roots, report.threads = build_trees(good, speaker=speaker if fmt == "threads" else None, lang=lang)
    for root in roots:
        for turns in dialogues(root, paths):
            write_dialogue({"messages": turns, "tree": root.id})
            report.dialogues += 1
        if write_pair is not None:
            for pair in preference_pairs(root):
                write_pair({**pair, "tree": root.id})
                report.pairs += 1
    return report
