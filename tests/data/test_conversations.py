"""Conversation trees: OpenAssistant messages and comment threads into dialogues and preference pairs."""

from __future__ import annotations

import pytest

from lmforge.data.conversations import build_trees, dialogues, preference_pairs


def oasst(mid, parent, role, text, rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "message_tree_id": "t1", "role": role, "text": text,
            "rank": rank, "lang": extra.pop("lang", "en"), "deleted": False, "review_result": True, **extra}  # fmt: skip


TREE = [
    oasst("p1", None, "prompter", "How do I list files?"),
    oasst("a1", "p1", "assistant", "Use ls.", rank=0),
    oasst("a2", "p1", "assistant", "Try dir.", rank=1),
    oasst("a3", "p1", "assistant", "spam", rank=2, deleted=True),
    oasst("p9", "a3", "prompter", "a reply to spam"),
    oasst("p2", "a1", "prompter", "And hidden ones?"),
    oasst("a4", "p2", "assistant", "ls -a", rank=0),
    oasst("a5", "p2", "assistant", "ls", rank=1),
    oasst("a6", "p2", "assistant", "rude", rank=None, review_result=False),
    oasst("p3", "a2", "prompter", "That is Windows."),
    oasst("x1", None, "prompter", "Bonjour", lang="fr"),
    oasst("a7", "x1", "assistant", "Salut", rank=0, lang="fr"),
]


def texts(dialogue):
    return [(t["role"], t["content"]) for t in dialogue]


def test_every_path_or_the_best_one_becomes_a_dialogue() -> None:
    roots, stats = build_trees(TREE, lang="en")
    assert stats.trees == 1 and stats.messages == 12
    assert stats.to_dict()["dropped"] == {"deleted": 2, "failed_review": 1, "other_language": 2}
    (root,) = roots
    got = [texts(d) for d in dialogues(root, "all")]
    assert got == [
        [
            ("user", "How do I list files?"),
            ("assistant", "Use ls."),
            ("user", "And hidden ones?"),
            ("assistant", "ls -a"),
        ],
        [
            ("user", "How do I list files?"),
            ("assistant", "Use ls."),
            ("user", "And hidden ones?"),
            ("assistant", "ls"),
        ],
        [("user", "How do I list files?"), ("assistant", "Try dir.")],  # the trailing user turn is cut
    ]
    assert [texts(d) for d in dialogues(root, "best")] == got[:1]
    with pytest.raises(ValueError, match="mode"):
        list(dialogues(root, "some"))


def test_ranked_siblings_become_preference_pairs_with_their_context() -> None:
    (root,), _ = build_trees(TREE, lang="en")
    pairs = list(preference_pairs(root))
    assert pairs == [
        {
            "messages": [{"role": "user", "content": "How do I list files?"}],
            "chosen": "Use ls.",
            "rejected": "Try dir.",
        },
        {
            "messages": [
                {"role": "user", "content": "How do I list files?"},
                {"role": "assistant", "content": "Use ls."},
                {"role": "user", "content": "And hidden ones?"},
            ],
            "chosen": "ls -a",
            "rejected": "ls",
        },
    ]


def test_a_comment_thread_maps_speakers_around_one_of_them() -> None:
    thread = [
        {"id": 1, "parent": None, "author": "bob", "text": "The build fails."},
        {"id": 2, "parent": 1, "author": "carol", "text": "Same here."},
        {"id": 3, "parent": 2, "author": "alice", "text": "Run make clean first."},
        {"id": 4, "parent": 3, "author": "bob", "text": "That fixed it."},
        {"id": 5, "parent": 4, "author": "alice", "text": "Good."},
        {"id": 6, "parent": 99, "author": "dave", "text": "orphan"},
    ]
    roots, stats = build_trees(thread, speaker="alice")
    assert stats.dropped == {"missing_parent": 1}
    (dialogue,) = dialogues(roots[0])
    assert texts(dialogue) == [
        ("user", "The build fails.\n\nSame here."),  # two other speakers in a row: one user turn
        ("assistant", "Run make clean first."),
        ("user", "That fixed it."),
        ("assistant", "Good."),
    ]
